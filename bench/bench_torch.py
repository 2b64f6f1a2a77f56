"""fusedrnn.torch.LSTM/GRU/RNN vs torch.nn.LSTM/GRU/RNN on CPU: forward under torch.no_grad()
(inference) and forward+backward (training step), float32, one layer, I = H, same weights.

    python bench/bench_torch.py [--threads 2] [--rounds 5] [--repeats 5] [--json out.json] [--loop-only]

Shapes: (T=100, B=32, I=H=256) and (T=200, B=1, I=H=128) for every cell, plus a subset of the
DeepBench rows in deepbench_rnn_shapes.tsv that covers each of its sets and cells, both the
throughput regime (large B*H) and the latency regime (B=1..4), and runs in seconds per row on two
cores. Left out: the GRU rows with T >= 187 and H >= 1024 (50-600 GFLOP per forward, seconds to
minutes per call here) and the larger vanilla/LSTM training rows beyond H=1760/1024, which would only
repeat the throughput regime at a larger size.

Both modules run in this process with the same thread count, alternating round by round (the harness
in fusedrnn.benchmark, where fusedrnn.torch is the peer "fusedrnn.torch"). Each row reports the
median over rounds of the per-round median time, the
spread (min-max of the round medians, as % of the median), GFLOP/s and the ratio torch/fusedrnn
(> 1: fusedrnn.torch is faster).

Then a real training loop (`training_loop`): a recurrent layer (one or two layers, T=100, B=32, I=64,
H=256), a Linear head, MSE, Adam and clip_grad_norm_, one optimizer step per call, torch's default
threads and no environment variables; torch.nn against the same model after fusedrnn.torch.convert(),
with fusedrnn's jobs on torch's OpenMP threads (the default), on fusedrnn's own workers, and on one
thread of its own.

Then per-sample gradients (`per_sample_gradients`): torch.func.vmap(torch.func.grad(loss)) over N
sequences through fusedrnn.torch against torch.nn sample by sample (a backward each: torch.nn's own
vmap takes a slow fallback for LSTM and fails for GRU), with one training step of the whole batch
(summed gradients) as the floor.

Then the adapter's own cost at (T=100, B=32, I=H=256) LSTM: the module's time minus the time of the
bare fusedrnn.functional calls on the same arrays, and the time a module call spends outside the
native layer calls, each as a share of the module's time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time

import torch

import fusedrnn.torch as frt
from fusedrnn import _core, benchmark, datasets, functional

# (set, cell, H, B, T): rows of DeepBench's RNN table (fusedrnn.datasets.deepbench_shapes()).
DEEPBENCH_ROWS = [
    ("training_set", "vanilla", 1760, 16, 50),
    ("training_set", "lstm", 512, 16, 25),
    ("training_set", "lstm", 1024, 16, 25),
    ("training_set", "lstm", 256, 32, 150),
    ("training_set", "gru", 512, 32, 1),
    ("inference_server_set", "lstm", 512, 1, 25),
    ("inference_server_set", "lstm", 256, 4, 150),
    ("inference_server_set", "gru", 512, 2, 1),
    ("inference_device_set", "vanilla", 32, 1, 672),
    ("inference_device_set", "vanilla", 64, 1, 96),
    ("inference_device_set", "lstm", 256, 1, 150),
]
EXTRA_SHAPES = [(100, 32, 256), (200, 1, 128)]  # T, B, I=H
EXTRA_CELLS = ("lstm", "gru", "rnn_tanh")
PEERS = ["fusedrnn.torch", "torch"]


def cases() -> list[benchmark.Case]:
    """The extra shapes for every cell, then the chosen DeepBench rows (each checked to be in the
    table), every one timed for inference and training."""
    table = {(s.set, {v: k for k, v in datasets.DEEPBENCH_CELLS.items()}[s.cell], s.hidden, s.batch, s.timesteps)
             for s in datasets.deepbench_shapes()}
    missing = [row for row in DEEPBENCH_ROWS if row not in table]
    if missing:
        raise SystemExit(f"not in DeepBench's table: {missing}")
    chosen = benchmark.cases_for(EXTRA_CELLS, [(t, b, h, h) for t, b, h in EXTRA_SHAPES])
    for _, cell, hidden, batch, steps in DEEPBENCH_ROWS:
        chosen.append(benchmark.Case(datasets.DEEPBENCH_CELLS[cell], steps, batch, hidden, hidden))
    return chosen


@contextlib.contextmanager
def time_in_core(spent: list):
    """Adds to spent[0] the seconds spent inside the native layer calls while the block runs."""
    originals = {name: getattr(_core, name) for name in ("layer_forward", "layer_backward")}

    def timed(fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    for name, fn in originals.items():
        setattr(_core, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(_core, name, fn)


def adapter_overhead(rounds: int, repeats: int, steps=100, batch=32, hidden=256) -> dict:
    """The adapter's own cost on frt.LSTM, measured two ways: the module's time against the bare
    functional calls it makes on the same arrays (alternating call by call), and, within
    each module call, the time outside the native layer calls (which contention on a shared
    machine inflates far less, since both parts are taken from the same call)."""
    lstm = frt.LSTM(hidden, hidden)
    x = torch.randn(steps, batch, hidden)
    dy = torch.randn(steps, batch, hidden)
    weights = [p.detach().numpy() for p in lstm.parameters()]
    xa, dya = x.numpy(), dy.numpy()
    module_infer, module_train = benchmark.torch_module_runners(lstm, x, dy)

    def bare_infer():
        functional.layer_forward("lstm", xa, *weights, training=False, check_finite=False)

    def bare_train():
        out = functional.layer_forward("lstm", xa, *weights, training=True, check_finite=False)
        functional.layer_backward(out.tape, dya)

    # One call per round: the two sides alternate call by call, so slow phases of a shared machine
    # hit both alike (a few percent is the signal here).
    medians = benchmark.alternate_rounds({("module", "inference"): module_infer, ("bare", "inference"): bare_infer,
                                ("module", "training"): module_train, ("bare", "training"): bare_train},
                               rounds * repeats, 1)
    result = {"cell": "LSTM", "T": steps, "B": batch, "I": hidden, "H": hidden}
    for mode, fn in (("inference", module_infer), ("training", module_train)):
        module = benchmark.timing_fields("module", medians[("module", mode)])
        bare = benchmark.timing_fields("bare", medians[("bare", mode)])
        vs_bare = (module["module_ms"] - bare["bare_ms"]) / module["module_ms"] * 100
        outside, shares = [], []
        for _ in range(rounds * repeats):
            spent = [0.0]
            with time_in_core(spent):
                start = time.perf_counter()
                fn()
                total = time.perf_counter() - start
            outside.append(total - spent[0])
            shares.append((total - spent[0]) / total * 100)
        result[mode] = {**module, **bare, "overhead_vs_bare_pct": vs_bare,
                        "outside_core_ms": statistics.median(outside) * 1e3,
                        "outside_core_pct": statistics.median(shares)}
        print(f"adapter overhead, LSTM T={steps} B={batch} I=H={hidden}, {mode}: module "
              f"{module['module_ms']:.3f} ms vs bare functional calls {bare['bare_ms']:.3f} ms: {vs_bare:+.1f}%; "
              f"time outside the core per call {result[mode]['outside_core_ms']:.3f} ms "
              f"({result[mode]['outside_core_pct']:.1f}%)", flush=True)
    return result


LOOP_CASES = [(cell, layers) for cell in ("lstm", "gru") for layers in (1, 2)]
LOOP_SHAPE = (100, 32, 64, 256)  # T, B, I, H


class _Regressor(torch.nn.Module):
    def __init__(self, rnn: torch.nn.Module, hidden: int):
        super().__init__()
        self.rnn, self.head = rnn, torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _optimizer_step(model, x, target):
    """One training step of `model` on (x, target) per call: zero_grad, MSE, backward, clipping, Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def training_loop(rounds: int, repeats: int) -> list[dict]:
    """Per optimizer step: torch.nn against fusedrnn.torch (convert()) with fusedrnn's jobs on torch's
    OpenMP threads, on fusedrnn's own workers, and on one thread of its own; alternating step by step
    in rounds. Ratios > 1: that variant is faster than torch.nn."""
    torch_runtime = frt.torch_openmp_runtime()
    threads = _core.get_num_threads()

    def on(runtime, team):
        def variant(step):
            def run():
                _core.use_openmp_runtime(runtime)
                if _core.get_num_threads() != team:
                    _core.set_num_threads(team)
                step()
            return run
        return variant

    variants = {"fused_torch_threads": on(torch_runtime or "", threads), "fused_own_workers": on("", threads),
                "fused_one_thread": on("", 1)}
    steps, batch, inputs, hidden = LOOP_SHAPE
    rows = []
    for cell, layers in LOOP_CASES:
        torch.manual_seed(0)
        reference = _Regressor(getattr(torch.nn, cell.upper())(inputs, hidden, layers), hidden)
        x, target = torch.randn(steps, batch, inputs), torch.randn(steps, batch, 1)
        fns = {"torch": _optimizer_step(reference, x, target)}
        for name, variant in variants.items():
            fns[name] = variant(_optimizer_step(frt.convert(copy.deepcopy(reference)), x, target))
        row = benchmark.timed_row(fns, rounds, repeats, cell=cell.upper(), layers=layers, T=steps, B=batch, I=inputs,
                                  H=hidden)
        for name in variants:
            row[f"{name}_vs_torch"] = row["torch_ms"] / row[f"{name}_ms"]
        rows.append(row)
        print(f"training loop {cell.upper()} x{layers} (T={steps} B={batch} I={inputs} H={hidden}): torch.nn "
              f"{row['torch_ms']:.2f} ms (spread {row['torch_spread_pct']:.0f}%); " + "; ".join(
                  f"{name} {row[name + '_ms']:.2f} ms ({row[name + '_spread_pct']:.0f}%) "
                  f"{row[name + '_vs_torch']:.2f}x" for name in variants), flush=True)
    _core.use_openmp_runtime(torch_runtime or "")
    _core.set_num_threads(threads)
    return rows


PER_SAMPLE_CASES = [(cell, steps, samples, hidden) for cell in ("lstm", "gru")
                    for steps, samples, hidden in ((50, 32, 128), (100, 16, 256), (20, 64, 64))]


def per_sample_gradients(rounds: int, repeats: int) -> list[dict]:
    """Every sample's weight gradients, ms per call for all N samples (float32, batch_first, I = H, an
    MSE loss on y): fusedrnn.torch under vmap(grad), torch.nn sample by sample, and one batched step."""
    rows = []
    for cell, steps, samples, hidden in PER_SAMPLE_CASES:
        torch.manual_seed(0)
        reference = getattr(torch.nn, cell.upper())(hidden, hidden, batch_first=True)
        fused = frt.convert(copy.deepcopy(reference))
        params = {name: p.detach() for name, p in reference.named_parameters()}
        xs, targets = torch.randn(samples, 1, steps, hidden), torch.randn(samples, 1, steps, hidden)

        def loss(p, x, target):
            y, _ = torch.func.functional_call(fused, p, (x,))
            return (y - target).square().sum()

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

        def torch_nn_loop():
            for k in range(samples):
                reference.zero_grad()
                y, _ = reference(xs[k])
                (y - targets[k]).square().sum().backward()
                [p.grad.clone() for p in reference.parameters()]

        x_all, target_all = xs.flatten(0, 1), targets.flatten(0, 1)

        def batched_step():
            fused.zero_grad()
            y, _ = fused(x_all)
            (y - target_all).square().sum().backward()

        fns = {"fused_vmap_grad": lambda: per_sample(params, xs, targets), "torch_nn_loop": torch_nn_loop,
               "batched_step": batched_step}
        row = benchmark.timed_row(fns, rounds, repeats, cell=cell.upper(), T=steps, N=samples, I=hidden, H=hidden)
        row["vs_torch_nn_loop"] = row["torch_nn_loop_ms"] / row["fused_vmap_grad_ms"]
        rows.append(row)
        print(f"per-sample gradients {cell.upper()} T={steps} N={samples} I=H={hidden}: fusedrnn vmap(grad) "
              f"{row['fused_vmap_grad_ms']:.2f} ms ({row['fused_vmap_grad_spread_pct']:.0f}%); torch.nn sample by "
              f"sample {row['torch_nn_loop_ms']:.2f} ms ({row['vs_torch_nn_loop']:.2f}x); one batched step "
              f"{row['batched_step_ms']:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = benchmark.script_arguments(__doc__, default_repeats=5)
    parser.add_argument("--loop-only", action="store_true", help="time only the training loop")
    args = parser.parse_args()
    benchmark.set_threads(PEERS, args.threads)

    table = benchmark.Table(PEERS, show_input_size=False)
    if not args.loop_only:
        print(table.header())
    rows = []
    for case in [] if args.loop_only else cases():
        for row in benchmark.run_case(case, PEERS, rounds=args.rounds, repeats=args.repeats):
            rows.append(row)
            print(table.line(row), flush=True)
    loop = training_loop(args.rounds, args.repeats)
    per_sample = None if args.loop_only else per_sample_gradients(args.rounds, args.repeats)
    overhead = None if args.loop_only else adapter_overhead(args.rounds, args.repeats)

    if args.json:
        meta = benchmark.metadata(PEERS, args.threads, args.rounds, args.repeats)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "training_loop": loop, "per_sample_gradients": per_sample,
                       "adapter_overhead": overhead}, f, indent=1)


if __name__ == "__main__":
    main()

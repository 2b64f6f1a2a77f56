"""fusedrnn.torch.LSTM/GRU/RNN vs torch.nn.LSTM/GRU/RNN on CPU: forward under torch.no_grad()
(inference) and forward+backward (training step), float32, one layer, I = H, same weights.

    python bench/bench_torch.py [--threads 2] [--rounds 5] [--repeats 5] [--json out.json]

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

Then the adapter's own cost at (T=100, B=32, I=H=256) LSTM: the module's time minus the time of the
bare fusedrnn.functional calls on the same arrays, and the time a module call spends outside the
native layer calls, each as a share of the module's time.
"""

from __future__ import annotations

import contextlib
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
        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
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


def main() -> None:
    parser = benchmark.script_arguments(__doc__, default_repeats=5)
    args = parser.parse_args()
    benchmark.set_threads(PEERS, args.threads)

    table = benchmark.Table(PEERS, show_input_size=False)
    print(table.header())
    rows = []
    for case in cases():
        for row in benchmark.run_case(case, PEERS, rounds=args.rounds, repeats=args.repeats):
            rows.append(row)
            print(table.line(row), flush=True)
    overhead = adapter_overhead(args.rounds, args.repeats)

    if args.json:
        meta = benchmark.metadata(PEERS, args.threads, args.rounds, args.repeats)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "adapter_overhead": overhead}, f, indent=1)


if __name__ == "__main__":
    main()

"""fusedrnn vs torch.nn on CPU: forward (inference) and forward+backward (training step) times.

    python bench/bench_core.py [--threads 2] [--rounds 5] [--repeats 10] [--json out.json]

Both libraries run in this process with the same thread count, alternating round by round so drift on
a shared machine hits both alike. Each row reports the median over rounds of the per-round median
time, the spread (min-max of the round medians, as % of the median), GFLOP/s from the standard count
(forward 2*T*B*(I+H)*G*H, training 3x that), and the ratio torch/fusedrnn (> 1: fusedrnn is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

import fusedrnn

SHAPES = [(100, 32, 256, 256), (200, 1, 128, 128)]  # T, B, I, H
CELLS = [("LSTM", 4), ("GRU", 3), ("RNN_TANH", 1)]


def flops(gates: int, steps: int, batch: int, inp: int, hidden: int) -> float:
    return 2.0 * steps * batch * (inp + hidden) * gates * hidden


def time_call(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parse_args(doc: str, default_repeats: int) -> argparse.Namespace:
    """The options every benchmark script here takes: --threads, --rounds, --repeats, --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed calls per round")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser.parse_args()


def alternate_rounds(runners: dict, rounds: int, repeats: int) -> dict:
    """Per runner, the median time of `repeats` calls in each of `rounds` rounds; every round runs each
    runner in turn, so drift on a shared machine hits them alike. Two untimed calls first warm up
    first-call allocation and thread start-up."""
    for fn in runners.values():
        fn()
        fn()
    medians = {key: [] for key in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            medians[key].append(time_call(fn, repeats))
    return medians


def timing_fields(lib: str, round_medians, work: float | None = None) -> dict:
    """{lib}_ms (median of the round medians), {lib}_spread_pct ((max - min) / median) and, given the
    work in FLOPs, {lib}_gflops."""
    med = statistics.median(round_medians)
    fields = {f"{lib}_ms": med * 1e3, f"{lib}_spread_pct": (max(round_medians) - min(round_medians)) / med * 100}
    if work is not None:
        fields[f"{lib}_gflops"] = work / med / 1e9
    return fields


def fusedrnn_runners(cell: str, steps, batch, inp, hidden):
    cls = {"LSTM": fusedrnn.LSTM, "GRU": fusedrnn.GRU, "RNN_TANH": fusedrnn.RNN}[cell]
    m = cls(inp, hidden, seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((steps, batch, inp), dtype=np.float32)
    dy = rng.standard_normal((steps, batch, hidden), dtype=np.float32)

    def infer():
        m.eval()
        m(x)

    def train():
        m.train()
        m(x)
        m.backward(dy)

    return m, infer, train


def torch_runners(cell: str, fused_module, steps, batch, inp, hidden):
    import torch

    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN}[cell]
    m = cls(inp, hidden)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in fused_module.state_dict().items()})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, inp, generator=gen)
    dy = torch.randn(steps, batch, hidden, generator=gen)

    def infer():
        with torch.no_grad():
            m(x)

    def train():
        xr = x.detach().requires_grad_()
        y, _ = m(xr)
        y.backward(dy)

    return infer, train


def main() -> None:
    args = parse_args(__doc__, default_repeats=10)

    fusedrnn.set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
        have_torch = True
    except ImportError:
        have_torch = False

    rows = []
    for steps, batch, inp, hidden in SHAPES:
        for cell, gates in CELLS:
            module, f_infer, f_train = fusedrnn_runners(cell, steps, batch, inp, hidden)
            runners = {("fusedrnn", "inference"): f_infer, ("fusedrnn", "training"): f_train}
            if have_torch:
                t_infer, t_train = torch_runners(cell, module, steps, batch, inp, hidden)
                runners[("torch", "inference")] = t_infer
                runners[("torch", "training")] = t_train
            rounds = alternate_rounds(runners, args.rounds, args.repeats)
            for mode, factor in (("inference", 1.0), ("training", 3.0)):
                work = factor * flops(gates, steps, batch, inp, hidden)
                row = {"cell": cell, "T": steps, "B": batch, "I": inp, "H": hidden, "mode": mode}
                for lib in ("fusedrnn", "torch"):
                    if (lib, mode) in rounds:
                        row.update(timing_fields(lib, rounds[(lib, mode)], work))
                if have_torch:
                    row["speedup_vs_torch"] = row["torch_ms"] / row["fusedrnn_ms"]
                rows.append(row)
                print_row(row, have_torch)

    if args.json:
        meta = {"threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                "machine": platform.processor() or platform.machine(), "fusedrnn": fusedrnn.__version__}
        if have_torch:
            meta["torch"] = torch.__version__
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


HEADER_PRINTED = False


def print_row(row, have_torch: bool) -> None:
    global HEADER_PRINTED
    if not HEADER_PRINTED:
        head = f"{'cell':9}{'T':>5}{'B':>4}{'H':>5} {'mode':10}{'fusedrnn ms':>12}{'spread':>8}{'GF/s':>7}"
        if have_torch:
            head += f"{'torch ms':>10}{'spread':>8}{'GF/s':>7}{'speedup':>9}"
        print(head)
        HEADER_PRINTED = True
    line = (f"{row['cell']:9}{row['T']:>5}{row['B']:>4}{row['H']:>5} {row['mode']:10}"
            f"{row['fusedrnn_ms']:>12.3f}{row['fusedrnn_spread_pct']:>7.0f}%{row['fusedrnn_gflops']:>7.1f}")
    if have_torch:
        line += (f"{row['torch_ms']:>10.3f}{row['torch_spread_pct']:>7.0f}%{row['torch_gflops']:>7.1f}"
                 f"{row['speedup_vs_torch']:>8.2f}x")
    print(line, flush=True)


if __name__ == "__main__":
    main()

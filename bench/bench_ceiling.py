"""fusedrnn against the best CPU peer on the shapes that matter, with a verdict per row.

    python bench/bench_ceiling.py [--threads 2] [--rounds 5] [--repeats 5] [--json out.json]
                                  [--shapes a,b,c,d,e] [--cells lstm,gru,rnn_tanh] [--deepbench N]

Shapes (T, B, I=H): a (100, 32, 256), b (100, 64, 512), c (200, 1, 128), d (50, 16, 1024),
e (500, 8, 64). Peers, each timed in the same process, alternating round by round: torch.nn with
`--threads` threads, torch.nn on one thread (faster than two at small batch), and JAX (jit over
lax.scan) when installed. The best peer of a row is the fastest of them in this run.

Targets per row (float32, ratio = best peer time / fusedrnn time):
- every row: >= 1.0x, whatever else it meets;
- large shapes a, b, d: >= 1.25x, or >= 90% of the GFLOP/s that OpenBLAS sgemm reaches on 4096^3 with
  the same threads on this host where the peer leaves no such room: where 1.25x the best peer's GFLOP/s
  in this run would be more than sgemm itself reaches (where torch's oneDNN kernel runs near the FMA
  peak, as LSTM inference does at a and b on CPUs with full-width 512-bit FMAs). The sgemm rate is
  measured in the same process before and after the rows (the higher of the two counts), since a shared
  host's load moves it (bench/NOTES.md, "Intel Xeon (family 6 model 207): the ceiling rows at this
  version" and "The ceiling's own yardstick, and the input projection by units"). Where
  OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE is set, fusedrnn's own GEMMs run what they say, but
  the yardstick is the host's: sgemm is also measured in a child process without them, OpenBLAS
  choosing its kernels for this CPU, and the higher rate counts;
- small batch c, e: >= 2.0x.
Each row also reports the bytes kept for backward by fusedrnn and torch.nn (training rows).
`--deepbench N` adds the first N rows of the DeepBench sets that fit 2 cores (T*B*H*H*G < 5e9).
`--markdown` prints the README's table after the run; `--render results.json` prints it from a saved run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from fusedrnn import benchmark, datasets

SHAPES = {"a": (100, 32, 256), "b": (100, 64, 512), "c": (200, 1, 128), "d": (50, 16, 1024),
          "e": (500, 8, 64)}
LARGE, SMALL = {"a", "b", "d"}, {"c", "e"}
FLOOR_OF_SGEMM = 0.9
PEERS = ("torch", "torch-1t", "jax")


def target(shape_name: str | None, peer_gflops: float, sgemm_gflops: float) -> tuple[float, float | None]:
    """(minimum ratio to the best peer, GF/s that also passes or None)."""
    if shape_name in SMALL:
        return 2.0, None
    if shape_name in LARGE:
        no_room = 1.25 * peer_gflops > sgemm_gflops
        return 1.25, FLOOR_OF_SGEMM * sgemm_gflops if no_room else None
    return 1.0, None


def verdict(row: dict, peers: list[str], shape_name: str | None, sgemm_gflops: float) -> dict:
    times = {p: row[f"{p}_ms"] for p in peers}
    best = min(times, key=times.get)
    ratio = times[best] / row["fusedrnn_ms"]
    need, floor = target(shape_name, row[f"{best}_gflops"], sgemm_gflops)
    passed = ratio >= 1.0 and (ratio >= need or (floor is not None and row["fusedrnn_gflops"] >= floor))
    return {"shape": shape_name or "deepbench", "best_peer": best, "ratio_to_best": ratio,
            "target_ratio": need, "target_gflops": floor, "verdict": "pass" if passed else "MISS"}


def host_sgemm_gflops(threads: int, size: int = 4096) -> float:
    """benchmark.sgemm_gflops here, or, where the environment overrides OpenBLAS's choice of kernels,
    the higher of that and the same measured in a child process without the overrides."""
    here = benchmark.sgemm_gflops(threads, size)
    overrides = benchmark.openblas_overrides()
    if not overrides:
        return here
    env = {k: v for k, v in os.environ.items() if k not in overrides}
    code = f"from fusedrnn import benchmark; print(benchmark.sgemm_gflops({threads}, {size}))"
    native = float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                  text=True).stdout)
    print(f"OpenBLAS sgemm with {', '.join(f'{k}={v}' for k, v in overrides.items())} (fusedrnn's GEMMs run "
          f"these kernels): {here:.0f} GF/s; without: {native:.0f} GF/s")
    return max(here, native)


def deepbench_cases(count: int) -> list[tuple[None, benchmark.Case]]:
    cases = []
    for s in datasets.deepbench_shapes():
        gates = {"lstm": 4, "gru": 3}.get(s.cell, 1)
        if s.timesteps * s.batch * s.hidden * s.hidden * gates < 5e9 and len(cases) < count:
            mode = ("training",) if s.set.startswith("training") else ("inference",)
            cases.append((None, benchmark.Case(s.cell, s.timesteps, s.batch, s.hidden, s.hidden, modes=mode)))
    return cases


def target_text(row: dict) -> str:
    return f"{row['target_ratio']:.2f}x" + (f" or {row['target_gflops']:.0f} GF/s" if row["target_gflops"] else "")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | cell | T | B | I=H | mode | fusedrnn ms | spread | GF/s | best peer | peer ms | ratio "
             "| target | verdict |", "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['cell']} | {r['T']} | {r['B']} | {r['H']} | {r['mode']} "
                     f"| {r['fusedrnn_ms']:.2f} | {r['fusedrnn_spread_pct']:.0f}% | {r['fusedrnn_gflops']:.0f} "
                     f"| {r['best_peer']} | {r[r['best_peer'] + '_ms']:.2f} | {r['ratio_to_best']:.2f}x "
                     f"| {target_text(r)} | {r['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark.script_arguments(__doc__, default_repeats=5)
    parser.add_argument("--shapes", default="a,b,c,d,e")
    parser.add_argument("--cells", default="lstm,gru,rnn_tanh")
    parser.add_argument("--deepbench", type=int, default=0, help="also run this many DeepBench rows")
    parser.add_argument("--markdown", action="store_true", help="print the README table after the run")
    parser.add_argument("--render", metavar="JSON", help="only print the README table of a saved run")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        rows = report.get("rows") if isinstance(report, dict) else None
        if not isinstance(rows, list) or not rows or any(not isinstance(r, dict) or "verdict" not in r for r in rows):
            parser.error(f"render: {args.render} is not a report this script wrote (its rows carry verdicts)")
        print(markdown_table(rows))
        return

    unknown = [name for name in filter(None, args.shapes.split(",")) if name not in SHAPES]
    if unknown:
        parser.error(f"shapes: {', '.join(unknown)} not among {', '.join(SHAPES)}")
    peers = [p for p in PEERS if benchmark.PEERS[p].available()]
    if not peers:
        parser.error(f"no peer to judge against: install one of {', '.join(PEERS)} (torch, or jax)")
    everyone = ["fusedrnn"] + peers
    benchmark.set_threads(everyone, args.threads)
    cases = []
    for name in filter(None, args.shapes.split(",")):
        steps, batch, hidden = SHAPES[name]
        cases += [(name, case) for case in benchmark.cases_for(args.cells.split(","), [(steps, batch, hidden, hidden)])]
    cases += deepbench_cases(args.deepbench)

    sgemm_before = host_sgemm_gflops(args.threads)
    print(f"OpenBLAS sgemm 4096^3, {args.threads} threads: {sgemm_before:.0f} GF/s (measured again after the rows)")
    print(f"{'shape':6}{'cell':9}{'T':>5}{'B':>4}{'H':>6} {'mode':10}{'fusedrnn ms':>12}{'spread':>7}"
          f"{'GF/s':>7}{'best peer':>10}{'peer ms':>10}{'ratio':>7}{'target':>8}  verdict  saved MB (fusedrnn/torch)")
    results = []
    for name, case in cases:
        problem_rows = benchmark.run_case(case, everyone, rounds=args.rounds, repeats=args.repeats)
        memory = benchmark.saved_for_backward_nbytes(benchmark.make_problem(case))
        for row in problem_rows:
            row.update(verdict(row, peers, name, sgemm_before))
            if row["mode"] == "training":
                row["saved_bytes"] = memory
            results.append((name, row))
            tgt = f"{row['target_ratio']:.2f}x" + (f"/{row['target_gflops']:.0f}" if row["target_gflops"] else "")
            mem = ""
            if "saved_bytes" in row:
                mem = "  " + "/".join(f"{v / 1e6:.1f}" for v in row["saved_bytes"].values())  # MB as --memory's
            print(f"{row['shape']:6}{row['cell']:9}{row['T']:>5}{row['B']:>4}{row['H']:>6} {row['mode']:10}"
                  f"{row['fusedrnn_ms']:>12.3f}{row['fusedrnn_spread_pct']:>6.0f}%{row['fusedrnn_gflops']:>7.1f}"
                  f"{row['best_peer']:>10}{row[row['best_peer'] + '_ms']:>10.3f}{row['ratio_to_best']:>6.2f}x"
                  f"{tgt:>8}  {row['verdict']:7}{mem}", flush=True)
    # The verdicts count against the higher sgemm rate: the stricter floor. The table's verdicts were
    # provisional (the rate before the rows); the rows that miss are listed again with the final one.
    sgemm = max(sgemm_before, host_sgemm_gflops(args.threads))
    rows, changed = [], set()
    for name, row in results:
        provisional = row["verdict"]
        row.update(verdict(row, peers, name, sgemm))
        if row["verdict"] != provisional:
            changed.add(id(row))
        rows.append(row)
    print(f"OpenBLAS sgemm 4096^3 after the rows: the verdicts use {sgemm:.0f} GF/s "
          f"(floor {FLOOR_OF_SGEMM * sgemm:.0f} GF/s where the peer leaves no room)")
    misses = [r for r in rows if r["verdict"] != "pass"]
    for r in misses:
        print(f"  miss: {r['shape']} {r['cell']} ({r['T']}, {r['B']}, {r['H']}) {r['mode']}: "
              f"{r['ratio_to_best']:.2f}x {r['best_peer']}, {r['fusedrnn_gflops']:.0f} GF/s; target {target_text(r)}"
              + (" (passed against the rate before the rows)" if id(r) in changed else ""))
    print(f"\n{len(rows) - len(misses)} of {len(rows)} rows meet their target; median ratio to the best peer "
          f"{statistics.median(r['ratio_to_best'] for r in rows):.2f}x")
    if args.json:
        meta = benchmark.metadata(everyone, args.threads, args.rounds, args.repeats)
        meta["sgemm_gflops"] = sgemm
        benchmark.write_json(args.json, meta, rows)
    if args.markdown:
        print("\n" + markdown_table(rows))


if __name__ == "__main__":
    main()

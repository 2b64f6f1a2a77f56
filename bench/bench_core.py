"""fusedrnn vs torch.nn on CPU: forward (inference) and forward+backward (training step) times.

    python bench/bench_core.py [--threads 2] [--rounds 5] [--repeats 10] [--json out.json]

Both libraries run in this process with the same thread count, alternating round by round so drift on
a shared machine hits both alike. Each row reports the median over rounds of the per-round median
time, the spread (min-max of the round medians, as % of the median), GFLOP/s from the standard count
(forward 2*T*B*(I+H)*G*H, training 3x that), and the ratio torch/fusedrnn (> 1: fusedrnn is faster).
The harness is fusedrnn.benchmark; `fusedrnn bench` is its full command line (more peers and shapes).
"""

from __future__ import annotations


from fusedrnn import benchmark


def main() -> None:
    parser = benchmark.script_arguments(__doc__, default_repeats=10)
    args = parser.parse_args()

    peers = [p for p in ("fusedrnn", "torch") if benchmark.PEERS[p].available()]
    benchmark.set_threads(peers, args.threads)
    cases = benchmark.named_cases("default")
    table = benchmark.Table(peers, show_input_size=False)
    print(table.header())
    rows = []
    for case in cases:
        for row in benchmark.run_case(case, peers, rounds=args.rounds, repeats=args.repeats):
            rows.append(row)
            print(table.line(row), flush=True)
    if args.json:
        benchmark.write_json(args.json, benchmark.metadata(peers, args.threads, args.rounds, args.repeats), rows)


if __name__ == "__main__":
    main()

"""fusedrnn.jax (the fused kernels as XLA FFI calls under jax.jit) against JAX's own recurrences: `jit`
over `lax.scan` (the peer "jax") and Flax's nn.RNN over OptimizedLSTMCell/GRUCell/SimpleCell ("flax"),
with the NumPy modules ("fusedrnn") for reference; float32, one layer, I = H, same weights. Inference
is jit(forward); training is jit(grad of sum(y * dy)) for the weights and x.

    python bench/bench_jax.py [--threads 2] [--rounds 5] [--repeats 5] [--json out.json]

Then per-sample gradients (`per_sample_gradients`): jit(vmap(grad(loss))) over N sequences of one row
(or two) with the weights shared, for fusedrnn.jax and for the lax.scan peer, beside fusedrnn.jax with
the weights mapped too (each element its own layer call, as an ensemble runs) and one batched step
over all N*b rows (jit(grad), the gradients summed: the floor).

Then the adapter's own cost at (T=100, B=32, I=H=256) for every cell: the jitted fusedrnn.jax call
against the bare fusedrnn.functional calls it amounts to (layer_forward, and layer_backward for
training) on the same arrays, alternating call by call; the target is at most 5%. Shared machines
move these figures by more than that: run this on a quiet host.
"""

from __future__ import annotations

import json


import numpy as np

from fusedrnn import benchmark, functional

SHAPES = [(100, 32, 256), (200, 1, 128)]  # T, B, I=H
CELLS = ("lstm", "gru", "rnn_tanh")
PEERS = ["fusedrnn.jax", "jax", "flax", "fusedrnn"]
OVERHEAD_TARGET_PCT = 5.0


def adapter_overhead(rounds: int, repeats: int, steps=100, batch=32, hidden=256) -> list[dict]:
    results = []
    for cell in CELLS:
        problem = benchmark.make_problem(benchmark.Case(cell, steps, batch, hidden, hidden))
        jax_infer, jax_train = benchmark.PEERS["fusedrnn.jax"].factory(problem)
        weights = [problem.state_dict[f"{n}_l0"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        x, dy = problem.x, problem.dy

        def bare_infer():
            functional.layer_forward(cell, x, *weights, training=False)

        def bare_train():
            out = functional.layer_forward(cell, x, *weights, training=True)
            functional.layer_backward(out.tape, dy)

        medians = benchmark.alternate_rounds({("jax", "inference"): jax_infer, ("bare", "inference"): bare_infer,
                                              ("jax", "training"): jax_train, ("bare", "training"): bare_train},
                                             rounds * repeats, 1)
        for mode in ("inference", "training"):
            adapter = benchmark.timing_fields("jax", medians[("jax", mode)])
            bare = benchmark.timing_fields("bare", medians[("bare", mode)])
            pct = (adapter["jax_ms"] - bare["bare_ms"]) / bare["bare_ms"] * 100
            row = {"cell": cell.upper(), "T": steps, "B": batch, "I": hidden, "H": hidden, "mode": mode,
                   **adapter, **bare, "overhead_pct": pct, "target_pct": OVERHEAD_TARGET_PCT,
                   "verdict": "pass" if pct <= OVERHEAD_TARGET_PCT else "miss"}
            results.append(row)
            print(f"adapter overhead, {cell.upper()} T={steps} B={batch} I=H={hidden}, {mode}: fusedrnn.jax "
                  f"{adapter['jax_ms']:.3f} ms vs bare functional calls {bare['bare_ms']:.3f} ms: {pct:+.1f}% "
                  f"(target <= {OVERHEAD_TARGET_PCT:.0f}%: {row['verdict']})", flush=True)
    return results


PER_SAMPLE_CASES = [(cell, steps, samples, rows, hidden) for cell in ("lstm", "gru")
                    for steps, samples, rows, hidden in ((50, 32, 1, 128), (100, 16, 1, 256), (50, 16, 2, 128))]


def per_sample_gradients(rounds: int, repeats: int) -> list[dict]:
    """Every sample's weight gradients, ms per call for all N samples (float32, one layer, I = H, the loss
    sum(y * dy) with a dy per sample)."""
    import jax
    import jax.numpy as jnp

    from fusedrnn import jax as fj

    rows = []
    for cell, steps, samples, sample_rows, hidden in PER_SAMPLE_CASES:
        problem = benchmark.make_problem(benchmark.Case(cell, steps, sample_rows, hidden, hidden))
        rng = np.random.default_rng(0)
        xs = jnp.asarray(rng.standard_normal((samples, steps, sample_rows, hidden)).astype(np.float32))
        dys = jnp.asarray(rng.standard_normal((samples, steps, sample_rows, hidden)).astype(np.float32))
        fused_params = {k: jnp.asarray(v) for k, v in problem.state_dict.items()}
        scan_forward, scan_params = benchmark.jax_scan_forward(problem)

        def grads_of(forward):
            return jax.grad(lambda p, x, dy: jnp.sum(forward(p, x) * dy))

        fused_grad = grads_of(lambda p, x: fj.forward(cell, p, x)[0])
        shared = jax.jit(jax.vmap(fused_grad, in_axes=(None, 0, 0)))
        mapped = jax.jit(jax.vmap(fused_grad))
        scan = jax.jit(jax.vmap(grads_of(scan_forward), in_axes=(None, 0, 0)))
        batched = jax.jit(fused_grad)
        mapped_params = {k: jnp.broadcast_to(v, (samples, *v.shape)) for k, v in fused_params.items()}
        x_all, dy_all = (jnp.concatenate(list(a), axis=1) for a in (xs, dys))
        fns = {"fused_vmap_grad": lambda: jax.block_until_ready(shared(fused_params, xs, dys)),
               "jax_vmap_grad": lambda: jax.block_until_ready(scan(scan_params, xs, dys)),
               "fused_call_a_sample": lambda: jax.block_until_ready(mapped(mapped_params, xs, dys)),
               "batched_step": lambda: jax.block_until_ready(batched(fused_params, x_all, dy_all))}
        for fn in fns.values():
            fn()  # compile outside the timing
        row = benchmark.timed_row(fns, rounds, repeats, cell=cell.upper(), T=steps, N=samples, rows=sample_rows,
                                  I=hidden, H=hidden)
        row["vs_jax"] = row["jax_vmap_grad_ms"] / row["fused_vmap_grad_ms"]
        rows.append(row)
        print(f"per-sample gradients {cell.upper()} T={steps} N={samples} rows={sample_rows} I=H={hidden}: "
              f"fusedrnn.jax vmap(grad) {row['fused_vmap_grad_ms']:.2f} ms ({row['fused_vmap_grad_spread_pct']:.0f}%); "
              f"jax lax.scan {row['jax_vmap_grad_ms']:.2f} ms ({row['vs_jax']:.2f}x); a layer call a sample "
              f"{row['fused_call_a_sample_ms']:.2f} ms; one batched step {row['batched_step_ms']:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = benchmark.script_arguments(__doc__, default_repeats=5)
    args = parser.parse_args()
    peers = benchmark.check_peers(PEERS)
    benchmark.set_threads(peers, args.threads)

    table = benchmark.Table(peers, show_input_size=False)
    print(table.header())
    rows = []
    for case in benchmark.cases_for(CELLS, [(t, b, h, h) for t, b, h in SHAPES]):
        for row in benchmark.run_case(case, peers, rounds=args.rounds, repeats=args.repeats):
            rows.append(row)
            print(table.line(row), flush=True)
    per_sample = per_sample_gradients(args.rounds, args.repeats)
    overhead = adapter_overhead(args.rounds, args.repeats)

    if args.json:
        meta = benchmark.metadata(peers, args.threads, args.rounds, args.repeats)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "per_sample_gradients": per_sample, "adapter_overhead": overhead}, f, indent=1)


if __name__ == "__main__":
    main()

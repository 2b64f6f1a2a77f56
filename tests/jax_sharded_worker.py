"""Run by test_jax_sharded.py in a child process whose XLA_FLAGS give the CPU two devices (the flag must
be set before jax initialises). Data-parallel training steps with the batch sharded across the
devices by shard_map, each device running the fused kernels on its own rows, against the same step
on one device, for every cell and the LSTM with a projection. Prints OK and exits 0 when everything
matches."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import fusedrnn.jax as fj

assert jax.device_count() == 2, jax.devices()
mesh = jax.make_mesh((2,), ("data",))
steps, batch, inp, hidden = 6, 8, 3, 5
rng = np.random.default_rng(0)

for cell, proj in [(cell, 0) for cell in fj.CELLS] + [("lstm", 2)]:
    params = fj.init(jax.random.key(0), cell, inp, hidden, num_layers=2, bidirectional=True, proj_size=proj)
    x = jnp.asarray(rng.standard_normal((steps, batch, inp)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((steps, batch, 2 * (proj or hidden))), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, steps + 1, batch), jnp.int32)
    # The batch lives split across the devices, as a data-parallel input pipeline puts it.
    x_s, target_s, lengths_s = (jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in
                                ((x, P(None, "data")), (target, P(None, "data")), (lengths, P("data"))))

    def loss_fn(p, x, target, lengths):
        y, _ = fj.forward(cell, p, x, lengths=lengths)
        return jnp.mean((y - target) ** 2), y

    def local_step(p, x, target, lengths):
        # The loss is the mean over the whole batch; the replicated parameters' gradient comes back
        # summed over the devices (the transpose of their cast to per-device values), as for any JAX
        # operation inside shard_map.
        def global_loss(p):
            loss, y = loss_fn(p, x, target, lengths)
            return jax.lax.pmean(loss, "data"), y

        (loss, y), grads = jax.value_and_grad(global_loss, has_aux=True)(p)
        return loss, grads, y

    sharded = jax.jit(jax.shard_map(local_step, mesh=mesh,
                                    in_specs=(P(), P(None, "data"), P(None, "data"), P("data")),
                                    out_specs=(P(), P(), P(None, "data"))))
    loss, grads, y = sharded(params, x_s, target_s, lengths_s)
    (loss_1, y_1), grads_1 = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, x, target, lengths)

    # Each device ran the kernels on its own half of the batch.
    hlo = sharded.lower(params, x_s, target_s, lengths_s).compile().as_text()
    calls = [re.search(r"= \(f32\[(\d+),(\d+),(\d+)\]", line) for line in hlo.splitlines()
             if 'custom_call_target="fusedrnn_layer_forward"' in line]
    assert len(calls) == 2 and all(int(m.group(2)) == batch // 2 for m in calls), calls
    assert {d.id for d in y.sharding.device_set} == {0, 1}

    np.testing.assert_allclose(np.asarray(y), np.asarray(y_1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(grads_1[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{cell} {name}")
    # The step trains: a few SGD steps lower the loss.
    p = params
    for _ in range(5):
        _, g, _ = sharded(p, x_s, target_s, lengths_s)
        p = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
    assert float(sharded(p, x_s, target_s, lengths_s)[0]) < float(loss)
print("OK")

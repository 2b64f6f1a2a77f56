"""Run by test_jax_sharded.py in a child process whose XLA_FLAGS give the CPU two devices (the flag must
be set before jax initialises). Data-parallel training steps with the batch sharded across the
devices, by shard_map and by plain jit's input shardings, each device running the fused kernels on its
own rows, against the same step on one device, for every cell and the LSTM with a projection. Prints
OK and exits 0 when everything matches."""

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

# Plain jit, no shard_map: the batch-sharded inputs' shardings alone make each device run the kernels on
# its own rows, forward and backward (the weight gradients summed over the devices), with nothing
# gathered. Inputs split along time instead run whole on each device. Against the same step on one
# device.
def fused_calls(compiled_text):
    """(target, rows) of every fusedrnn custom call in a compiled program (its first result is y or dx,
    (T, rows, ...))."""
    found = []
    for line in compiled_text.splitlines():
        target = re.search(r'custom_call_target="(fusedrnn_layer_\w+)"', line)
        if target:
            found.append((target.group(1), int(re.search(r"= \(f32\[\d+,(\d+)", line).group(1))))
    return found


for cell, proj in [(cell, 0) for cell in fj.CELLS] + [("lstm", 2)]:
    params = fj.init(jax.random.key(1), cell, inp, hidden, num_layers=2, bidirectional=True, proj_size=proj)
    width = proj or hidden
    x = jnp.asarray(rng.standard_normal((steps, batch, inp)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((steps, batch, 2 * width)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, steps + 1, batch), jnp.int32)
    h0 = jnp.asarray(rng.standard_normal((4, batch, width)), jnp.float32)
    hx = (h0, jnp.asarray(rng.standard_normal((4, batch, hidden)), jnp.float32)) if cell == "lstm" else h0

    def step(p, x, target, lengths, hx):
        def loss_fn(p):
            y, state = fj.forward(cell, p, x, hx, lengths=lengths)
            return jnp.mean((y - target) ** 2), y
        (loss, y), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        return loss, grads, y

    jitted = jax.jit(step)
    (loss_1, grads_1, y_1) = jitted(params, x, target, lengths, hx)
    rows = NamedSharding(mesh, P(None, "data"))
    by_rows = (jax.device_put(x, rows), jax.device_put(target, rows),
               jax.device_put(lengths, NamedSharding(mesh, P("data"))), jax.device_put(hx, rows))
    by_time = (jax.device_put(x, NamedSharding(mesh, P("data"))), target, lengths, hx)
    for inputs in (by_rows, by_time):
        loss, grads, y = jitted(params, *inputs)
        np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_1), rtol=1e-6, atol=1e-6)
        for name in params:
            np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(grads_1[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"plain jit {cell} {name}")
        compiled = jitted.lower(params, *inputs).compile().as_text()
        calls = fused_calls(compiled)
        # Two layers, one forward and one backward call each, every one on half of the rows (all of them
        # where time was split).
        rows_each = batch // 2 if inputs is by_rows else batch
        assert len(calls) == 4 and all(r == rows_each for _, r in calls), calls
        if inputs is by_rows:
            assert "all-gather" not in compiled, [l for l in compiled.splitlines() if "all-gather" in l]
            assert y.sharding.spec[1] == "data", y.sharding
    # Run to run, the same bits.
    again = jitted(params, *by_rows)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(jitted(params, *by_rows))))

# vmap of the jitted layer and jit of its vmap still map the call (custom_partitioning has no vmap rule).
params = fj.init(jax.random.key(2), "gru", inp, hidden)
xs = jnp.asarray(rng.standard_normal((3, steps, batch, inp)), jnp.float32)
each = np.stack([np.asarray(fj.forward("gru", params, xs[i])[0]) for i in range(3)])
for mapped in (jax.vmap(jax.jit(lambda x: fj.forward("gru", params, x)[0])),
               jax.jit(jax.vmap(lambda x: fj.forward("gru", params, x)[0]))):
    np.testing.assert_allclose(np.asarray(mapped(xs)), each, rtol=1e-6, atol=1e-6)
# jax.export: a program split across devices by shard_map exports and runs from its serialized form; one
# split by plain jit's shardings is refused (jax cannot serialize the partitioning's callback).
from jax import export  # noqa: E402

rows = NamedSharding(mesh, P(None, "data"))
x = jnp.asarray(rng.standard_normal((steps, batch, inp)), jnp.float32)
x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)
by_shard_map = jax.jit(jax.shard_map(lambda p, x: fj.forward("gru", p, x)[0], mesh=mesh,
                                     in_specs=(P(), P(None, "data")), out_specs=P(None, "data")))
exported = export.export(by_shard_map, disabled_checks=fj.export_disabled_checks())(params, x_spec)
try:
    import flatbuffers  # noqa: F401  (what serialize() needs; the test extra has it)

    restored = export.deserialize(exported.serialize())
except ImportError:
    restored = exported
np.testing.assert_allclose(np.asarray(restored.call(params, jax.device_put(x, rows))),
                           np.asarray(fj.forward("gru", params, x)[0]), rtol=1e-6, atol=1e-6)
by_jit = jax.jit(lambda p, x: fj.forward("gru", p, x)[0], in_shardings=(None, rows))
try:
    export.export(by_jit, disabled_checks=fj.export_disabled_checks())(params, x_spec)
except NotImplementedError as err:
    assert "host_callbacks" in str(err), err
else:
    raise AssertionError("a program partitioned by plain jit exported")
# A run-time check failing on one device's rows (NaN in x, h0 or dy, a length outside [1, T]) fails on
# every device: none is left waiting at a collective for one that stopped (XLA's CPU collectives abort
# the process after such a wait), and the error names the offending argument and value.
params = fj.init(jax.random.key(3), "lstm", inp, hidden)
rows, by_batch = NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P("data"))


def train_loss(p, x, lengths, h0, scale):
    y, _ = fj.forward("lstm", p, x, (h0, jnp.zeros_like(h0)), lengths=lengths)
    return jnp.sum(jnp.sin(y) ** 2 * scale)  # scale's NaN reaches backward's dy alone


def sharded_loss(p, x, lengths, h0, scale):
    return jax.lax.pmean(jax.grad(train_loss)(p, x, lengths, h0, scale), "data")


programs = {"plain jit": jax.jit(jax.grad(train_loss)),
            "shard_map": jax.jit(jax.shard_map(sharded_loss, mesh=mesh, out_specs=P(),
                                               in_specs=(P(), P(None, "data"), P("data"), P(None, "data"),
                                                         P(None, "data"))))}
clean = (np.asarray(rng.standard_normal((steps, batch, inp)), np.float32), np.full(batch, steps, np.int32),
         np.asarray(rng.standard_normal((1, batch, hidden)), np.float32), np.ones((steps, batch, hidden), np.float32))
shardings = (rows, by_batch, rows, rows)
for name, program in programs.items():
    for broken, message in ((0, "x: contains NaN"), (2, "h0: contains NaN"), (3, "dy: contains NaN"),
                            (1, rf"lengths: each length must be in \[1, {steps}\] \(T\), got 9 ")):
        arrays = [a.copy() for a in clean]
        if broken == 1:
            arrays[1][-1] = 9
        else:
            arrays[broken][..., -1, 0] = np.nan  # the last batch row: the second device's
        placed = [jax.device_put(a, s) for a, s in zip(arrays, shardings)]
        try:
            jax.block_until_ready(program(params, *placed))
        except Exception as err:  # noqa: BLE001  (jax's runtime error class differs between versions)
            assert re.search(message, str(err)), (name, str(err))
        else:
            raise AssertionError(f"{name}: {message} did not raise")
    # A clean step still runs after the failed ones.
    jax.block_until_ready(program(params, *[jax.device_put(a, s) for a, s in zip(clean, shardings)]))
# A mesh with explicit axes (jax.set_mesh), where arrays' types name their sharding: the layer runs
# whole on each device, and the gradients come back with their primals' types.
if hasattr(jax, "set_mesh") and hasattr(jax.sharding, "reshard"):
    params = fj.init(jax.random.key(4), "gru", inp, hidden)
    x = np.asarray(rng.standard_normal((steps, batch, inp)), np.float32)

    def explicit_loss(p, x):
        return jnp.sum(fj.forward("gru", p, x)[0] ** 2)

    expected = jax.grad(explicit_loss, argnums=(0, 1))(params, x)
    explicit = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(explicit):
        x_s = jax.device_put(x, NamedSharding(explicit, P(None, "data")))
        grads, dx = jax.jit(jax.grad(explicit_loss, argnums=(0, 1)))(params, x_s)
        assert jax.typeof(dx).sharding.spec == jax.typeof(x_s).sharding.spec, jax.typeof(dx)
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(expected[0][name]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(expected[1]), rtol=1e-5, atol=1e-6)
print("OK")

"""fusedrnn.jax under jax.export: programs that run the fused layers export with
fj.export_disabled_checks(), with symbolic batch and time dimensions, serialize with their backward
(vjp_order=1), lower for the CPU and CUDA together, and give the jitted program's bits."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import fusedrnn.jax as fj  # noqa: E402
from helpers import CELL_CASES, proj_of, random_lengths  # noqa: E402

INPUT, HIDDEN = 5, 7


def _problem(rng, cell, projected, steps, batch):
    params = fj.init(jax.random.key(1), cell, INPUT, HIDDEN, num_layers=2, bidirectional=True,
                     proj_size=proj_of(HIDDEN, projected))
    x = jnp.asarray(rng.standard_normal((steps, batch, INPUT)), jnp.float32)
    lengths = jnp.asarray(random_lengths(rng, steps, batch), jnp.int32)
    return params, x, lengths


def _loss(cell):
    def loss(params, x, lengths):
        y, _ = fj.forward(cell, params, x, lengths=lengths)
        return jnp.sum(jnp.tanh(y) * jnp.arange(y.shape[-1], dtype=y.dtype))

    return loss


def _assert_same_tree(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_export_without_the_checks_is_refused():
    # What export_disabled_checks is for: jax.export refuses custom calls it does not know.
    params, x, lengths = _problem(np.random.default_rng(0), "gru", False, 4, 3)
    with pytest.raises(ValueError, match="custom call"):
        export.export(jax.jit(_loss("gru")))(params, x, lengths)


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_exported_training_step_with_symbolic_shapes_gives_the_jitted_bits(rng, cell, projected):
    step = jax.jit(jax.value_and_grad(_loss(cell)))
    params, x, lengths = _problem(rng, cell, projected, 6, 4)
    steps, batch = export.symbolic_shape("t, b")
    exported = export.export(step, disabled_checks=fj.export_disabled_checks())(
        params, jax.ShapeDtypeStruct((steps, batch, INPUT), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    for shape in ((6, 4), (9, 2), (1, 1)):
        params, x, lengths = _problem(rng, cell, projected, *shape)
        _assert_same_tree(exported.call(params, x, lengths), step(params, x, lengths))


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_serialized_forward_differentiates_with_the_fused_backward(rng, cell, projected):
    pytest.importorskip("flatbuffers")  # jax's serialization format
    loss = jax.jit(_loss(cell))
    params, x, lengths = _problem(rng, cell, projected, 5, 3)
    exported = export.export(loss, disabled_checks=fj.export_disabled_checks())(params, x, lengths)
    restored = export.deserialize(exported.serialize(vjp_order=1))
    assert float(restored.call(params, x, lengths)) == float(loss(params, x, lengths))
    _assert_same_tree(jax.jit(jax.grad(restored.call))(params, x, lengths), jax.jit(jax.grad(loss))(params, x, lengths))


def test_one_export_lowers_for_the_cpu_and_cuda():
    # The layers lower the same on both platforms (the handler is chosen where the program runs).
    loss = jax.jit(_loss("lstm"))
    params, x, lengths = _problem(np.random.default_rng(2), "lstm", False, 5, 3)
    exported = export.export(loss, disabled_checks=fj.export_disabled_checks(), platforms=("cpu", "cuda"))(
        params, x, lengths)
    assert exported.platforms == ("cpu", "cuda")
    assert "fusedrnn_layer_forward" in exported.mlir_module()
    assert float(exported.call(params, x, lengths)) == float(loss(params, x, lengths))

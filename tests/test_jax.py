"""fusedrnn.jax: the fused kernels as XLA FFI calls, against the NumPy modules (bitwise, same thread
count), a lax.scan reference and torch.nn.LSTM(proj_size) for the projected LSTM, under jit, grad, vmap
and from several threads at once; bad input."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import fusedrnn  # noqa: E402
import fusedrnn.jax as fj  # noqa: E402
from fusedrnn.benchmark import jax_cell_step  # noqa: E402
from helpers import (CELL_CASES, CELLS, ODD_PROJECTED_SHAPES, assert_close, has_cell_state, make_module,  # noqa: E402
                     needs_throwing_new, proj_of, random_lengths)


# jax.enable_x64 in recent jax, jax.experimental.enable_x64 in older ones (down to the supported floor).
_enable_x64 = getattr(jax, "enable_x64", None)
if _enable_x64 is None:
    from jax.experimental import enable_x64 as _enable_x64


@pytest.fixture
def x64():
    with _enable_x64(True):
        yield


def _dtype_context(dtype):
    return _enable_x64(np.dtype(dtype) == np.float64)


# An error the FFI handler returns reaches Python as JaxRuntimeError, or as ValueError from JAX's fast
# dispatch path of a call it has run before; the message is the handler's either way.
RUNTIME_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def _params(rng, cell, input_size, hidden, num_layers=1, bidirectional=False, bias=True, dtype=np.float32,
            proj_size=0):
    """Random parameters well outside the gates' linear range, as NumPy arrays keyed like torch.nn."""
    shapes = fj.param_shapes(cell, input_size, hidden, num_layers, bias=bias, bidirectional=bidirectional,
                             proj_size=proj_size)
    return {k: rng.uniform(-0.6, 0.6, s).astype(dtype) for k, s in shapes.items()}


def _state(cell, h0, c0):
    return (h0, c0) if has_cell_state(cell) else h0


# ---- a lax.scan reference, written from torch.nn's equations ----------------------------------------

def _reference_direction(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse):
    steps = x.shape[0]
    valid = jnp.arange(steps)[:, None] < lengths[None, :]          # (T, B)
    x_proj = x @ w_ih.T + b_ih

    def step(carry, inputs):
        h, c = carry
        xp, ok = inputs
        h_new, c_new = jax_cell_step(cell, xp, h, c, w_hh, b_hh)
        ok = ok[:, None]
        h, c = jnp.where(ok, h_new, h), jnp.where(ok, c_new, c)
        return (h, c), jnp.where(ok, h, 0)

    (h, c), y = lax.scan(step, (h0, c0), (x_proj, valid), reverse=reverse)
    return y, h, c


def reference(cell, params, x, h0=None, c0=None, lengths=None, num_layers=1, bidirectional=False,
              dropout_masks=None):
    """The stack as plain jnp over lax.scan: x (T, B, I), states (L*D, B, H); returns (y, h_n, c_n)."""
    steps, batch, _ = x.shape
    hidden = params["weight_hh_l0"].shape[1]
    dirs = 2 if bidirectional else 1
    zeros = jnp.zeros((num_layers * dirs, batch, hidden), x.dtype)
    h0 = zeros if h0 is None else h0
    c0 = zeros if c0 is None else c0
    lengths = jnp.full((batch,), steps) if lengths is None else jnp.asarray(lengths)
    hs, cs = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            s = f"_l{layer}" + ("_reverse" if d else "")
            gh = params["weight_hh" + s].shape[0]
            b_ih = params.get("bias_ih" + s, jnp.zeros(gh, x.dtype))
            b_hh = params.get("bias_hh" + s, jnp.zeros(gh, x.dtype))
            row = layer * dirs + d
            y, h, c = _reference_direction(cell, x, params["weight_ih" + s], params["weight_hh" + s], b_ih, b_hh,
                                           h0[row], c0[row], lengths, d == 1)
            outs.append(y)
            hs.append(h)
            cs.append(c)
        x = jnp.concatenate(outs, axis=-1)
        if dropout_masks is not None and layer < num_layers - 1:
            x = x * dropout_masks[layer]
    return x, jnp.stack(hs), jnp.stack(cs)


# ---- the NumPy modules, bitwise -----------------------------------------------------------------

CONFIGS = [  # (num_layers, bidirectional, with_lengths, with_state, batch_first)
    (1, False, False, False, False),
    (2, True, True, True, False),
    (3, False, True, False, True),
    (2, True, False, True, True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_outputs_and_gradients_equal_the_numpy_modules_bitwise(rng, cell, projected, config, dtype):
    num_layers, bidirectional, with_lengths, with_state, batch_first = config
    steps, batch, inp, hidden = 5, 4, 3, 6
    proj = proj_of(hidden, projected)
    width = proj or hidden
    dirs = 2 if bidirectional else 1
    params = _params(rng, cell, inp, hidden, num_layers, bidirectional, dtype=dtype, proj_size=proj)
    x = rng.standard_normal((batch, steps, inp) if batch_first else (steps, batch, inp)).astype(dtype)
    h0 = rng.standard_normal((num_layers * dirs, batch, width)).astype(dtype) if with_state else None
    c0 = rng.standard_normal((num_layers * dirs, batch, hidden)).astype(dtype) if with_state and has_cell_state(cell) \
        else None
    lengths = random_lengths(rng, steps, batch) if with_lengths else None
    y_shape = (batch, steps, dirs * width) if batch_first else (steps, batch, dirs * width)
    dy = rng.standard_normal(y_shape).astype(dtype)
    dh_n = rng.standard_normal((num_layers * dirs, batch, width)).astype(dtype)

    module = make_module(cell, inp, hidden, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, dtype=dtype, **({"proj_size": proj} if proj else {}))
    module.load_state_dict(params)
    y_np, state_np = module(x, _state(cell, h0, c0) if with_state else None, lengths=lengths)
    h_np = state_np[0] if has_cell_state(cell) else state_np
    dx_np, dstate_np = module.backward(dy, _state(cell, dh_n, None))
    dh0_np = dstate_np[0] if has_cell_state(cell) else dstate_np

    with _dtype_context(dtype):
        def loss(p, x, h0, c0):
            hx = None if h0 is None else _state(cell, h0, c0)
            y, state = fj.forward(cell, p, x, hx, lengths=lengths, batch_first=batch_first)
            h_n = state[0] if has_cell_state(cell) else state
            return jnp.sum(y * dy) + jnp.sum(h_n * dh_n), (y, h_n)

        grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        (_, (y, h_n)), (g_params, g_x, g_h0, g_c0) = grad_fn(params, x, h0, c0)

    np.testing.assert_array_equal(np.asarray(y), y_np)
    np.testing.assert_array_equal(np.asarray(h_n), h_np)
    np.testing.assert_array_equal(np.asarray(g_x), dx_np)
    for name in params:
        np.testing.assert_array_equal(np.asarray(g_params[name]), module.grads[name], err_msg=name)
    if with_state:
        np.testing.assert_array_equal(np.asarray(g_h0), dh0_np)
        if has_cell_state(cell):
            np.testing.assert_array_equal(np.asarray(g_c0), dstate_np[1])


# ---- the lax.scan reference, with tolerances ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_outputs_and_gradients_match_a_lax_scan_reference(rng, cell, dtype):
    steps, batch, inp, hidden, num_layers = 6, 5, 4, 7, 2
    params = _params(rng, cell, inp, hidden, num_layers, True, dtype=dtype)
    x = rng.standard_normal((steps, batch, inp)).astype(dtype)
    h0 = rng.standard_normal((4, batch, hidden)).astype(dtype)
    c0 = rng.standard_normal((4, batch, hidden)).astype(dtype)
    lengths = random_lengths(rng, steps, batch)
    weights_y = rng.standard_normal((steps, batch, 2 * hidden)).astype(dtype)

    with _dtype_context(dtype):
        def fused(p, x, h0, c0):
            y, state = fj.forward(cell, p, x, _state(cell, h0, c0), lengths=lengths)
            h_n, c_n = state if has_cell_state(cell) else (state, c0)
            return jnp.sum(y * weights_y) + jnp.sum(jnp.sin(h_n)) + jnp.sum(c_n ** 2), (y, h_n, c_n)

        def ref(p, x, h0, c0):
            y, h_n, c_n = reference(cell, p, x, h0, c0, lengths, num_layers, True)
            return jnp.sum(y * weights_y) + jnp.sum(jnp.sin(h_n)) + jnp.sum(c_n ** 2), (y, h_n, c_n)

        args = (params, x, h0, c0)
        (_, out), grads = jax.value_and_grad(fused, argnums=(0, 1, 2, 3), has_aux=True)(*args)
        # The fused call runs eagerly, as users call it; the reference is jitted to compile its scans once.
        (_, out_ref), grads_ref = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    for name, a, b in zip(("y", "h_n", "c_n"), out, out_ref):
        assert_close(a, b, dtype, name)
    for name in params:
        assert_close(grads[0][name], grads_ref[0][name], dtype, name)
    for name, a, b in zip(("x", "h0", "c0"), grads[1:], grads_ref[1:]):
        if name == "c0" and not has_cell_state(cell):
            continue  # unused by the cell: both sides give a zero gradient
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_check_grads_float64_reverse_mode(x64, rng, cell, projected):
    from jax.test_util import check_grads

    proj = proj_of(5, projected)
    params = _params(rng, cell, 3, 5, 2, True, dtype=np.float64, proj_size=proj)
    x = rng.standard_normal((4, 3, 3))
    h0 = rng.standard_normal((4, 3, proj or 5))
    c0 = rng.standard_normal((4, 3, 5))
    lengths = np.array([4, 2, 3])

    def f(p, x, *hx):  # hx: (h0, c0) for an LSTM, else (h0,)
        y, state = fj.forward(cell, p, x, hx if has_cell_state(cell) else hx[0], lengths=lengths)
        h_n, c_n = state if has_cell_state(cell) else (state, 0.0)
        return jnp.sum(jnp.tanh(y)) + jnp.sum(h_n ** 2) + jnp.sum(jnp.sin(c_n))

    args = (params, x, h0, c0) if has_cell_state(cell) else (params, x, h0)
    # Central differences in float64 with eps=1e-6: truncation error ~1e-12 times f's third derivative.
    check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def test_cell_clip_matches_the_numpy_module(rng):
    params = _params(rng, "lstm", 3, 5, dtype=np.float32)
    x = 3 * rng.standard_normal((6, 2, 3)).astype(np.float32)
    module = fusedrnn.LSTM(3, 5, cell_clip=0.5)
    module.load_state_dict(params)
    y_np, _ = module(x)
    dx_np, _ = module.backward(np.ones_like(y_np))
    y, _ = fj.lstm(params, x, cell_clip=0.5)
    grads = jax.grad(lambda p, x: fj.lstm(p, x, cell_clip=0.5)[0].sum(), argnums=(0, 1))(params, x)
    np.testing.assert_array_equal(np.asarray(y), y_np)
    np.testing.assert_array_equal(np.asarray(grads[1]), dx_np)
    np.testing.assert_array_equal(np.asarray(grads[0]["weight_hh_l0"]), module.grads["weight_hh_l0"])
    assert not np.array_equal(np.asarray(y), np.asarray(fj.lstm(params, x)[0]))


def test_unbatched_input_and_no_bias(rng):
    params = _params(rng, "gru", 3, 4, 2, bias=False)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y, h_n = fj.gru(params, x)
    y_b, h_b = fj.gru(params, x[:, None, :])
    assert y.shape == (5, 4) and h_n.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_b[:, 0]))
    np.testing.assert_array_equal(np.asarray(h_n), np.asarray(h_b[:, 0]))
    y_ref, h_ref, _ = reference("gru", params, jnp.asarray(x[:, None, :]), num_layers=2)
    assert_close(y_b, y_ref, np.float32, "y")


# ---- vmap ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_vmap_over_inputs_weights_and_cotangents_equals_a_loop(rng, cell, projected):
    params = _params(rng, cell, 3, 5, 2, True, proj_size=proj_of(5, projected))
    xs = rng.standard_normal((3, 4, 2, 3)).astype(np.float32)
    lengths = np.array([[4, 2], [1, 4], [3, 3]])

    def f(p, x, lens):
        y, state = fj.forward(cell, p, x, lengths=lens)
        return y, state

    # Inference with shared weights runs the mapped elements as one batch of their rows side by side:
    # bit for bit that call, and each element's own call to float32 rounding (another batch size may
    # group a step's GEMM differently).
    ys, states = jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))(params, xs, lengths)
    y_all, states_all = f(params, np.concatenate(list(xs), axis=1), lengths.reshape(-1))
    for i in range(3):
        rows = slice(2 * i, 2 * i + 2)
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(y_all[:, rows]))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b[:, rows])),
                     states, states_all)
        y, state = f(params, xs[i], lengths[i])
        assert_close(ys[i], y, np.float32, "y")
        jax.tree.map(lambda a, b: assert_close(a[i], b, np.float32, "state"), states, state)

    # Per-example parameters (an ensemble) and per-example gradients.
    stacked = {k: np.stack([v, v * 0.5, -v]) for k, v in params.items()}
    loss = lambda p, x: jnp.sum(f(p, x, None)[0] ** 2)  # noqa: E731
    grads = jax.vmap(jax.grad(loss, argnums=(0, 1)))(stacked, xs)
    for i in range(3):
        p_i = {k: v[i] for k, v in stacked.items()}
        g_p, g_x = jax.grad(loss, argnums=(0, 1))(p_i, xs[i])
        np.testing.assert_array_equal(np.asarray(grads[1][i]), np.asarray(g_x))
        for name in params:
            np.testing.assert_array_equal(np.asarray(grads[0][name][i]), np.asarray(g_p[name]), err_msg=name)

    # jacrev vmaps the backward over cotangents while the tape stays unmapped: each cotangent's
    # backward reads the one tape in place (no fold, which would gather it once per cotangent).
    x0 = xs[0]
    jac = jax.jacrev(lambda x: f(params, x, None)[0][-1, 0])(x0)
    for unit in (0, jac.shape[0] - 1):
        row = jax.grad(lambda x: f(params, x, None)[0][-1, 0, unit])(x0)
        np.testing.assert_array_equal(np.asarray(jac[unit]), np.asarray(row))


_GRAD_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_per_sample_gradients_run_every_sample_in_one_call(rng, cell, projected):
    # vmap(grad) over samples of one row or two, the weights shared: one training forward and one
    # backward over every sample's rows, each sample's weight gradients apart (functional's
    # grad_groups): bit for bit those calls, and each sample's own gradients to float32 rounding.
    hidden = 5
    proj = proj_of(hidden, projected)
    params = _params(rng, cell, 3, hidden, proj_size=proj)
    weights = [params[f"{n}_l0"] for n in _GRAD_NAMES[:4]]

    def loss(p, x, dy, lens):
        return jnp.sum(fj.forward(cell, p, x, lengths=lens)[0] * dy)

    per_sample = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0, 0)))
    for samples, rows in ((4, 1), (3, 2)):
        xs = rng.standard_normal((samples, 6, rows, 3)).astype(np.float32)
        dys = rng.standard_normal((samples, 6, rows, proj or hidden)).astype(np.float32)
        lengths = rng.integers(1, 7, (samples, rows))
        grads, dxs = per_sample(params, xs, dys, lengths)

        x_all, dy_all = (np.concatenate(list(a), axis=1) for a in (xs, dys))
        tape = fusedrnn.functional.layer_forward(cell, x_all, *weights, lengths=lengths.reshape(-1),
                                                 weight_hr=params.get("weight_hr_l0")).tape
        want = fusedrnn.functional.layer_backward(tape, dy_all, grad_groups=samples)
        for name in _GRAD_NAMES[:5 if proj else 4]:
            np.testing.assert_array_equal(np.asarray(grads[f"{name}_l0"]), getattr(want, name), err_msg=name)
        for i in range(samples):
            np.testing.assert_array_equal(np.asarray(dxs[i]), want.dx[:, i * rows:(i + 1) * rows])
            own, own_dx = jax.grad(loss, argnums=(0, 1))(params, xs[i], dys[i], lengths[i])
            assert_close(dxs[i], own_dx, np.float32, f"sample {i} dx")
            for name in own:
                assert_close(grads[name][i], own[name], np.float32, f"sample {i} {name}")


def test_per_sample_gradients_of_a_deep_bidirectional_stack(rng, x64):
    # Two bidirectional layers, initial states per sample: every layer's backward folds its samples
    # (both directions at once); float64 against each sample's own gradients.
    params = _params(rng, "lstm", 3, 4, num_layers=2, bidirectional=True, dtype=np.float64)
    xs = rng.standard_normal((5, 7, 1, 3))
    h0s, c0s = rng.standard_normal((2, 5, 4, 1, 4))

    def loss(p, x, h0, c0):
        y, (h_n, c_n) = fj.lstm(p, x, (h0, c0))
        return jnp.sum(jnp.sin(y)) + jnp.sum(h_n * c_n)

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)), in_axes=(None, 0, 0, 0)))(params, xs, h0s, c0s)
    for i in range(5):
        own = jax.grad(loss, argnums=(0, 1, 2, 3))(params, xs[i], h0s[i], c0s[i])
        jax.tree.map(lambda a, b: assert_close(a[i], b, np.float64, f"sample {i}"), grads, own)


def test_nested_vmap_and_mapped_states_with_a_shared_input(rng):
    # Inference with shared weights runs the mapped elements as one batch of N*B rows.
    params = _params(rng, "lstm", 2, 3, 2, True)
    xs = rng.standard_normal((2, 3, 4, 1, 2)).astype(np.float32)
    ys = jax.jit(jax.vmap(jax.vmap(lambda x: fj.lstm(params, x)[0])))(xs)
    y_all = fj.lstm(params, np.concatenate(list(xs.reshape(6, 4, 1, 2)), axis=1))[0]
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(np.asarray(ys[i, j]), np.asarray(y_all[:, 3 * i + j:3 * i + j + 1]))
            assert_close(ys[i, j], fj.lstm(params, xs[i, j])[0], np.float32, "y")

    x = xs[0, 0]
    h0s = rng.standard_normal((5, 4, 1, 3)).astype(np.float32)
    lengths = np.array([4, 2, 1, 3, 4])[:, None]
    run = lambda h0, lens: fj.lstm(params, x, (h0, h0 * 0.5), lengths=lens)  # noqa: E731
    ys, (h_n, c_n) = jax.vmap(run)(h0s, lengths)
    h0_all = np.concatenate(list(h0s), axis=1)
    y_all, (h_all, c_all) = fj.lstm(params, np.concatenate([x] * 5, axis=1), (h0_all, h0_all * 0.5),
                                    lengths=lengths.reshape(-1))
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(y_all[:, i:i + 1]))
        np.testing.assert_array_equal(np.asarray(h_n[i]), np.asarray(h_all[:, i:i + 1]))
        np.testing.assert_array_equal(np.asarray(c_n[i]), np.asarray(c_all[:, i:i + 1]))
        y_i, (h_i, c_i) = run(h0s[i], lengths[i])
        assert_close(ys[i], y_i, np.float32, "y")
        assert_close(c_n[i], c_i, np.float32, "c_n")


@needs_throwing_new
def test_a_call_out_of_memory_leaves_later_calls_working():
    """As the NumPy modules' test of this name (test_errors.py), through an XLA call: the scratch of
    x projected onto W_ih (2^48 bytes, the call bound to run whole) cannot be allocated; the error names the bytes and the next
    small call on the thread must work, not crash the process."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        import fusedrnn, fusedrnn.jax as fj
        params = fj.init(jax.random.key(0), "lstm", 1, 2**22, proj_size=1)
        fusedrnn._core.set_inference_chunk_bytes(1 << 62)
        small = jnp.ones((2, 1, 1), jnp.float32)
        before = np.asarray(fj.lstm(params, small)[0])
        try:
            fj.lstm(params, jnp.ones((2**22, 1, 1), jnp.float32))[0].block_until_ready()
        except Exception as e:
            print(type(e).__name__, e)
        print("again equal:", np.array_equal(np.asarray(fj.lstm(params, small)[0]), before))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"out of memory allocating 281474976710656 bytes \(262144\.0 GiB\)", out.stdout), out.stdout
    assert "again equal: True" in out.stdout, out.stdout


def test_release_scratch_frees_what_mapped_calls_kept_on_xlas_threads(rng):
    """Per-sample gradients under vmap keep the handler's arrays (the batched tape) between calls, on
    whichever thread XLA ran the call (its own, for calls not waited on); release_scratch frees them."""
    params = _params(rng, "lstm", 4, 16, 1, False)
    xs = rng.standard_normal((8, 30, 1, 4)).astype(np.float32)
    grads = jax.jit(jax.vmap(jax.grad(lambda p, x: fj.lstm(p, x)[0].sum()), in_axes=(None, 0)))
    want = jax.block_until_ready(grads(params, xs))
    fusedrnn.release_scratch()
    results = [grads(params, xs) for _ in range(4)]  # dispatched without waiting
    jax.block_until_ready(results)
    freed = fusedrnn.release_scratch()
    tape_bytes = 8 * 30 * 16 * 4 * (1 + 1 + 4)  # at least hs, cs and the saved gates of all 8 samples
    assert freed >= tape_bytes and fusedrnn.release_scratch() == 0
    again = jax.block_until_ready(grads(params, xs))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, want)


# ---- LSTM projection (proj_size), against torch.nn.LSTM --------------------------------------------

def _torch_lstm(torch, params, x, hx, lengths, cotangents, *, num_layers, bidirectional, batch_first):
    """torch.nn.LSTM(proj_size=P) on `params`: (y, h_n, c_n) and the gradients of sum(output *
    cotangent) with respect to every parameter (a dict), x, h0 and c0. Lengths run as a packed sequence."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    (proj, hidden), inp = params["weight_hr_l0"].shape, params["weight_ih_l0"].shape[1]
    dtype = getattr(torch, x.dtype.name)
    module = torch.nn.LSTM(inp, hidden, num_layers, bidirectional=bidirectional, batch_first=batch_first,
                           proj_size=proj, dtype=dtype)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    xt, h0, c0 = (torch.from_numpy(a).requires_grad_() for a in (x, *hx))
    if lengths is None:
        y, (h_n, c_n) = module(xt, (h0, c0))
    else:
        packed = pack_padded_sequence(xt, torch.from_numpy(np.asarray(lengths, np.int64)), batch_first=batch_first,
                                      enforce_sorted=False)
        out, (h_n, c_n) = module(packed, (h0, c0))
        y, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    sum(torch.sum(a * torch.from_numpy(w)) for a, w in zip((y, h_n, c_n), cotangents)).backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    return [a.detach().numpy() for a in (y, h_n, c_n)], grads, [a.grad.numpy() for a in (xt, h0, c0)]


def _fused_lstm(params, x, hx, lengths, cotangents, *, batch_first):
    """fusedrnn.jax's (y, h_n, c_n), the parameter gradients and those of x, h0, c0, as _torch_lstm's."""
    def loss(p, x, h0, c0):
        y, (h_n, c_n) = fj.lstm(p, x, (h0, c0), lengths=lengths, batch_first=batch_first)
        outputs = (y, h_n, c_n)
        return sum(jnp.sum(a * w) for a, w in zip(outputs, cotangents)), outputs

    with _dtype_context(x.dtype):
        (_, outputs), (g_params, *g_inputs) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            params, x, *hx)
    return outputs, g_params, g_inputs


def _projected_case(rng, dtype, steps, batch, inp, hidden, proj, *, num_layers=1, bidirectional=False,
                    with_lengths=False, batch_first=False):
    """Random parameters, x, (h0, c0), lengths (or None) and cotangents of (y, h_n, c_n)."""
    dirs = 2 if bidirectional else 1
    rows = num_layers * dirs
    params = _params(rng, "lstm", inp, hidden, num_layers, bidirectional, dtype=dtype, proj_size=proj)
    x = rng.standard_normal((batch, steps, inp) if batch_first else (steps, batch, inp)).astype(dtype)
    hx = tuple(rng.standard_normal((rows, batch, size)).astype(dtype) for size in (proj, hidden))
    lengths = random_lengths(rng, steps, batch) if with_lengths else None
    y_shape = (batch, steps, dirs * proj) if batch_first else (steps, batch, dirs * proj)
    cotangents = [rng.standard_normal(s).astype(dtype) for s in (y_shape, (rows, batch, proj), (rows, batch, hidden))]
    return params, x, hx, lengths, cotangents


def _assert_matches_torch(torch, case, dtype, **structure):
    params, x, hx, lengths, cotangents = case
    batch_first = structure.get("batch_first", False)
    expected, expected_grads, expected_inputs = _torch_lstm(torch, params, x, hx, lengths, cotangents, **structure)
    outputs, grads, input_grads = _fused_lstm(params, x, hx, lengths, cotangents, batch_first=batch_first)
    for name, a, b in zip(("y", "h_n", "c_n"), outputs, expected):
        assert_close(a, b, dtype, name)
    assert sorted(grads) == sorted(expected_grads)
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], dtype, name)
    for name, a, b in zip(("x", "h0", "c0"), input_grads, expected_inputs):
        assert_close(a, b, dtype, name)
    # Inference (no tape; the cell outputs in scratch) gives the training forward's outputs.
    with _dtype_context(dtype):
        y, (h_n, c_n) = fj.lstm(params, x, hx, lengths=lengths, batch_first=batch_first)
    for name, a, b in zip(("y", "h_n", "c_n"), (y, h_n, c_n), outputs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


TORCH_CONFIGS = [  # (num_layers, bidirectional, with_lengths, batch_first)
    (1, False, False, False),
    (2, True, True, False),
    (2, False, True, True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=str)
def test_projected_lstm_matches_torch_outputs_states_and_every_gradient(rng, config, dtype):
    torch = pytest.importorskip("torch")
    num_layers, bidirectional, with_lengths, batch_first = config
    structure = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    case = _projected_case(rng, dtype, 6, 4, 3, 7, 3, with_lengths=with_lengths, **structure)
    _assert_matches_torch(torch, case, dtype, **structure)


@pytest.mark.parametrize("shape", list(ODD_PROJECTED_SHAPES.values()), ids=list(ODD_PROJECTED_SHAPES))
def test_projected_lstm_at_odd_sizes_matches_torch(rng, shape):
    torch = pytest.importorskip("torch")
    steps, batch, inp, hidden, proj = shape
    structure = dict(num_layers=2, bidirectional=True, batch_first=False)
    case = _projected_case(rng, np.float64, steps, batch, inp, hidden, proj, with_lengths=True, **structure)
    _assert_matches_torch(torch, case, np.float64, **structure)


def test_projected_parameters_are_torchs_names_shapes_and_range():
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(5, 12, 2, bidirectional=True, proj_size=4)
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    shapes = fj.param_shapes("lstm", 5, 12, 2, bidirectional=True, proj_size=4)
    assert list(shapes.items()) == list(expected.items())      # names, order and shapes
    assert fj.param_names(2, bidirectional=True, proj_size=4) == list(expected)
    params = fj.init(jax.random.key(0), "lstm", 5, 12, 2, bidirectional=True, proj_size=4)
    assert {k: v.shape for k, v in params.items()} == expected
    bound = 1 / np.sqrt(12)
    assert all(float(jnp.abs(v).max()) <= bound for v in params.values())
    assert float(jnp.abs(params["weight_hr_l1_reverse"]).max()) > 0.5 * bound
    x = np.linspace(-1, 1, 30, dtype=np.float32).reshape(3, 2, 5)
    y, (h_n, c_n) = fj.lstm(params, x)
    assert y.shape == (3, 2, 8) and h_n.shape == (4, 2, 4) and c_n.shape == (4, 2, 12)
    # Unbatched (T, I): states (L*D, P) and (L*D, H), as the batch's row.
    y_1, (h_1, c_1) = fj.lstm(params, x[:, 1], (h_n[:, 1], c_n[:, 1]))
    y_b, (h_b, c_b) = fj.lstm(params, x[:, 1:], (h_n[:, 1:], c_n[:, 1:]))
    for a, b in ((y_1, y_b), (h_1, h_b), (c_1, c_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[:, 0])


def test_projection_bad_input_is_refused_naming_the_parameter(rng):
    params = _params(rng, "lstm", 3, 5, 2, True, proj_size=2)
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    h0, c0 = np.zeros((4, 2, 2), np.float32), np.zeros((4, 2, 5), np.float32)
    gru = {**_params(rng, "gru", 3, 5), "weight_hr_l0": np.zeros((2, 5), np.float32)}
    cases = [
        (lambda: fj.gru(gru, x), ValueError, "weight_hr_l0: 'gru' takes no projection"),
        (lambda: fj.lstm({**params, "weight_hr_l0": np.zeros((5, 5), np.float32)}, x), ValueError,
         "weight_hr_l0: expected shape (proj_size, 5) with 0 < proj_size < hidden_size"),
        (lambda: fj.lstm({**params, "weight_hr_l0": np.zeros((10,), np.float32)}, x), ValueError,
         "weight_hr_l0: expected shape (proj_size, 5)"),
        (lambda: fj.lstm({**params, "weight_hh_l0": np.zeros((20, 5), np.float32)}, x), ValueError,
         "weight_hh_l0: expected shape (20, 2), got (20, 5)"),
        (lambda: fj.lstm({**params, "weight_hh_l0": np.zeros((18, 2), np.float32)}, x), ValueError,
         "weight_hh_l0: expected 4*hidden_size rows"),
        (lambda: fj.lstm({**params, "weight_hr_l1_reverse": np.zeros((2, 4), np.float32)}, x), ValueError,
         "weight_hr_l1_reverse: expected shape (2, 5), got (2, 4)"),
        (lambda: fj.lstm({**params, "weight_ih_l1": np.zeros((20, 10), np.float32)}, x), ValueError,
         "weight_ih_l1: expected shape (20, 4), got (20, 10)"),           # the next layer reads D*P features
        (lambda: fj.lstm({k: v for k, v in params.items() if k != "weight_hr_l1"}, x), ValueError,
         "params: missing ['weight_hr_l1']"),
        (lambda: fj.lstm({**params, "weight_hr_l0": params["weight_hr_l0"].astype(np.float64)}, x), TypeError,
         "weight_hr_l0: expected dtype float32 (x's), got float64"),
        (lambda: fj.lstm(params, x, (np.zeros((4, 2, 5), np.float32), c0)), ValueError,
         "h0: expected shape (4, 2, 2)"),
        (lambda: fj.lstm(params, x, (h0, np.zeros((4, 2, 2), np.float32))), ValueError,
         "c0: expected shape (4, 2, 5)"),
        (lambda: fj.param_shapes("lstm", 3, 5, proj_size=5), ValueError, "proj_size: expected less than hidden_size"),
        (lambda: fj.param_shapes("gru", 3, 5, proj_size=2), ValueError, "proj_size: 'gru' takes no projection"),
        (lambda: fj.init(jax.random.key(0), "lstm", 3, 5, proj_size=-1), ValueError, "proj_size: expected an int >= 0"),
        (lambda: fj.init(jax.random.key(0), "lstm", 3, 5, proj_size=1.5), TypeError, "proj_size: expected an int"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
    # The handler refuses a projection for another cell too, whoever calls it.
    from fusedrnn.jax import _ffi

    weights = tuple(jnp.asarray(gru[k]) for k in ("weight_ih_l0", "weight_hh_l0", "weight_hr_l0"))
    empty = jnp.zeros((0,), jnp.float32)
    with pytest.raises(RUNTIME_ERRORS, match="weight_hr: only an LSTM takes a projection"):
        jax.block_until_ready(_ffi.layer(_ffi.LayerSpec("gru", 1, None), jnp.asarray(x), empty, empty,
                                         jnp.zeros((0,), jnp.int32), weights))


# ---- dropout -----------------------------------------------------------------------------------------

def test_dropout_masks_inner_layers_by_key_and_matches_the_reference(rng):
    params = _params(rng, "gru", 3, 4, 3)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    key = jax.random.key(7)
    y1, _ = fj.gru(params, x, dropout=0.5, dropout_key=key)
    y2, _ = fj.gru(params, x, dropout=0.5, dropout_key=key)
    y3, _ = fj.gru(params, x, dropout=0.5, dropout_key=jax.random.key(8))
    y_none, _ = fj.gru(params, x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert not np.array_equal(np.asarray(y1), np.asarray(y3))
    assert not np.array_equal(np.asarray(y1), np.asarray(y_none))
    np.testing.assert_array_equal(np.asarray(fj.gru(params, x, dropout=0.5)[0]), np.asarray(y_none))

    masks = [jnp.where(jax.random.bernoulli(jax.random.fold_in(key, layer), 0.5, (5, 2, 4)), 2.0, 0.0)
             for layer in range(2)]
    loss = lambda p: jnp.sum(fj.gru(p, x, dropout=0.5, dropout_key=key)[0] ** 2)  # noqa: E731
    def loss_ref(p):
        return jnp.sum(reference("gru", p, jnp.asarray(x), num_layers=3, dropout_masks=masks)[0] ** 2)

    assert_close(loss(params), loss_ref(params), np.float32, "loss")
    g, g_ref = jax.grad(loss)(params), jax.grad(loss_ref)(params)
    for name in params:
        assert_close(g[name], g_ref[name], np.float32, name)
    # p = 1 zeroes every inner output: the last layer sees only zeros.
    y_all, _ = fj.gru(params, x, dropout=1.0, dropout_key=key)
    y_zero_in = reference("gru", params, jnp.asarray(x), num_layers=3, dropout_masks=[0 * m for m in masks])[0]
    assert_close(y_all, y_zero_in, np.float32, "dropout=1")


# ---- init -----------------------------------------------------------------------------------------------

def test_init_draws_torch_shapes_and_range():
    params = fj.init(jax.random.key(0), "lstm", 10, 400, num_layers=2, bidirectional=True)
    assert list(params) == fj.param_names(2, bidirectional=True)
    assert params["weight_ih_l1_reverse"].shape == (1600, 800)
    assert params["bias_hh_l0"].shape == (1600,)
    values = np.asarray(params["weight_hh_l0"])
    bound = 1 / np.sqrt(400)
    assert values.min() >= -bound and values.max() <= bound
    # uniform(-b, b): mean 0, variance b^2/3 (640K draws: a few 1e-3 relative)
    assert abs(values.mean()) < 0.01 * bound
    assert abs(values.var() / (bound ** 2 / 3) - 1) < 0.01
    assert not np.array_equal(np.asarray(params["weight_hh_l0"]), np.asarray(params["weight_hh_l0_reverse"]))
    assert fj.init(jax.random.key(0), "rnn_tanh", 2, 3, dtype=np.float32)["weight_ih_l0"].dtype == np.float32


def test_bias_and_bidirectional_take_bools_only():
    # Truthiness would build biases for bias="no" and two directions for bidirectional="no".
    for option in ("bias", "bidirectional"):
        for value in ("no", None, 0):
            message = rf"^{option}: expected a bool, got {type(value).__name__}$"
            with pytest.raises(TypeError, match=message):
                fj.init(jax.random.key(0), "lstm", 3, 4, **{option: value})
            with pytest.raises(TypeError, match=message):
                fj.param_names(2, **{option: value})
            with pytest.raises(TypeError, match=message):
                fj.param_shapes("gru", 3, 4, **{option: value})
    assert fj.param_names(bias=np.bool_(False), bidirectional=np.bool_(True)) == [
        "weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse"]


def test_param_names_refuses_impossible_stacks_as_param_shapes_does():
    for num_layers, message in ((0, "got 0"), (-3, "got -3")):
        with pytest.raises(ValueError, match=rf"^num_layers: expected an int >= 1, {message}$"):
            fj.param_names(num_layers)
    with pytest.raises(ValueError, match=r"^proj_size: expected an int >= 0, got -1$"):
        fj.param_names(1, proj_size=-1)
    with pytest.raises(TypeError, match=r"^num_layers: expected an int, got float$"):
        fj.param_names(1.0)


# ---- concurrency -------------------------------------------------------------------------------------

def test_concurrent_calls_in_one_program_and_from_threads_are_bit_identical(rng):
    params = [_params(rng, "lstm", 8, 32, 2, True) for _ in range(4)]
    xs = [rng.standard_normal((20, 8, 8)).astype(np.float32) for _ in range(4)]

    def one(p, x):
        y, (h, c) = fj.lstm(p, x)
        return jnp.sum(y ** 2) + jnp.sum(h * c)

    # Four independent layer stacks (and their backward) in one jit program: XLA may run them at once.
    together = jax.jit(lambda ps, xs: [jax.grad(one)(p, x) for p, x in zip(ps, xs)])
    separate = [jax.grad(one)(p, x) for p, x in zip(params, xs)]
    expected = jax.tree.map(np.asarray, separate)
    for _ in range(3):
        got = together(params, xs)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), expected)

    results = [None] * 8
    step = jax.jit(jax.grad(one))

    def worker(i):
        results[i] = jax.tree.map(np.asarray, step(params[i % 4], xs[i % 4]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i in range(8):
        jax.tree.map(np.testing.assert_array_equal, results[i], expected[i % 4])


# ---- bad input -----------------------------------------------------------------------------------------

def test_numpy_arrays_of_the_other_byte_order_are_taken_as_their_values(rng):
    # JAX refuses non-native byte order; the values are the same, so they run as the native arrays do.
    from fusedrnn.jax import flax_params
    params = _params(rng, "gru", 3, 4)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    swapped = lambda a: np.asarray(a).astype(np.asarray(a).dtype.newbyteorder(">"))  # noqa: E731
    want = fj.gru(params, x)[0]
    got = fj.gru({k: swapped(v) for k, v in params.items()}, swapped(x))[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    flax = flax_params.to_flax("gru", {k: swapped(v) for k, v in params.items()})
    for name, entry in flax_params.to_flax("gru", params).items():
        np.testing.assert_array_equal(np.asarray(flax[name]["kernel"]), np.asarray(entry["kernel"]), err_msg=name)
    with pytest.raises(TypeError, match=r"^x: expected a JAX or NumPy array of numbers, got ndarray of dtype object"):
        fj.gru(params, x.astype(object))


def test_bad_input_is_refused_at_trace_time_naming_the_argument(rng):
    params = _params(rng, "lstm", 3, 4, 2)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    cases = [
        (lambda: fj.lstm(params, x.astype(np.float16)), TypeError, "x: expected float32 or float64"),
        (lambda: fj.lstm(params, x.astype(np.float64)), TypeError, "x: got dtype float64, which JAX runs as float32"),
        (lambda: fj.lstm(params, x[..., :2]), ValueError, "x: expected input_size 3"),
        (lambda: fj.lstm(params, x[:, :0]), ValueError, "x: empty input"),
        (lambda: fj.lstm(params, x[0, 0]), ValueError, "x: expected a 2-D or 3-D array"),
        (lambda: fj.lstm({**params, "weight_hh_l1": params["weight_hh_l1"][:, :3]}, x), ValueError,
         "weight_hh_l1: expected shape (16, 4)"),
        # Layer 0's weight_hh gives hidden_size: a wrong width is its own error, not weight_ih_l0's.
        (lambda: fj.lstm({**params, "weight_hh_l0": np.zeros((16, 5), np.float32)}, x), ValueError,
         "weight_hh_l0: expected shape (4*hidden_size, hidden_size) for cell 'lstm', got (16, 5)"),
        (lambda: fj.lstm({k: v for k, v in params.items() if k != "bias_ih_l1"}, x), ValueError,
         "params: missing ['bias_ih_l1']"),
        (lambda: fj.lstm({**params, "weight": x}, x), ValueError, "params: expected torch.nn names"),
        (lambda: fj.lstm({**params, "weight_hr_l0": np.zeros((2, 4), np.float32)}, x), ValueError,
         "params: missing ['weight_hr_l1']"),
        (lambda: fj.lstm(params, x, np.zeros((2, 2, 4), np.float32)), TypeError, "hx: expected a tuple (h0, c0)"),
        (lambda: fj.lstm(params, x, (np.zeros((2, 3, 4), np.float32),) * 2), ValueError,
         "h0: expected shape (2, 2, 4)"),
        (lambda: fj.gru(_params(rng, "gru", 3, 4), x, np.zeros((1, 2, 4))), TypeError,
         "hx: expected dtype float32 (x's), got float64"),
        (lambda: fj.lstm(params, x, lengths=[5, 6]), ValueError, "lengths: each length must be in [1, 5]"),
        (lambda: fj.lstm(params, x, lengths=[5]), ValueError, "lengths: expected shape (2,)"),
        (lambda: fj.lstm(params, x, lengths=[1.5, 2]), ValueError, "lengths: expected whole numbers"),
        (lambda: fj.lstm(params, x, cell_clip=-1.0), ValueError, "cell_clip: expected a positive finite bound"),
        (lambda: fj.gru(_params(rng, "gru", 3, 4), x, cell_clip=1.0), ValueError, "cell_clip: 'gru' has no cell"),
        (lambda: fj.lstm(params, x, dropout=1.5), ValueError, "dropout: expected a probability"),
        (lambda: fj.rnn(_params(rng, "rnn_tanh", 3, 4), x, nonlinearity="gelu"), ValueError, "nonlinearity"),
        (lambda: fj.forward("lstmx", params, x), ValueError, "cell: expected one of"),
        (lambda: jax.jit(lambda l: fj.lstm(params, x, lengths=l))(np.array([True, True])), TypeError,
         "lengths: expected integers, got dtype bool"),
        (lambda: fj.lstm({**params, "weight_ih_l1": None}, x), TypeError,
         "weight_ih_l1: expected a JAX or NumPy array of numbers, got NoneType"),
        (lambda: fj.lstm({**params, "bias_hh_l0": "b"}, x), TypeError, "bias_hh_l0: expected a JAX or NumPy array"),
        (lambda: fj.lstm(params, x, dropout=0.5, dropout_key=3), TypeError, "dropout_key: expected a PRNG key"),
        (lambda: fj.lstm(params, x, dropout=0.5, dropout_key=jax.random.split(jax.random.key(0), 3)), ValueError,
         "dropout_key: expected one PRNG key"),
        (lambda: fj.lstm(params, x, dropout="0.5"), TypeError, "dropout: expected a float in [0, 1], got str"),
        (lambda: jax.jit(lambda b: fj.lstm(params, x, batch_first=b))(True), TypeError,
         "batch_first: expected a Python bool (a static option: pass it outside the transformed function, or "
         "name it in jit's static_argnames), got a traced value"),
        (lambda: jax.jit(lambda c: fj.lstm(params, x, check_finite=c))(False), TypeError,
         "check_finite: expected a Python bool (a static option"),
        (lambda: jax.grad(lambda p: fj.lstm(params, x, dropout=p)[0].sum())(0.1), TypeError,
         "dropout: expected a Python float (a static option"),
        (lambda: jax.jit(lambda c: fj.lstm(params, x, cell_clip=c))(1.0), TypeError,
         "cell_clip: expected a Python float (a static option"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
    with _enable_x64(True):
        with pytest.raises(TypeError, match=r"weight_hh_l0: expected dtype float64 \(x's\), got float32"):
            fj.lstm(params, x.astype(np.float64))


def test_torch_tensors_are_refused_naming_the_argument(rng):
    torch = pytest.importorskip("torch")
    params = _params(rng, "gru", 3, 4)
    for x in (torch.zeros(5, 2, 3), torch.zeros(5, 2, 3, requires_grad=True)):
        with pytest.raises(TypeError, match=r"^x: expected a JAX or NumPy array of numbers, got Tensor"):
            fj.gru(params, x)


@pytest.mark.parametrize("where", ["x", "h0", "c0", "dy"])
def test_nan_and_inf_raise_at_run_time_naming_the_argument(rng, where):
    params = _params(rng, "lstm", 3, 4)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    h0 = np.zeros((1, 2, 4), np.float32)
    c0 = np.zeros((1, 2, 4), np.float32)
    bad = {"x": x, "h0": h0, "c0": c0}
    if where in bad:
        bad[where] = bad[where].copy()
        bad[where].flat[3] = np.nan if where != "c0" else np.inf
    dy = np.ones((5, 2, 4), np.float32)
    if where == "dy":
        dy[2, 1, 0] = np.inf

    def loss(p, x, h0, c0):
        return jnp.sum(fj.lstm(p, x, (h0, c0))[0] * dy)

    step = jax.jit(jax.grad(loss))
    for _ in range(2):  # the first call and a repeated one (JAX's fast dispatch path)
        with pytest.raises(RUNTIME_ERRORS, match=f"INVALID_ARGUMENT: {where}: contains NaN or infinite"):
            jax.block_until_ready(step(params, bad["x"], bad["h0"], bad["c0"]))
    # check_finite=False skips the checks (the NaN then propagates; an infinite c0 saturates tanh).
    y, (_, c_n) = fj.lstm(params, bad["x"], (bad["h0"], bad["c0"]), check_finite=False)
    if where in ("x", "h0"):
        assert np.isnan(np.asarray(y)).any()
    if where == "c0":
        assert not np.isfinite(np.asarray(c_n)).all()
    # jit traces keywords
    with pytest.raises(TypeError, match=r"check_finite: expected a Python bool \(a static option"):
        jax.jit(lambda x, check: fj.lstm(params, x, check_finite=check))(bad["x"], False)


def test_bad_traced_lengths_raise_at_run_time(rng):
    params = _params(rng, "gru", 3, 4, 1, True)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    f = jax.jit(lambda lens: fj.gru(params, x, lengths=lens)[0])
    for lens, value, index in (([5, 0, 2], 0, 1), ([5, 2, 6], 6, 2)):
        with pytest.raises(RUNTIME_ERRORS,
                           match=rf"lengths: each length must be in \[1, 5\] \(T\), got {value} at index {index}"):
            jax.block_until_ready(f(jnp.array(lens)))
    np.testing.assert_array_equal(np.asarray(f(jnp.array([5, 1, 2]))),
                                  np.asarray(fj.gru(params, x, lengths=[5, 1, 2])[0]))
    # Under vmap (one folded call) the mapped element is not named, the row within it is.
    with pytest.raises(RUNTIME_ERRORS, match=r"got 0 at index 1"):
        jax.block_until_ready(jax.vmap(f)(jnp.array([[5, 1, 2], [5, 0, 2]])))
    x_nan = np.stack([x, x])
    x_nan[1, 2, 0, 1] = np.nan
    with pytest.raises(RUNTIME_ERRORS, match="x: contains NaN"):
        jax.block_until_ready(jax.vmap(lambda x: fj.gru(params, x)[0])(x_nan))


def test_lengths_as_lists_and_whole_floats_run_alike_eager_and_under_jit(rng):
    params = _params(rng, "gru", 3, 4, 1, True)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    want = np.asarray(fj.gru(params, x, lengths=np.array([5, 1, 2]))[0])
    f = jax.jit(lambda lens: fj.gru(params, x, lengths=lens)[0])
    for lens in ([5, 1, 2], (5, 1, 2), np.array([5.0, 1.0, 2.0]), [5.0, 1.0, 2.0],
                 np.array([5, 1, 2], np.float16)):
        np.testing.assert_array_equal(np.asarray(fj.gru(params, x, lengths=lens)[0]), want)
        np.testing.assert_array_equal(np.asarray(f(lens)), want)
    # A traced float that is not a whole length in range is reported at its index at run time.
    for lens, index in (([5.0, 1.5, 2.0], 1), ([5.0, 1.0, np.nan], 2), ([np.inf, 1.0, 2.0], 0), ([5.0, 1.0, 3e9], 2)):
        with pytest.raises(ValueError, match=r"^lengths: "):
            fj.gru(params, x, lengths=np.array(lens, np.float32))
        with pytest.raises(RUNTIME_ERRORS, match=rf"lengths: each length must be in \[1, 5\] \(T\), got 0 at "
                                                 rf"index {index}"):
            jax.block_until_ready(f(np.array(lens, np.float32)))
    with pytest.raises(RUNTIME_ERRORS, match=r"got 7 at index 0"):
        jax.block_until_ready(f(np.array([7.0, 1.0, 2.0], np.float32)))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\)"):
        f([5, 1])


@pytest.mark.parametrize("where", ["x", "h0", "c0"])
def test_eager_calls_refuse_nan_in_the_callers_arrays_with_a_value_error(rng, where):
    """Arrays known at the call (no jit) are checked before it runs, so the error is a ValueError
    whatever the call's history; JAX raises the kernel's run-time error as JaxRuntimeError or, on its
    fast path for a call it ran before, as ValueError."""
    params = _params(rng, "lstm", 3, 4)
    good = {"x": rng.standard_normal((5, 2, 3)).astype(np.float32), "h0": np.zeros((1, 2, 4), np.float32),
            "c0": np.zeros((1, 2, 4), np.float32)}
    bad = dict(good, **{where: good[where].copy()})
    bad[where][0, 1, 2] = np.nan if where != "c0" else -np.inf
    for arrays in (bad, good, bad, {k: jnp.asarray(v) for k, v in bad.items()}):
        if arrays is good:
            jax.block_until_ready(fj.lstm(params, arrays["x"], (arrays["h0"], arrays["c0"])))
            continue
        with pytest.raises(ValueError, match=rf"^{where}: contains NaN or infinite values$"):
            fj.lstm(params, arrays["x"], (arrays["h0"], arrays["c0"]))
    # Under jax.grad with x known the check runs too; check_finite=False skips it.
    with pytest.raises(ValueError, match=rf"^{where}: contains NaN"):
        jax.grad(lambda p: jnp.sum(fj.lstm(p, bad["x"], (bad["h0"], bad["c0"]))[0]))(params)
    y, (_, c_n) = fj.lstm(params, bad["x"], (bad["h0"], bad["c0"]), check_finite=False)
    assert not np.isfinite(np.asarray(c_n if where == "c0" else y)).all()
    # Unbatched input and a GRU's state, named as the call names them.
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        fj.gru(_params(rng, "gru", 3, 4), np.full((5, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"^hx: contains NaN"):
        fj.gru(_params(rng, "gru", 3, 4), good["x"][:, 0], np.full((1, 4), np.nan, np.float32))


def test_per_sample_gradients_raise_run_time_errors_naming_the_argument(rng):
    # The folded training calls check each sample as the call a sample did.
    params = _params(rng, "lstm", 3, 4)
    xs = rng.standard_normal((3, 5, 1, 3)).astype(np.float32)
    dys = rng.standard_normal((3, 5, 1, 4)).astype(np.float32)
    loss = lambda p, x, dy, lens: jnp.sum(fj.lstm(p, x, lengths=lens)[0] * dy)  # noqa: E731
    per_sample = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))
    lengths = np.array([[5], [2], [3]])
    jax.block_until_ready(per_sample(params, xs, dys, lengths))
    with pytest.raises(RUNTIME_ERRORS, match=r"lengths: each length must be in \[1, 5\] \(T\), got 6 at index 0"):
        jax.block_until_ready(per_sample(params, xs, dys, np.array([[5], [6], [3]])))
    for bad_x, bad_dy, name in ((True, False, "x"), (False, True, "dy")):
        x_bad, dy_bad = xs.copy(), dys.copy()
        (x_bad if bad_x else dy_bad)[2, 1, 0, 0] = np.nan
        with pytest.raises(RUNTIME_ERRORS, match=f"{name}: contains NaN"):
            jax.block_until_ready(per_sample(params, x_bad, dy_bad, lengths))


def test_wide_traced_lengths_are_not_narrowed_into_range(rng):
    params = _params(rng, "gru", 3, 4, 1, True)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    f = jax.jit(lambda lens: fj.gru(params, x, lengths=lens)[0])
    want = np.asarray(fj.gru(params, x, lengths=[3, 5])[0])
    with _enable_x64(True):  # int64 lengths exist only with x64; 2**32 + 3 would wrap to 3 in int32
        for value in (2**32 + 3, -(2**32) + 3):
            with pytest.raises(RUNTIME_ERRORS, match=rf"got {value} at index 0"):
                jax.block_until_ready(f(jnp.array([value, 5], jnp.int64)))
        np.testing.assert_array_equal(np.asarray(f(jnp.array([3, 5], jnp.int64))), want)
        with pytest.raises(RUNTIME_ERRORS, match=rf"got {2**64 - 3} at index 1"):  # past int64's range
            jax.block_until_ready(f(jnp.array([3, 2**64 - 3], jnp.uint64)))
        np.testing.assert_array_equal(np.asarray(f(jnp.array([3, 5], jnp.uint64))), want)
    # Unsigned 32-bit lengths past int32 are read as they are, and reported so; small ones run as given.
    with pytest.raises(RUNTIME_ERRORS, match=rf"got {2**31 + 3} at index 0"):
        jax.block_until_ready(f(jnp.array([2**31 + 3, 5], jnp.uint32)))
    for dtype in (jnp.uint32, jnp.uint8, jnp.int16):
        np.testing.assert_array_equal(np.asarray(f(jnp.array([3, 5], dtype))), want)


def test_forward_mode_and_second_derivatives_raise_clear_errors(rng):
    params = _params(rng, "rnn_tanh", 3, 4)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    f = lambda x: jnp.sum(fj.rnn(params, x)[0] ** 2)  # noqa: E731
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(f, (x,), (x,))
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jacfwd(f)(x)
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.hessian(f)(x)  # forward over reverse
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.grad(lambda x: jnp.sum(jax.grad(f)(x)))(x)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.grad(lambda x: jnp.sum(jax.grad(f)(x) * x))(x)  # a gradient penalty's shape
    with pytest.raises(NotImplementedError, match="second derivatives"):  # the gradient used beside the value
        jax.grad(lambda x: sum(jax.tree.leaves(jax.tree.map(jnp.sum, jax.value_and_grad(f)(x)))))(x)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_first_derivatives_of_programs_that_take_a_gradient_match_the_reference(x64, rng, cell):
    """A derivative of a program that takes a gradient is still a first derivative where that gradient
    is cut by stop_gradient (an adversarial example, a sharpness-aware step) or only its value is used;
    these were refused as second derivatives."""
    params = _params(rng, cell, 3, 4, 2, dtype=np.float64)
    x = rng.standard_normal((6, 3, 3))
    fused = lambda p, x: fj.forward(cell, p, x)[0]  # noqa: E731
    lax_scan = lambda p, x: reference(cell, p, x, num_layers=2)[0]  # noqa: E731
    results = []
    for run in (fused, lax_scan):
        def loss(p, x):
            return jnp.sum(jnp.sin(run(p, x)))

        def adversarial(p):
            step = jax.lax.stop_gradient(jax.grad(loss, argnums=1)(p, x))
            return loss(p, x + 0.1 * jnp.sign(step))

        def sharpness_aware(p):
            step = jax.lax.stop_gradient(jax.grad(loss)(p, x))
            return loss(jax.tree.map(lambda w, g: w + 0.05 * g, p, step), x)

        def value_only(p):
            return jax.value_and_grad(loss)(p, x)[0]

        results.append([jax.grad(f)(params) for f in (adversarial, sharpness_aware, value_only)])
    for got, want in zip(*results):
        for name in params:
            assert_close(got[name], want[name], np.float64, name)


def test_handlers_built_for_a_newer_jaxlib_are_refused_with_advice(monkeypatch):
    from fusedrnn import _core
    from fusedrnn.jax import _ffi

    monkeypatch.setattr(_core, "jax_ffi_built_with_jaxlib", "99.0.0")
    monkeypatch.setattr(_ffi, "_registered", False)
    with pytest.raises(ImportError, match=r"built against jaxlib 99.0.0, newer than the installed jaxlib .* "
                                          r"upgrade jaxlib to >= 99.0.0 or rebuild fusedrnn"):
        _ffi.register()
    monkeypatch.undo()
    assert _ffi._registered  # the real registration stands
    assert _ffi._version("0.10.2") > _ffi._version("0.7.1") and _ffi._version("0.9.0.1") == (0, 9, 0)


def test_info_reports_the_handlers_build(capsys):
    import jaxlib.version

    from fusedrnn import _core, cli

    built = fusedrnn.build_info()["jax_ffi"]
    assert built == _core.jax_ffi_built_with_jaxlib
    assert fj._ffi._version(built) <= fj._ffi._version(jaxlib.version.__version__)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"XLA FFI handlers (fusedrnn.jax): built against jaxlib {built}" in out
    assert "fusedrnn.jax" in out.split("Benchmark peers available:")[1]


def test_finiteness_checks_name_the_callers_arrays_not_those_between_layers(rng):
    params = _params(rng, "rnn_relu", 3, 4, 2)
    params["weight_ih_l0"] = np.full((4, 3), 1e38, np.float32)  # layer 0's output overflows to inf
    x = np.abs(rng.standard_normal((5, 2, 3))).astype(np.float32)
    y = jax.block_until_ready(fj.rnn(params, x, nonlinearity="relu")[0])
    assert not np.isfinite(np.asarray(y)).all()        # as the NumPy modules: no check between layers
    x_bad = x.copy()
    x_bad[0, 0, 0] = np.nan
    h0 = np.zeros((2, 2, 4), np.float32)
    h0[1, 1, 1] = np.inf                                 # the second layer's state is the caller's
    finite_params = _params(rng, "rnn_relu", 3, 4, 2)
    run = jax.jit(lambda p, x, h0: fj.rnn(p, x, h0, nonlinearity="relu")[0])
    with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: x: contains NaN"):
        jax.block_until_ready(run(params, x_bad, None))
    with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: h0: contains NaN"):
        jax.block_until_ready(run(finite_params, x, h0))
    with pytest.raises(ValueError, match="^x: contains NaN"):      # eager: checked before the call
        fj.rnn(params, x_bad, nonlinearity="relu")
    with pytest.raises(ValueError, match="^hx: contains NaN"):
        fj.rnn(finite_params, x, h0, nonlinearity="relu")


def test_per_sample_gradients_from_threads_on_an_oversized_team_are_bit_identical(rng):
    # Folded calls take per-thread scratch: eight threads at once, on a team of five (more ranks than
    # these machines' cores), each get a quiet run's bits.
    params = _params(rng, "gru", 6, 16, 2, True)
    xs = rng.standard_normal((4, 12, 9, 1, 6)).astype(np.float32)
    per_sample = jax.jit(jax.vmap(jax.grad(lambda p, x: jnp.sum(fj.gru(p, x)[0] ** 2)), in_axes=(None, 0)))
    previous = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(5)
    try:
        expected = [jax.tree.map(np.asarray, per_sample(params, x)) for x in xs]
        results = [None] * 8

        def worker(i):
            results[i] = jax.tree.map(np.asarray, per_sample(params, xs[i % 4]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        fusedrnn.set_num_threads(previous)
    assert not any(t.is_alive() for t in threads)
    for i in range(8):
        jax.tree.map(np.testing.assert_array_equal, results[i], expected[i % 4])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_tape_holds_no_stale_values_at_padded_steps(cell):
    """Backward never reads the tape's gate values at a row's padded steps, but the tape is the forward
    call's result: jax.debug_nans checks every value of it, so it must not be whatever the memory held
    (freed NaN here)."""
    params = fj.init(jax.random.key(0), cell, 4, 6, bidirectional=True)
    x = jax.random.normal(jax.random.key(1), (5, 3, 4))
    lengths = jnp.array([5, 1, 3])

    def loss(p):
        return jnp.sum(fj.forward(cell, p, x, lengths=lengths)[0] ** 2)

    expected = jax.grad(loss)(params)
    for _ in range(3):
        stale = jnp.full((5, 3, 64), jnp.nan).block_until_ready()
        del stale
        with jax.debug_nans(True):
            got = jax.grad(loss)(params)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])

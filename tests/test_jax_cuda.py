"""fusedrnn.jax's device handlers (the CUDA backend's layer calls inside XLA programs).

On every machine: the handlers' device body over the emulated device (registered as CPU targets) against
the CPU handlers, through jit, grad and vmap, with lengths, both directions and every cell; its run-time
errors; the handler that GPU calls reach when the CUDA module is missing. On a GPU (a jax GPU device and
fusedrnn's CUDA module with its handlers; skipped otherwise): the CUDA handlers against the CPU path and a
lax.scan reference, gradients, jit, vmap and the run-time errors. Every cell includes the LSTM with a
projection (proj_size)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fusedrnn.jax as fj  # noqa: E402
from fusedrnn import _core  # noqa: E402
from fusedrnn.jax import _ffi  # noqa: E402
from helpers import CELL_CASES, CELLS, assert_close, has_cell_state, proj_of  # noqa: E402
from test_jax import RUNTIME_ERRORS, _dtype_context, _params, reference  # noqa: E402

_EMULATED = "_emulated_device"
for _name, _capsule in _core.jax_ffi_emulated_device_targets.items():
    jax.ffi.register_ffi_target(_name + _EMULATED, _capsule, platform="cpu")


@pytest.fixture(autouse=True)
def _cpu_by_default():
    """Arrays not put on the GPU explicitly live on the CPU, where the targets registered here for the
    CPU (the emulated device's, the unavailable ones) are found, also where jax's default is a GPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@contextlib.contextmanager
def _targets(suffix):
    """fusedrnn.jax's calls go to the handlers registered as the usual names + suffix."""
    forward, backward = _ffi._FORWARD, _ffi._BACKWARD
    _ffi._FORWARD, _ffi._BACKWARD = forward + suffix, backward + suffix
    jax.clear_caches()  # programs traced before name the usual targets
    try:
        yield
    finally:
        _ffi._FORWARD, _ffi._BACKWARD = forward, backward
        jax.clear_caches()


HIDDEN = 5


def _case(rng, cell, num_layers, bidirectional, with_lengths, with_state, dtype, batch=3, steps=6, proj=0):
    params = _params(rng, cell, 4, HIDDEN, num_layers, bidirectional, dtype=dtype, proj_size=proj)
    x = rng.standard_normal((steps, batch, 4)).astype(dtype)
    rows = num_layers * (2 if bidirectional else 1)
    state = None
    if with_state:
        h0 = rng.standard_normal((rows, batch, proj or HIDDEN)).astype(dtype)
        state = (h0, rng.standard_normal((rows, batch, HIDDEN)).astype(dtype)) if has_cell_state(cell) else h0
    lengths = rng.integers(1, steps + 1, batch).astype(np.int32) if with_lengths else None
    return params, x, state, lengths


def _outputs_and_grads(cell, params, x, state, lengths, weights):
    """(y, state, grads of a weighted sum of them with respect to params, x and the state), jitted."""
    def loss(p, x, state):
        y, out = fj.forward(cell, p, x, state, lengths=lengths)
        total = jnp.sum(y * weights[0]) + sum(jnp.sum(s * w) for s, w in zip(jax.tree.leaves(out), weights[1:]))
        return total, (y, out)

    argnums = (0, 1) if state is None else (0, 1, 2)
    (_, (y, out)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(params, x, state)
    return jax.device_get((y, out, grads))


def _weights(rng, x, state, cell, num_layers, bidirectional, dtype, proj=0):
    rows = num_layers * (2 if bidirectional else 1)
    width = proj or HIDDEN
    shapes = [(x.shape[0], x.shape[1], width * (2 if bidirectional else 1)), (rows, x.shape[1], width)]
    shapes += [(rows, x.shape[1], HIDDEN)] if has_cell_state(cell) else []
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _assert_trees_close(actual, expected, dtype):
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for i, (a, e) in enumerate(zip(leaves_a, leaves_e)):
        assert_close(a, e, dtype, f"leaf {i}")


CONFIGS = [  # (num_layers, bidirectional, with_lengths, with_state)
    (1, False, False, False),
    (2, True, True, True),
    (1, True, True, False),
]


# ---- the device body over the emulated device, on every machine ------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_emulated_device_handlers_match_the_cpu_handlers(rng, cell, projected, config, dtype):
    proj = proj_of(HIDDEN, projected)
    with _dtype_context(dtype):
        params, x, state, lengths = _case(rng, cell, *config, dtype, proj=proj)
        weights = _weights(rng, x, state, cell, config[0], config[1], dtype, proj)
        expected = _outputs_and_grads(cell, params, x, state, lengths, weights)
        with _targets(_EMULATED):
            actual = _outputs_and_grads(cell, params, x, state, lengths, weights)
    _assert_trees_close(actual, expected, dtype)


@pytest.mark.parametrize("proj", [0, 2])
def test_emulated_device_handlers_under_vmap_match_the_cpu_handlers(rng, proj):
    cell = "lstm"
    params = _params(rng, cell, 3, 5, 2, True, proj_size=proj)
    xs = rng.standard_normal((3, 4, 2, 3)).astype(np.float32)
    lengths = np.array([[4, 2], [1, 4], [3, 3]], np.int32)
    stacked = {k: np.stack([v, v * 0.5, -v]) for k, v in params.items()}

    def run():
        # Shared weights, inference and per-sample gradients (the elements folded into one layer call
        # of all their rows: on the CPU with at most two rows an element in training, on the device
        # always), and per-element weights with their gradients (a call an element).
        shared = jax.jit(jax.vmap(lambda x, n: fj.lstm(params, x, lengths=n)[0]))(xs, lengths)
        loss = lambda p, x, n: jnp.sum(fj.lstm(p, x, lengths=n)[0] ** 2)  # noqa: E731
        per_sample = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0)))(params, xs, lengths)
        grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(stacked, xs, lengths)
        return jax.device_get((shared, per_sample, grads))

    expected = run()
    with _targets(_EMULATED):
        actual = run()
    _assert_trees_close(actual, expected, np.float32)


def test_emulated_device_handlers_raise_run_time_errors_naming_the_argument(rng):
    params = _params(rng, "gru", 3, 4, 1, True)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    x_nan = x.copy()
    x_nan[2, 1, 0] = np.nan
    dy = np.ones((5, 3, 8), np.float32)
    dy[4, 0, 1] = np.inf
    with _targets(_EMULATED):
        f = jax.jit(lambda x, lens: fj.gru(params, x, lengths=lens)[0])
        with pytest.raises(RUNTIME_ERRORS, match=r"lengths: each length must be in \[1, 5\] \(T\), got 6 at index 2"):
            jax.block_until_ready(f(x, jnp.array([5, 2, 6])))
        with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: x: contains NaN or infinite"):
            jax.block_until_ready(f(x_nan, jnp.array([5, 2, 3])))
        h0 = np.zeros((2, 3, 4), np.float32)
        h0[1, 2, 3] = np.inf
        with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: h0: contains NaN or infinite"):
            jax.block_until_ready(jax.jit(lambda h: fj.gru(params, x, h)[0])(h0))  # eager: checked before
        grad = jax.jit(jax.grad(lambda x: jnp.sum(fj.gru(params, x)[0] * dy)))
        with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: dy: contains NaN or infinite"):
            jax.block_until_ready(grad(x))
        # Folded under vmap (per-sample gradients), each element is checked as before.
        per_sample = jax.jit(jax.vmap(jax.grad(lambda x, dy: jnp.sum(fj.gru(params, x)[0] * dy))))
        with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: x: contains NaN or infinite"):
            jax.block_until_ready(per_sample(np.stack([x, x_nan]), np.ones((2, 5, 3, 8), np.float32)))
        with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: dy: contains NaN or infinite"):
            jax.block_until_ready(per_sample(np.stack([x, x]), np.stack([np.ones_like(dy), dy])))
        # The same call with good input runs, and equals the CPU handlers' below.
        good = np.asarray(f(x, jnp.array([5, 2, 3])))
    np.testing.assert_allclose(good, np.asarray(fj.gru(params, x, lengths=[5, 2, 3])[0]), rtol=1e-5, atol=1e-6)


def test_gpu_calls_without_the_cuda_handlers_fail_saying_what_to_install(rng):
    """The handlers registered for CUDA when the CUDA module's cannot be used, run here as CPU targets:
    they take the calls (forward, and backward through grad) and fail with the message fusedrnn.jax
    gave them."""
    for name, capsule in _core.jax_ffi_unavailable_targets.items():
        jax.ffi.register_ffi_target(name + "_unavailable", capsule, platform="cpu")
    params = _params(rng, "lstm", 3, 4)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    _, why_not = _ffi.cuda_handlers()
    try:
        _core.set_jax_ffi_unavailable_reason(_ffi.unavailable_message("it cannot be used (no cuBLAS)"))
        with _targets("_unavailable"):
            for _ in range(2):  # the first call and a repeated one (JAX's fast dispatch path)
                with pytest.raises(RUNTIME_ERRORS, match=r"arrays on a GPU need the XLA FFI handlers of fusedrnn's "
                                                         r"CUDA module, and it cannot be used \(no cuBLAS\)\. "
                                                         r"To get them: pip install 'fusedrnn\[cuda\]'"):
                    jax.block_until_ready(fj.lstm(params, x)[0])
            # The backward target on its own (through grad, the forward would fail first).
            weights = tuple(jnp.asarray(params[k]) for k in fj.param_names(1))
            empty = jnp.zeros((0,), jnp.float32)
            state = jnp.zeros((1, 2, 4), jnp.float32)
            with pytest.raises(RUNTIME_ERRORS, match="arrays on a GPU need the XLA FFI handlers"):
                jax.block_until_ready(_ffi.layer_backward(_ffi.LayerSpec("lstm", 1, None), jnp.asarray(x),
                                                          jnp.zeros((0,), jnp.int32), (empty,) * 4,
                                                          jnp.zeros((5, 2, 4), jnp.float32), state, state,
                                                          weights))
    finally:
        if why_not is not None:  # as register() left it
            _core.set_jax_ffi_unavailable_reason(_ffi.unavailable_message(why_not))


def test_cuda_handlers_are_used_only_when_the_module_loads_with_handlers_for_this_jaxlib(monkeypatch):
    from fusedrnn import _cuda_layer

    class Module:
        jax_ffi_targets = {"fusedrnn_layer_forward": object(), "fusedrnn_layer_backward": object()}
        jax_ffi_built_with_jaxlib = "0.7.1"

    def fails():
        raise ImportError("fusedrnn's CUDA module does not load: libcublas.so.13: not found")

    monkeypatch.setattr(_cuda_layer, "cuda_module", fails)
    assert _ffi.cuda_handlers() == (None, "it cannot be used (fusedrnn's CUDA module does not load: "
                                          "libcublas.so.13: not found)")
    monkeypatch.setattr(_cuda_layer, "cuda_module", lambda: Module)
    assert _ffi.cuda_handlers() == (Module.jax_ffi_targets, None)
    monkeypatch.setattr(Module, "jax_ffi_built_with_jaxlib", "99.0.0")
    targets, why_not = _ffi.cuda_handlers()
    assert targets is None and why_not.startswith("they were built against jaxlib 99.0.0, newer than the installed")
    monkeypatch.delattr(Module, "jax_ffi_targets")
    assert _ffi.cuda_handlers() == (None, "it was built without them (no jaxlib at build time)")


# ---- the CUDA handlers on a GPU ------------------------------------------------------------------

def _gpu():
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0] if devices else None


GPU = _gpu()
needs_gpu = pytest.mark.skipif(GPU is None or _ffi.cuda_handlers()[0] is None,
                               reason="needs a jax GPU device and fusedrnn's CUDA module with its XLA FFI handlers")


def _on(device, tree):
    return jax.device_put(tree, device)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_cuda_handlers_match_the_cpu_handlers(rng, cell, projected, config, dtype):
    proj = proj_of(HIDDEN, projected)
    with _dtype_context(dtype):
        params, x, state, lengths = _case(rng, cell, *config, dtype, proj=proj)
        weights = _weights(rng, x, state, cell, config[0], config[1], dtype, proj)
        cpu = jax.devices("cpu")[0]
        expected = _outputs_and_grads(cell, *_on(cpu, (params, x, state, lengths, weights)))
        actual = _outputs_and_grads(cell, *_on(GPU, (params, x, state, lengths, weights)))
    _assert_trees_close(actual, expected, dtype)


@needs_gpu
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_handlers_match_a_lax_scan_reference(rng, cell):
    with _dtype_context(np.float64):
        params, x, state, lengths = _case(rng, cell, 2, True, True, True, np.float64)
        h0, c0 = state if has_cell_state(cell) else (state, None)
        params, x, state, lengths = _on(GPU, (params, x, state, lengths))
        y, out = jax.jit(lambda p, x, s, n: fj.forward(cell, p, x, s, lengths=n))(params, x, state, lengths)
        y_ref, h_ref, c_ref = reference(cell, jax.device_get(params), jax.device_get(x), h0, c0,
                                        jax.device_get(lengths), num_layers=2, bidirectional=True)
        assert list(y.devices()) == [GPU]
        assert_close(y, y_ref, np.float64, "y")
        assert_close(jax.tree.leaves(out)[0], h_ref, np.float64, "h_n")
        if has_cell_state(cell):
            assert_close(out[1], c_ref, np.float64, "c_n")


@needs_gpu
@pytest.mark.parametrize("cell, proj", [("gru", 0), ("lstm", 2)])
def test_cuda_handlers_under_vmap_match_the_cpu_handlers(rng, cell, proj):
    params = _params(rng, cell, 3, 5, 2, True, proj_size=proj)
    xs = rng.standard_normal((3, 4, 2, 3)).astype(np.float32)
    lengths = np.array([[4, 2], [1, 4], [3, 3]], np.int32)
    stacked = {k: np.stack([v, v * 0.5, -v]) for k, v in params.items()}

    def run(device):
        p, s, x, n = _on(device, (params, stacked, xs, lengths))
        shared = jax.jit(jax.vmap(lambda x, n: fj.forward(cell, p, x, lengths=n)[0]))(x, n)
        loss = lambda p, x, n: jnp.sum(fj.forward(cell, p, x, lengths=n)[0] ** 2)  # noqa: E731
        per_sample = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0)))(p, x, n)
        grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(s, x, n)
        return jax.device_get((shared, per_sample, grads))

    _assert_trees_close(run(GPU), run(jax.devices("cpu")[0]), np.float32)


@needs_gpu
def test_cuda_handlers_raise_run_time_errors_naming_the_argument(rng):
    params = _on(GPU, _params(rng, "lstm", 3, 4, 1, True))
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    x_nan = x.copy()
    x_nan[2, 1, 0] = np.nan
    f = jax.jit(lambda x, lens: fj.lstm(params, x, lengths=lens)[0])
    with pytest.raises(RUNTIME_ERRORS, match=r"lengths: each length must be in \[1, 5\] \(T\), got 0 at index 1"):
        jax.block_until_ready(f(_on(GPU, x), _on(GPU, jnp.array([5, 0, 3]))))
    with pytest.raises(RUNTIME_ERRORS, match="INVALID_ARGUMENT: x: contains NaN or infinite"):
        jax.block_until_ready(f(_on(GPU, x_nan), _on(GPU, jnp.array([5, 2, 3]))))
    # The device is usable after the errors: a good call runs and matches the CPU handlers.
    good = f(_on(GPU, x), _on(GPU, jnp.array([5, 2, 3])))
    cpu = jax.devices("cpu")[0]
    expected = fj.lstm(_on(cpu, params), _on(cpu, x), lengths=_on(cpu, jnp.array([5, 2, 3])))[0]
    assert_close(good, expected, np.float32, "y")

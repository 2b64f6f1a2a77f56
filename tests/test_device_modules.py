"""Modules whose parameters and gradients live on a CUDA device (`module.to("cuda")`): forward and
backward there against the same module on the host, optimisers and clipping on device arrays, state
dicts across devices, and every mix of devices refused by name.

Each test runs twice: on the host stand-ins for CuPy and the CUDA module (fake_cuda: the device code's
host emulation on NumPy memory that says it is on a CUDA device), everywhere; and on a real GPU with
CuPy, skipped cleanly without one."""

import re
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _cuda_layer, _device, bptt, demo, gradients, losses, optim, sequences
from helpers import CELL_CASES, assert_close, has_cell_state, make_module, proj_of, random_lengths

import fake_cuda


def _real_cupy():
    if not fusedrnn.build_info()["cuda"]["loaded"]:
        return None
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # not installed, or no usable device
        return None


@pytest.fixture(params=["emulated", "gpu"])
def cp(request, monkeypatch):
    """The array library of the device under test: the host stand-in, or CuPy on a GPU."""
    if request.param == "emulated":
        return fake_cuda.installed(monkeypatch)
    real = _real_cupy()
    if real is None:
        pytest.skip("needs a GPU, the CUDA module and CuPy")
    return real


def _pair(cell, projected=False, **kwargs):
    """The same module twice (same seed): one stays on the host, one is moved to device 0."""
    kwargs = dict(dict(num_layers=2, bidirectional=True, dtype=np.float64, seed=5), **kwargs)
    if projected:
        kwargs["proj_size"] = proj_of(8, True)
    on_host, on_device = (make_module(cell, 6, 8, **kwargs) for _ in range(2))
    return on_host, on_device.to("cuda:0")


def _hx(cell, cp, h, c):
    if not has_cell_state(cell):
        return cp.asarray(h)
    return cp.asarray(h), cp.asarray(c)


# ---- moving -----------------------------------------------------------------------------------------

def test_to_moves_parameters_and_gradients_and_back(cp):
    module = fusedrnn.LSTM(3, 4, num_layers=2, proj_size=2, seed=1)
    host_params = {k: v.copy() for k, v in module.state_dict().items()}
    module.grads["weight_hh_l1"][...] = 1.5
    assert module.to("cuda") is module and module.device == "cuda:0"
    for name, p in module.named_parameters():
        assert isinstance(p, cp.ndarray) and isinstance(module.grads[name], cp.ndarray)
        assert np.array_equal(cp.asnumpy(p), host_params[name]) and p.dtype == np.float32
    assert np.all(cp.asnumpy(module.grads["weight_hh_l1"]) == 1.5)
    params = module.parameters()
    assert module.to("cuda:0") is module and all(p is q for p, q in zip(params, module.parameters()))
    module.cpu()
    assert module.device == "cpu"
    for name, p in module.named_parameters():
        assert type(p) is np.ndarray and np.array_equal(p, host_params[name])
    assert np.all(module.grads["weight_hh_l1"] == 1.5)


def test_device_names(cp, monkeypatch):
    assert _device.canonical_device("cpu") == "cpu"
    assert _device.canonical_device("cuda:3") == "cuda:3"
    assert _device.canonical_device("cuda") == "cuda:0"
    assert _device.canonical_device(cp.cuda.Device(0)) == "cuda:0"
    for bad in ("gpu", "cuda:x", "cpu:0", "cuda:-1", ""):
        with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N'"):
            fusedrnn.GRU(2, 2).to(bad)
    with pytest.raises(TypeError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N', got int"):
        fusedrnn.GRU(2, 2).to(0)


def test_to_cuda_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(_cuda_layer, "_libraries", {})
    module = fusedrnn.GRU(2, 2)
    with pytest.raises(ImportError, match=r"pip install 'fusedrnn\[cupy\]'"):
        module.to("cuda:0")
    assert module.device == "cpu" and type(module.weight_ih_l0) is np.ndarray


# ---- forward and backward on the device -------------------------------------------------------------

@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_module_on_device_matches_module_on_host(cp, rng, cell, projected):
    """Outputs, final states, input and state gradients, parameter gradients (accumulated on the device
    over two backwards), dropout and gradient norms, with lengths and batch_first."""
    on_host, on_device = _pair(cell, projected, dropout=0.3, batch_first=True)
    width = on_host.proj_size or 8
    x = rng.standard_normal((4, 7, 6))
    h0, c0 = rng.standard_normal((4, 4, width)), rng.standard_normal((4, 4, 8))
    lengths = random_lengths(rng, 7, 4)
    for _ in range(2):
        y, state = on_host(x, _hx(cell, np, h0, c0), lengths=lengths)
        y_dev, state_dev = on_device(cp.asarray(x), _hx(cell, cp, h0, c0), lengths=lengths)
        assert isinstance(y_dev, cp.ndarray)
        assert_close(cp.asnumpy(y_dev), y, np.float64, "y")
        for got, want in zip(state_dev if has_cell_state(cell) else [state_dev],
                             state if has_cell_state(cell) else [state]):
            assert_close(cp.asnumpy(got), want, np.float64, "final state")
        dy = rng.standard_normal(y.shape)
        dx, dstate = on_host.backward(dy)
        dx_dev, dstate_dev = on_device.backward(cp.asarray(dy))
        assert_close(cp.asnumpy(dx_dev), dx, np.float64, "dx")
        dh0, dh0_dev = (dstate[0], dstate_dev[0]) if has_cell_state(cell) else (dstate, dstate_dev)
        assert_close(cp.asnumpy(dh0_dev), dh0, np.float64, "dh0")
    for name, g in on_host.grads.items():
        assert isinstance(on_device.grads[name], cp.ndarray)
        assert_close(cp.asnumpy(on_device.grads[name]), g, np.float64, name)
    assert_close(cp.asnumpy(on_device.input_grads["x"]), on_host.input_grads["x"], np.float64, "input_grads")
    assert type(on_device.hidden_grad_norms) is np.ndarray
    assert_close(on_device.hidden_grad_norms, on_host.hidden_grad_norms, np.float64, "hidden_grad_norms")


def test_eval_mode_and_unbatched_input_on_device(cp, rng):
    on_host, on_device = _pair("gru", num_layers=1, bidirectional=False)
    on_host.eval()
    on_device.eval()
    x = rng.standard_normal((5, 6))
    y, h_n = on_host(x)
    y_dev, h_n_dev = on_device(cp.asarray(x))
    assert y_dev.shape == (5, 8) and h_n_dev.shape == (1, 8)
    assert_close(cp.asnumpy(y_dev), y, np.float64, "y")
    assert_close(cp.asnumpy(h_n_dev), h_n, np.float64, "h_n")
    assert on_device.saved_nbytes == 0


@pytest.mark.parametrize("cell, projected", [("gru", False), ("lstm", True)])
def test_per_sample_gradients_on_device_match_the_host(cp, rng, cell, projected):
    """functional.layer_backward(grad_groups=B) on device arrays: each row's weight and bias gradients,
    created or added into given device buffers, as on the host; a buffer of the wrong shape or not
    C-contiguous is refused by name."""
    from fusedrnn import functional as F
    from helpers import random_layer
    proj = proj_of(7, projected)
    w = random_layer(rng, cell, 5, 7, proj_size=proj)
    x, dy = rng.standard_normal((6, 4, 5)), rng.standard_normal((6, 4, proj or 7))
    lengths = np.array([6, 2, 5, 1])
    grads = []
    for lib in (np, cp):
        out = F.layer_forward(cell, lib.asarray(x), *(lib.asarray(w[n]) for n in ("weight_ih", "weight_hh", "bias_ih",
                                                                                  "bias_hh")),
                              lengths=lengths, weight_hr=None if not proj else lib.asarray(w["weight_hr"]))
        grads.append(F.layer_backward(out.tape, lib.asarray(dy), grad_groups=4))
    host, device = grads
    names = [n for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr") if getattr(host, n) is not None]
    for name in names:
        assert isinstance(getattr(device, name), cp.ndarray) and getattr(device, name).shape[0] == 4, name
        assert_close(cp.asnumpy(getattr(device, name)), getattr(host, name), np.float64, name)
    assert_close(cp.asnumpy(device.dx), host.dx, np.float64, "dx")
    start = {n: rng.standard_normal(getattr(host, n).shape) for n in names}
    buffers = F.LayerGrads(None, None, None, None, None, None, None)._replace(
        **{n: cp.asarray(v) for n, v in start.items()})
    added = F.layer_backward(out.tape, cp.asarray(dy), grads=buffers, grad_groups=4)
    for name in names:
        assert_close(cp.asnumpy(getattr(added, name)), start[name] + getattr(host, name), np.float64, f"{name} added")
    wrong = buffers._replace(weight_hh=cp.asarray(np.zeros((2, *host.weight_hh.shape[1:]))))
    with pytest.raises(ValueError, match=r"^grads\.weight_hh: "):
        F.layer_backward(out.tape, cp.asarray(dy), grads=wrong, grad_groups=4)
    strided = buffers._replace(weight_ih=cp.asarray(np.zeros((4, *host.weight_ih.shape[1:])))[:, :, ::-1])
    with pytest.raises(ValueError, match=r"^grads\.weight_ih: "):
        F.layer_backward(out.tape, cp.asarray(dy), grads=strided, grad_groups=4)


def test_per_sample_backward_on_device_matches_the_host(cp, rng):
    """A module on the device gives the host module's per-sample gradients (grad_groups on the device),
    and sum_clipped_per_sample clips and sums them where they are."""
    on_host, on_device = _pair("lstm", projected=True)
    x, lengths = rng.standard_normal((5, 3, 6)), np.array([5, 1, 4])
    dy = rng.standard_normal((5, 3, 2 * on_host.proj_size))
    for lib, module in ((np, on_host), (cp, on_device)):
        module(lib.asarray(x), lengths=lengths)
        module.backward(lib.asarray(dy), per_sample=True)
    sums = [fusedrnn.gradients.sum_clipped_per_sample(m.per_sample_grads, 0.3) for m in (on_host, on_device)]
    np.testing.assert_allclose(sums[1][1], sums[0][1], rtol=1e-10)
    for name, g in on_host.per_sample_grads.items():
        got = on_device.per_sample_grads[name]
        assert isinstance(got, cp.ndarray) and isinstance(sums[1][0][name], cp.ndarray), name
        assert_close(cp.asnumpy(got), g, np.float64, name)
        assert_close(cp.asnumpy(sums[1][0][name]), sums[0][0][name], np.float64, f"{name} clipped sum")
    mixed = {"weight_ih_l0": on_device.per_sample_grads["weight_ih_l0"],
             "weight_hh_l0": on_host.per_sample_grads["weight_hh_l0"]}
    with pytest.raises(ValueError, match=r"^per_sample_grads\['weight_hh_l0'\]: on cpu, but "
                                         r"per_sample_grads\['weight_ih_l0'\] is on cuda"):
        fusedrnn.gradients.sum_clipped_per_sample(mixed, 0.3)


# ---- devices mixed ----------------------------------------------------------------------------------

def test_inputs_on_another_device_are_refused_by_name(cp, rng):
    on_host, on_device = _pair("lstm", num_layers=1, bidirectional=False)
    x = rng.standard_normal((3, 2, 6))
    with pytest.raises(ValueError, match=r"x: on cpu, but the module's parameters are on cuda:0; .*module.to\('cpu'\)"):
        on_device(x)
    with pytest.raises(ValueError, match=r"x: on cuda:0, but the module's parameters are on cpu; .*module.to\('cuda:0'\)"):
        on_host(cp.asarray(x))
    with pytest.raises(ValueError, match=r"h0: on cpu, but x is on cuda:0"):
        on_device(cp.asarray(x), (np.zeros((1, 2, 8)), cp.zeros((1, 2, 8))))
    with pytest.raises(ValueError, match=r"c0: on cpu, but x is on cuda:0"):
        on_device(cp.asarray(x), (cp.zeros((1, 2, 8)), np.zeros((1, 2, 8))))
    y, _ = on_device(cp.asarray(x))
    with pytest.raises(ValueError, match=r"dy: on cpu, but the module's parameters are on cuda:0"):
        on_device.backward(cp.asnumpy(y))
    with pytest.raises(ValueError, match=r"dc_n: on cpu, but dy is on cuda:0"):
        on_device.backward(y, (cp.zeros((1, 2, 8)), np.zeros((1, 2, 8))))
    dx, _ = on_device.backward(y)  # the refusals left the forward to backpropagate through
    assert dx.shape == x.shape


def test_functional_backward_refuses_arrays_off_the_tapes_device(cp, rng):
    from fusedrnn import functional as F
    x, w = rng.standard_normal((5, 3, 4)), [rng.standard_normal((24, 4)), rng.standard_normal((24, 6))]
    dy = rng.standard_normal((5, 3, 6))
    on_device = F.layer_forward("lstm", cp.asarray(x), *map(cp.asarray, w)).tape
    on_host = F.layer_forward("lstm", x, *w).tape
    device = _device.device_of(cp.asarray(x))
    with pytest.raises(ValueError, match=rf"^dy: on cpu, but the tape is on {device}"):
        F.layer_backward(on_device, dy)
    with pytest.raises(ValueError, match=rf"^dh_n: on cpu, but the tape is on {device}"):
        F.layer_backward(on_device, cp.asarray(dy), np.zeros((3, 6)))
    with pytest.raises(ValueError, match=rf"^dy: on {device}, but the tape is on cpu"):
        F.layer_backward(on_host, cp.asarray(dy))
    with pytest.raises(ValueError, match=rf"^dx: on cpu, but the tape is on {device}"):
        F.layer_backward(on_device, cp.asarray(dy), dx=np.zeros((5, 3, 4)))
    bad = dy.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^dy: contains NaN"):
        F.layer_backward(on_device, cp.asarray(bad))
    if cp.ndarray is fake_cuda.DeviceArray or cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            elsewhere = cp.asarray(dy)
        with pytest.raises(ValueError, match=rf"^dy: on cuda:1, but the tape is on {device}"):
            F.layer_backward(on_device, elsewhere)
    got = F.layer_backward(on_device, cp.asarray(dy))
    want = F.layer_backward(on_host, dy)
    np.testing.assert_allclose(_device.to_host(got.weight_hh), want.weight_hh, rtol=1e-10, atol=1e-12)


def test_functional_calls_on_device_refuse_what_the_host_refuses_with_its_words(cp, rng):
    """Each bad argument gets, on device arrays, the host's error naming it (the CUDA module's own
    shape argument is not the caller's), and a GRU's backward refuses a cell-state gradient there too
    rather than ignoring it."""
    from fusedrnn import functional as F
    x, wi, wh = rng.standard_normal((3, 2, 4)), rng.standard_normal((15, 4)), rng.standard_normal((15, 5))
    lstm_w = rng.standard_normal((16, 4)), rng.standard_normal((16, 4))

    def bad_calls(xp):
        gru = F.layer_forward("gru", xp(x), xp(wi), xp(wh)).tape
        lstm = F.layer_forward("lstm", xp(x), *map(xp, lstm_w)).tape
        unprojected = F.LayerGrads(None, None, None, *(xp(np.zeros(s)) for s in ((16, 4), (16, 4), 16, 16)),
                                   weight_hr=xp(np.zeros((2, 4))))
        half = [xp(a.astype(np.float16)) for a in (x, wi, wh)]
        return [lambda: F.layer_backward(gru, None, None, xp(np.ones((2, 5)))),
                lambda: F.layer_forward("gru", xp(x[:, :0]), xp(wi), xp(wh)),
                lambda: F.layer_forward("gru", xp(x[:0]), xp(wi), xp(wh)),
                lambda: F.layer_forward("lstm", xp(x), *map(xp, lstm_w), weight_hr=xp(np.ones((4, 4)))),
                lambda: F.layer_forward("gru", xp(x), xp(wi), xp(wh[:, :2]), weight_hr=xp(np.ones((2, 5)))),
                lambda: F.layer_forward("gru", *half),
                lambda: F.layer_forward("gru", xp(x), xp(wi.astype(np.float32)), xp(wh)),
                lambda: F.layer_forward("gru", xp(x), xp(wi), xp(np.zeros((15, 0)))),
                lambda: F.layer_forward("lstm", xp(x), xp(lstm_w[0]), xp(np.ones((16, 5)))),  # weight_hh's own
                lambda: F.layer_forward("lstm", xp(x), xp(lstm_w[0]), xp(np.ones((16, 2))), weight_hr=xp(np.ones((2, 5)))),
                lambda: F.layer_backward(gru, xp(np.ones((3, 2, 5), np.int64))),
                lambda: F.layer_forward("lstm", xp(x), xp(lstm_w[0]), xp(np.zeros((16, 0))), weight_hr=xp(np.zeros((0, 4)))),
                lambda: F.layer_backward(lstm, xp(np.ones((3, 2, 4))), grads=unprojected)]

    def error(call):
        with pytest.raises((TypeError, ValueError)) as caught:
            call()
        return type(caught.value), str(caught.value)

    on_host = [error(call) for call in bad_calls(lambda a: a)]
    on_device = [error(call) for call in bad_calls(cp.asarray)]
    assert on_device == on_host
    assert on_host[0] == (ValueError, "dc_n: only an LSTM has a cell state")


def test_functional_calls_on_device_refuse_outputs_sharing_memory_with_what_they_read(cp, rng):
    """The tape reads the forward's x and weights again in backward: an output written over them would
    change the weight gradients silently, as on the host."""
    from fusedrnn import functional as F
    x, w = cp.asarray(rng.standard_normal((5, 3, 6))), [cp.asarray(rng.standard_normal((24, n))) for n in (6, 6)]
    with pytest.raises(ValueError, match=r"^out: shares memory with x"):
        F.layer_forward("lstm", x, *w, out=x)
    with pytest.raises(ValueError, match=r"^out: shares memory with weight_hh"):
        F.layer_forward("lstm", x, *w, out=w[1][:15].reshape(5, 3, 6))
    tape = F.layer_forward("lstm", x, *w).tape
    dy = cp.asarray(rng.standard_normal((5, 3, 6)))
    with pytest.raises(ValueError, match=r"^dx: shares memory with the forward's x"):
        F.layer_backward(tape, dy, dx=x)
    grads = F.LayerGrads(None, None, None, w[0], cp.zeros((24, 6)), None, None, None)
    with pytest.raises(ValueError, match=r"^grads\.weight_ih: shares memory with the forward's weight_ih"):
        F.layer_backward(tape, dy, grads=grads)
    with pytest.raises(ValueError, match=r"^dx: shares memory with dy"):
        F.layer_backward(tape, dy, dx=dy)
    for name, weights, shape in (("weight_hh", dict(weight_ih=w[0], weight_hh=w[1].ravel()), "shape (144,)"),
                                 ("weight_hh", dict(weight_ih=w[0], weight_hh=None), "NoneType"),
                                 ("weight_hr", dict(weight_ih=w[0], weight_hh=w[1][:, :2], weight_hr=w[1][0]),
                                  "shape (6,)")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a 2-D array, got {re.escape(shape)}"):
            F.layer_forward("lstm", x, **weights)
    with pytest.raises(ValueError, match=r"^out: expected shape \(5, 3, 6\), got \(5, 3, 7\)"):
        F.layer_forward("lstm", x, *w, out=cp.zeros((5, 3, 7)))
    expanded = cp.broadcast_to(cp.zeros((1, 3, 6)), (5, 3, 6))  # the CUDA module's own check of every output
    with pytest.raises(ValueError, match=r"^out: its elements overlap"):
        F.layer_forward("lstm", x, *w, out=expanded)


class _CudaInterface:
    """A stand-in exposing only __cuda_array_interface__ (the form CuPy arrays and torch CUDA tensors share)."""

    def __init__(self, address, shape, strides=None, typestr="<f4"):
        self.__cuda_array_interface__ = dict(data=(address, False), shape=shape, strides=strides, typestr=typestr,
                                             version=3)


class _RequiresGrad(_CudaInterface):
    """As a torch CUDA tensor that requires grad: its interface only through detach()."""

    def __dlpack_device__(self):
        return 2, 0  # kDLCUDA, device 0

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    @__cuda_array_interface__.setter
    def __cuda_array_interface__(self, value):
        self._interface = value

    def detach(self):
        plain = _CudaInterface(0, (1,))
        plain.__cuda_array_interface__ = self._interface
        return plain


def test_memory_overlap_of_cuda_arrays_is_told_by_their_byte_ranges():
    from fusedrnn import _checks
    base = 1 << 40
    _checks.apart(dict(out=_CudaInterface(base, (4,))), dict(weight=_RequiresGrad(base + 16, (4,))))
    with pytest.raises(ValueError, match="^out: shares memory with weight"):
        _checks.apart(dict(out=_CudaInterface(base, (4,))), dict(weight=_RequiresGrad(base + 12, (4,))))
    rows = _CudaInterface(base, (4, 8))  # C order: bytes [base, base + 128)
    for other, overlaps in ((_CudaInterface(base + 128, (2,)), False),
                            (_CudaInterface(base + 124, (2,)), True),
                            (_CudaInterface(base + 96, (3,), strides=(-32,)), True),   # reaches back to base + 32
                            (_CudaInterface(base - 8, (1,), typestr="<f8"), False),
                            (_CudaInterface(base - 8, (2,), typestr="<f8"), True),
                            (_CudaInterface(base, (0, 8)), False)):               # empty: no memory
        if overlaps:
            with pytest.raises(ValueError, match="^out: shares memory with x"):
                _checks.apart(dict(out=rows), dict(x=other))
        else:
            _checks.apart(dict(out=rows), dict(x=other))


def test_other_device_number_is_refused(cp, rng):
    if cp.ndarray is not fake_cuda.DeviceArray and cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    module = fusedrnn.RNN(2, 3).to("cuda:1")
    assert module.device == "cuda:1"
    with pytest.raises(ValueError, match=r"x: on cuda:0, but the module's parameters are on cuda:1"):
        module(cp.zeros((2, 1, 2), np.float32))
    with cp.cuda.Device(1):
        y, _ = module(cp.zeros((2, 1, 2), np.float32))
    assert y.device.id == 1


def test_moving_between_forward_and_backward_is_refused(cp, rng):
    module = fusedrnn.GRU(2, 3, dtype=np.float64).to("cuda")
    y, _ = module(cp.asarray(rng.standard_normal((2, 1, 2))))
    module.cpu()
    with pytest.raises(RuntimeError, match=r"backward: the module moved to cpu after its forward on cuda:0"):
        module.backward(np.ones(y.shape))


# ---- training on the device -------------------------------------------------------------------------

@pytest.mark.parametrize("make_optimizer", [
    lambda m: optim.Adam(m, lr=0.01, weight_decay=0.01, amsgrad=True),
    lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True),
], ids=["adam", "sgd"])
def test_training_steps_on_device_match_the_host(cp, rng, make_optimizer):
    """Forward, backward, clip_grad_norm, clip_grad_value, an optimiser step and zero_grad, three times,
    with the readout (Linear) on the same device: the same parameters as on the host."""
    on_host, on_device = _pair("lstm", num_layers=1)
    heads = [fusedrnn.Linear(16, 2, dtype=np.float64, seed=3) for _ in range(2)]
    heads[1].to("cuda:0")
    optimizers = [make_optimizer([on_host, heads[0]]), make_optimizer([on_device, heads[1]])]
    xs, targets = rng.standard_normal((3, 5, 2, 6)), rng.standard_normal((3, 5, 2, 2))
    for step in range(3):
        totals = []
        for lib, module, head, opt in ((np, on_host, heads[0], optimizers[0]), (cp, on_device, heads[1], optimizers[1])):
            y, _ = module(lib.asarray(xs[step]))
            out = head(y)
            dy = head.backward(2.0 * (out - lib.asarray(targets[step])))
            module.backward(dy)
            totals.append(gradients.clip_grad_norm([*module.grads.values(), *head.grads.values()], 0.5))
            gradients.clip_grad_value(module.grads, 0.02)
            assert gradients.nonfinite_grads(module.grads) == []
            opt.step()
            module.zero_grad()
            head.zero_grad()
        assert totals[1] == pytest.approx(totals[0], rel=1e-9)
    for name, p in on_host.named_parameters():
        assert isinstance(on_device._params[name], cp.ndarray)
        assert_close(cp.asnumpy(on_device._params[name]), p, np.float64, name)
    assert_close(cp.asnumpy(heads[1].state_dict()["weight"]), heads[0].state_dict()["weight"], np.float64, "head")
    assert all(not cp.asnumpy(g).any() for g in on_device.grads.values())


def test_optimizer_state_moves_between_host_and_device(cp, rng):
    """A state saved on the device is a device copy; loaded into an optimiser of host parameters it
    lands on the host, and back: the steps after agree."""
    host = [rng.standard_normal((3, 2))]
    device = [cp.asarray(host[0])]
    optimizers = [optim.Adam(host, lr=0.1, amsgrad=True), optim.Adam(device, lr=0.1, amsgrad=True)]
    optimizers[1].step([cp.ones((3, 2))])
    saved = optimizers[1].state_dict()
    assert isinstance(saved["state"][0]["exp_avg"], cp.ndarray)
    optimizers[0].load_state_dict(saved)
    assert type(optimizers[0].state[0]["exp_avg"]) is np.ndarray
    optimizers[1].load_state_dict(optimizers[0].state_dict())
    assert isinstance(optimizers[1].state[0]["max_exp_avg_sq"], cp.ndarray)
    host[0][...] = cp.asnumpy(device[0])
    grad = rng.standard_normal((3, 2))
    optimizers[0].step([grad])
    optimizers[1].step([cp.asarray(grad)])
    np.testing.assert_array_equal(cp.asnumpy(device[0]), host[0])


def test_optimizer_made_before_a_move_refuses_to_step(cp):
    module = fusedrnn.RNN(2, 3)
    opt = optim.SGD(module, lr=0.1)
    module.to("cuda")
    with pytest.raises(RuntimeError, match=r"make the optimiser after moving the module"):
        opt.step()


def test_optimizer_refuses_gradients_on_another_device(cp):
    params = [cp.zeros((2, 3), np.float32)]
    opt = optim.Adam(params)
    with pytest.raises(ValueError, match=r"grads\[0\]: on cpu, but its parameter is on cuda:0"):
        opt.step([np.ones((2, 3), np.float32)])
    opt.step([cp.ones((2, 3), np.float32)])
    assert np.allclose(cp.asnumpy(params[0]), -1e-3)


def test_nonfinite_gradients_are_found_on_device(cp):
    grads = {"a": cp.zeros(3), "b": cp.asarray(np.array([1.0, np.nan]))}
    assert gradients.nonfinite_grads(grads) == ["b"]
    assert np.isnan(gradients.clip_grad_norm(grads, 1.0))


# ---- state dicts across devices ---------------------------------------------------------------------

def test_state_dicts_round_trip_across_devices(cp, rng):
    torch = pytest.importorskip("torch")
    reference = torch.nn.LSTM(3, 5, num_layers=2, proj_size=2, dtype=torch.float64)
    module = fusedrnn.LSTM(3, 5, num_layers=2, proj_size=2, dtype=np.float64).to("cuda")
    module.load_state_dict(reference.state_dict())
    state = module.state_dict()
    for name, value in reference.state_dict().items():
        assert isinstance(state[name], cp.ndarray)
        assert np.array_equal(cp.asnumpy(state[name]), value.numpy())
    on_host = fusedrnn.LSTM(3, 5, num_layers=2, proj_size=2, dtype=np.float64)
    on_host.load_state_dict(state)  # device arrays into a host module: copied across, explicitly
    other = torch.nn.LSTM(3, 5, num_layers=2, proj_size=2, dtype=torch.float64)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in on_host.state_dict().items()})
    x = rng.standard_normal((4, 2, 3))
    y, _ = module(cp.asarray(x))
    assert_close(cp.asnumpy(y), other(torch.from_numpy(x))[0].detach().numpy(), np.float64, "y against torch")
    bad = {k: cp.asarray(np.full(v.shape, np.inf)) for k, v in on_host.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l0'\]: contains NaN or infinite values"):
        module.load_state_dict(bad)



# ---- truncated BPTT and losses on the device --------------------------------------------------------

@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_truncated_bptt_on_device_matches_the_host(cp, rng, with_lengths):
    on_host, on_device = _pair("lstm", projected=True, bidirectional=False)
    x, target = rng.standard_normal((9, 4, 6)), rng.standard_normal((9, 4, on_host.proj_size))
    h0, c0 = rng.standard_normal((2, 4, on_host.proj_size)), rng.standard_normal((2, 4, 8))
    lengths = np.array([9, 2, 5, 1]) if with_lengths else None
    results = []
    for lib, module in ((np, on_host), (cp, on_device)):
        def loss_fn(y, start, stop, lib=lib):
            return losses.mse_loss(y, lib.asarray(target[start:stop]), reduction="sum")
        results.append(bptt.truncated_bptt(module, lib.asarray(x), 4, loss_fn, hx=(lib.asarray(h0), lib.asarray(c0)),
                                           lengths=lengths))
    (host, device) = results
    assert isinstance(device.y, cp.ndarray) and isinstance(device.hx[1], cp.ndarray)
    assert device.losses == pytest.approx(host.losses, rel=1e-10)
    assert_close(cp.asnumpy(device.y), host.y, np.float64, "y")
    assert_close(cp.asnumpy(device.hx[0]), host.hx[0], np.float64, "h_n")
    for name, g in on_host.grads.items():
        assert_close(cp.asnumpy(on_device.grads[name]), g, np.float64, name)
    with pytest.raises(ValueError, match=r"loss_fn: returned a gradient on cpu, but x is on cuda:0"):
        bptt.truncated_bptt(on_device, cp.asarray(x), 4, lambda y, a, b: (0.0, cp.asnumpy(y)))
    with pytest.raises(ValueError, match=r"h0: on cpu, but x is on cuda:0"):
        bptt.truncated_bptt(on_device, cp.asarray(x), 4, loss_fn, hx=(h0, cp.asarray(c0)))


def test_losses_on_device_match_the_host(cp, rng):
    logits, classes = rng.standard_normal((5, 3, 4)), rng.integers(0, 4, (5, 3))
    mask = sequences.length_mask(np.array([5, 2, 4]))
    prediction, target = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2))
    for loss, args in ((losses.cross_entropy, (logits, classes, mask)), (losses.mse_loss, (prediction, target, mask))):
        value, grad = loss(*args)
        value_dev, grad_dev = loss(*map(cp.asarray, args))
        assert isinstance(grad_dev, cp.ndarray) and value_dev == pytest.approx(value, rel=1e-12)
        assert_close(cp.asnumpy(grad_dev), grad, np.float64, loss.__name__)
    with pytest.raises(ValueError, match=r"target: on cpu, but prediction is on cuda:0"):
        losses.mse_loss(cp.asarray(prediction), target)
    with pytest.raises(ValueError, match=r"targets: class index 4 at \(1, 2\) is outside \[0, 4\)"):
        bad = classes.copy()
        bad[1, 2] = 4
        losses.cross_entropy(cp.asarray(logits), cp.asarray(bad))


def test_demo_trains_on_the_device(cp):
    """The demo's forecaster trained on the device: the training losses and forecasts of the same
    forecaster trained on the host (float32; the two backends round differently)."""
    small = dict(hidden=8, epochs=2, held_out_years=30, batch=64, members=1)
    on_host = demo.train_forecaster(demo.ForecastConfig(**small))
    on_device = demo.train_forecaster(demo.ForecastConfig(**small, device="cuda"))
    np.testing.assert_allclose(on_device.losses, on_host.losses, rtol=1e-4)
    assert type(on_device.forecast) is np.ndarray
    np.testing.assert_allclose(on_device.forecast, on_host.forecast, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        demo.train_forecaster(demo.ForecastConfig(**small, device="gpu"))

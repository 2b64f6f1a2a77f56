"""fusedrnn.torch: the torch.nn.LSTM / GRU / RNN drop-in.

Every result is compared with torch.nn's own module on the same weights: outputs, final states and
the gradients of the input, the initial states and every parameter."""

import contextlib
import copy
import io
import socket
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedrnn.torch as frt  # noqa: E402
import torch_ddp_worker  # noqa: E402
from fusedrnn import _core, _stack  # noqa: E402
from fusedrnn.torch import _ops  # noqa: E402
from helpers import CELL_CASES, CELLS, GATES, assert_close, has_cell_state, proj_of  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def jobs_on_torchs_threads():
    """The drop-in's users run fusedrnn's jobs on torch's OpenMP threads (fusedrnn.torch's default)."""
    frt.use_torch_threads(True)
    yield
    frt.use_torch_threads(False)


DTYPES = {"f64": torch.float64, "f32": torch.float32}
NUMPY_DTYPE = {torch.float64: np.float64, torch.float32: np.float32}
T, B, I, H = 5, 3, 4, 6


def module_pair(cell, *args, **kwargs):
    """(torch.nn module, fusedrnn.torch module) with the same weights, the fused one loaded strictly."""
    if cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cell[len("rnn_"):]
    name = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
    ref = getattr(nn, name)(*args, **kwargs)
    fused = getattr(frt, name)(*args, **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


def states(result):
    """(h_n, c_n) of a module's result; c_n is None for GRU/RNN."""
    state = result[1]
    return state if isinstance(state, tuple) else (state, None)


def output_tensor(out):
    return out.data if isinstance(out, PackedSequence) else out


def run(module, x, hx, grads, packing=None):
    """Forward, then backward of sum(out * dy) + sum(h_n * dh) (+ sum(c_n * dc)). Returns the outputs
    and the gradients of the input, of the initial states and of every parameter, as a dict. With
    `packing` (lengths, enforce_sorted, batch_first), x is packed first and the result checked to be a
    PackedSequence with the input's batch sizes and orderings."""
    module.zero_grad()
    leaves = [x] + ([] if hx is None else list(hx if isinstance(hx, tuple) else (hx,)))
    leaves = [t.detach().requires_grad_() for t in leaves]
    state = None if hx is None else (tuple(leaves[1:]) if isinstance(hx, tuple) else leaves[1])
    if packing is None:
        return _backward(module, module(leaves[0], state), leaves, grads)
    lengths, enforce_sorted, batch_first = packing
    packed = pack_padded_sequence(leaves[0], lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    result = module(packed, state)
    assert isinstance(result[0], PackedSequence)
    for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        want = getattr(packed, field)
        got = getattr(result[0], field)
        assert (got is None and want is None) or torch.equal(got, want), field
    return _backward(module, result, leaves, grads)


def _backward(module, result, leaves, grads):
    out = output_tensor(result[0])
    h_n, c_n = states(result)
    loss = (out * grads["y"][: out.shape[0]]).sum() + (h_n * grads["h"]).sum()
    if c_n is not None:
        loss = loss + (c_n * grads["c"]).sum()
    loss.backward()
    got = {"y": out, "h_n": h_n, "c_n": c_n}
    got.update({f"d{i}": t.grad for i, t in enumerate(leaves)})
    got.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return {k: None if v is None else v.detach() for k, v in got.items()}


def assert_results_close(got, want, dtype):
    assert got.keys() == want.keys()
    for key, w in want.items():
        if w is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == dtype and got[key].shape == w.shape, key
        assert_close(got[key].numpy(), w.numpy(), NUMPY_DTYPE[dtype], key)


def random_grads(gen, y_shape, state_shape, dtype, cell_state_shape=None):
    """Upstream gradients; the cell state's shape is the hidden state's unless given (a projection)."""
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return {"y": r(*y_shape), "h": r(*state_shape), "c": r(*(cell_state_shape or state_shape))}


# One row per configuration; together they take every option through each of its values, paired
# with different others. input: padded, unbatched (2-D), packed with enforce_sorted True or False.
CONFIGS = {
    "L1-uni-seq-hx0": dict(num_layers=1, bidirectional=False, batch_first=False, bias=True, hx=False, input="padded"),
    "L2-bi-bf-hx": dict(num_layers=2, bidirectional=True, batch_first=True, bias=True, hx=True, input="padded"),
    "L1-bi-bf-nobias-hx": dict(num_layers=1, bidirectional=True, batch_first=True, bias=False, hx=True, input="padded"),
    "L2-uni-unbatched-nobias-hx": dict(num_layers=2, bidirectional=False, batch_first=True, bias=False, hx=True,
                                       input="unbatched"),
    "L1-bi-unbatched-hx0": dict(num_layers=1, bidirectional=True, batch_first=False, bias=True, hx=False,
                                input="unbatched"),
    "L2-bi-sorted-hx": dict(num_layers=2, bidirectional=True, batch_first=False, bias=True, hx=True, input="sorted"),
    "L1-uni-bf-unsorted-nobias-hx0": dict(num_layers=1, bidirectional=False, batch_first=True, bias=False, hx=False,
                                          input="unsorted"),
    "L2-bi-bf-unsorted-nobias-hx": dict(num_layers=2, bidirectional=True, batch_first=True, bias=False, hx=True,
                                        input="unsorted"),
    "L3-bi-unsorted-hx0": dict(num_layers=3, bidirectional=True, batch_first=False, bias=True, hx=False,
                               input="unsorted"),
}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_matches_torch_nn(cell, projected, config, dtype):
    config = dict(config)
    use_hx, kind = config.pop("hx"), config.pop("input")
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(7)
    proj = proj_of(H, projected)
    if proj:
        config["proj_size"] = proj
    ref, fused = module_pair(cell, I, H, dtype=dtype, **config)
    batch_first = config["batch_first"]
    lead = config["num_layers"] * (2 if config["bidirectional"] else 1)
    features = (proj or H) * (2 if config["bidirectional"] else 1)
    unbatched = kind == "unbatched"
    x_shape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    rows = () if unbatched else (B,)
    state_shape, cell_state_shape = (lead, *rows, proj or H), (lead, *rows, H)
    x = torch.randn(*x_shape, generator=gen, dtype=dtype)
    hx = None
    if use_hx:
        h0 = torch.randn(*state_shape, generator=gen, dtype=dtype)
        hx = (h0, torch.randn(*cell_state_shape, generator=gen, dtype=dtype)) if has_cell_state(cell) else h0
    if kind in ("sorted", "unsorted"):
        lengths = torch.tensor([5, 4, 2] if kind == "sorted" else [2, 5, 3])
        grads = random_grads(gen, (int(lengths.sum()), features), state_shape, dtype, cell_state_shape)
        want, got = (run(m, x, hx, grads, (lengths, kind == "sorted", batch_first)) for m in (ref, fused))
    else:
        y_shape = x_shape[:-1] + (features,)
        grads = random_grads(gen, y_shape, state_shape, dtype, cell_state_shape)
        want, got = (run(m, x, hx, grads) for m in (ref, fused))
    assert_results_close(got, want, dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_dropout_draws_torch_masks_in_training_and_none_in_eval(cell, packed):
    ref, fused = module_pair(cell, I, H, num_layers=3, dropout=0.4, bidirectional=True, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([3, 5, 1])
    grads = random_grads(gen, (int(lengths.sum()) if packed else T, *(() if packed else (B,)), 2 * H),
                         (6, B, H), torch.float64)

    def forward(module, seed):
        torch.manual_seed(seed)
        if packed:
            return run(module, x, None, grads, (lengths, False, False))
        return run(module, x, None, grads)

    want = forward(ref, 11)
    got = forward(fused, 11)
    assert_results_close(got, want, torch.float64)
    assert torch.equal(forward(fused, 11)["y"], got["y"])          # reproducible under manual_seed
    assert not torch.allclose(forward(fused, 12)["y"], got["y"])   # and the masks do depend on it
    ref.eval()
    fused.eval()
    evaluated = forward(fused, 13)
    assert_results_close(evaluated, forward(ref, 14), torch.float64)
    assert torch.equal(forward(fused, 15)["y"], evaluated["y"])    # no dropout: the seed is irrelevant


@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_moves_both_ways_strictly(cell):
    kwargs = dict(num_layers=2, bidirectional=True, bias=False)
    ref, fused = module_pair(cell, I, H, **kwargs)
    assert list(fused.state_dict()) == list(ref.state_dict())
    other, _ = module_pair(cell, I, H, **kwargs)  # differently initialised
    assert not all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ref.state_dict().values()))
    other.load_state_dict(fused.state_dict(), strict=True)
    for (name, a), b in zip(other.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="Missing key"):
        fused.load_state_dict(module_pair(cell, I, H, num_layers=3, bias=False)[0].state_dict(), strict=True)


def test_module_interface_is_torch_nn():
    torch.manual_seed(8)
    lstm = frt.LSTM(I, H, 2, True, True, 0.25, True)  # torch.nn.LSTM's positional order
    torch.manual_seed(8)
    ref = nn.LSTM(I, H, 2, True, True, 0.25, True)
    assert all(torch.equal(a, b) for a, b in zip(lstm.parameters(), ref.parameters()))  # same initialisation
    assert isinstance(lstm, nn.RNNBase) and isinstance(lstm, nn.Module)
    assert repr(lstm) == repr(ref)
    assert [(n, p.shape) for n, p in lstm.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert lstm.all_weights[1][0] is lstm.weight_ih_l0_reverse
    rnn = frt.RNN(I, H, 1, "relu")
    assert rnn.nonlinearity == "relu" and rnn.mode == "RNN_RELU"
    assert list(frt.GRU(I, H, bias=False).state_dict()) == ["weight_ih_l0", "weight_hh_l0"]
    clone = copy.deepcopy(lstm)
    assert type(clone) is frt.LSTM and clone.weight_hh_l1 is not lstm.weight_hh_l1
    assert torch.equal(clone.weight_hh_l1, lstm.weight_hh_l1)


def test_flat_weights_follow_parameter_reassignment_and_dtype_changes():
    ref, fused = module_pair("gru", I, H)
    new = nn.Parameter(torch.randn(3 * H, H))
    ref.weight_hh_l0 = new
    fused.weight_hh_l0 = new
    fused.flatten_parameters()  # a no-op on the CPU, as in torch.nn
    x = torch.randn(T, B, I)
    assert_close(fused(x)[0].detach().numpy(), ref(x)[0].detach().numpy(), np.float32)
    fused.double()
    ref.double()
    assert fused._flat_weights[0].dtype == torch.float64
    assert_close(fused(x.double())[0].detach().numpy(), ref(x.double())[0].detach().numpy(), np.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_mode_and_anomaly_detection_match_torch(cell):
    """Under torch.inference_mode() the outputs are inference tensors equal to torch.nn's; under
    torch.autograd.detect_anomaly() forward and backward run and the gradients equal torch.nn's."""
    ref, fused = module_pair(cell, I, H, num_layers=2, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.inference_mode():
        out_ref, out_fused = ref(x)[0], fused(x)[0]
    assert out_fused.is_inference()
    assert_close(out_fused.numpy(), out_ref.numpy(), np.float64)
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anomaly detection warns that it is slow
        with torch.autograd.detect_anomaly():
            for module in (ref, fused):
                xg = x.clone().requires_grad_()
                module(xg)[0].square().sum().backward()
                grads.append(xg.grad.numpy())
    assert_close(grads[1], grads[0], np.float64)


def test_autocast_leaves_the_layer_in_its_parameters_dtype():
    # torch.nn's CPU LSTM returns bfloat16 under autocast; the fused layer runs and returns float32.
    torch.manual_seed(8)
    lstm = frt.LSTM(I, H, num_layers=2)
    x = torch.randn(T, B, I, requires_grad=True)
    y, (h_n, c_n) = lstm(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_cast, (h_cast, c_cast) = lstm(x)
        (dx_cast,) = torch.autograd.grad(y_cast.square().sum(), x)
    for got, want in ((y_cast, y), (h_cast, h_n), (c_cast, c_n), (dx_cast, dx)):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_autocast_outputs_reaching_the_layer_run_in_its_parameters_dtype():
    # A Linear under autocast hands the layer bfloat16; the layer takes it back to float32, and outside
    # autocast the same tensor is a dtype mismatch.
    torch.manual_seed(8)
    linear, lstm = nn.Linear(I, I), frt.LSTM(I, H)
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = linear(x)
        y, (h_n, _) = lstm(z, (torch.zeros(1, B, H, dtype=torch.bfloat16), torch.zeros(1, B, H)))
    assert z.dtype == torch.bfloat16 and y.dtype == torch.float32
    assert torch.equal(y, lstm(z.float())[0])
    with pytest.raises(NotImplementedError, match=r"^input: fusedrnn supports float32 and float64, got torch.bfloat16"):
        lstm(z)


def test_inputs_of_no_floating_dtype_and_options_of_another_type_are_type_errors():
    # As torch.nn has them: an integer, bool or complex input is a wrong argument (TypeError); options
    # its kernels take as bools and ints are refused rather than read by their truth.
    lstm = frt.LSTM(I, H)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=rf"^input: fusedrnn supports float32 and float64, got {dtype}"):
            lstm(torch.zeros(T, B, I, dtype=dtype))
    with pytest.raises(TypeError, match=r"^bidirectional: expected a bool, got str"):
        frt.LSTM(I, H, bidirectional="no")
    with pytest.raises(TypeError, match=r"^num_layers: expected an int, got bool"):
        frt.GRU(I, H, num_layers=True)


@pytest.mark.parametrize("norm", ["parametrization", "hook"])
def test_weight_norm_on_a_weight_matches_torch(norm):
    """Weight normalisation of W_hh, as speech models apply it: through torch.nn.utils.parametrize (the
    weight becomes a property computed each call) or the older forward-pre-hook version (a plain
    attribute set before each call). Outputs and the gradients of what is normalised match torch.nn."""
    ref, fused = module_pair("lstm", I, H, dtype=torch.float64)
    apply = (nn.utils.parametrizations.weight_norm if norm == "parametrization" else nn.utils.weight_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook version is deprecated in favour of the other
        ref, fused = apply(ref, "weight_hh_l0"), apply(fused, "weight_hh_l0")
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_ref, out_fused = ref(x)[0], fused(x)[0]
    assert_close(out_fused.detach().numpy(), out_ref.detach().numpy(), np.float64)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert_close(b.grad.numpy(), a.grad.numpy(), np.float64, name)


def test_tensors_reach_the_core_without_copies(monkeypatch):
    """A bidirectional layer's two directions reach the core in one call, on the tensors' own memory."""
    seen = []
    original = _core.layer_forward_directions

    def spy(cell, x, weights, *rest, **kwargs):
        seen.extend((x, w[0], w[1]) for w in weights)
        return original(cell, x, weights, *rest, **kwargs)

    monkeypatch.setattr(_core, "layer_forward_directions", spy)
    lstm = frt.LSTM(I, H, bidirectional=True)
    x = torch.randn(T, B, I, requires_grad=True)
    lstm(x)
    assert len(seen) == 2
    for d, suffix in enumerate(("", "_reverse")):
        xa, w_ih, w_hh = seen[d]
        assert np.shares_memory(xa, x.detach().numpy())
        assert np.shares_memory(w_ih, getattr(lstm, "weight_ih_l0" + suffix).detach().numpy())
        assert np.shares_memory(w_hh, getattr(lstm, "weight_hh_l0" + suffix).detach().numpy())


# ---- convert --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.GRU(2 * H, H, batch_first=True, dtype=torch.float64)),
            nn.RNN(H, H, nonlinearity="relu", batch_first=True, dtype=torch.float64),
        ])
        self.head = nn.Linear(H, 1, dtype=torch.float64)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.blocks[0][0](y)
        y, h = self.blocks[1](y)
        return self.head(y).sum() + h.sum()


class CustomLSTM(nn.LSTM):
    """A user's subclass, with its own forward: convert() leaves it alone."""


def test_convert_swaps_nested_modules_in_place_keeping_parameters_and_mode():
    torch.manual_seed(3)
    model = Encoder()
    model.blocks[1].eval()
    model.extra = CustomLSTM(I, H)
    x = torch.randn(B, T, I, dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("extra.")}
    want = model(x)
    want_grads = torch.autograd.grad(want, list(params.values()))

    assert frt.convert(model) is model
    assert type(model.lstm) is frt.LSTM
    assert type(model.blocks[0][0]) is frt.GRU
    assert type(model.blocks[1]) is frt.RNN and model.blocks[1].nonlinearity == "relu"
    assert type(model.extra) is CustomLSTM
    assert model.lstm.training and not model.blocks[1].training
    assert all(p is params[n] for n, p in model.named_parameters() if n in params)  # the same objects
    got = model(x)
    assert_close(got.detach().numpy(), want.detach().numpy(), np.float64)
    for g, w, name in zip(torch.autograd.grad(got, list(params.values())), want_grads, params):
        assert_close(g.numpy(), w.numpy(), np.float64, name)
    assert type(frt.convert(nn.GRU(I, H))) is frt.GRU  # a bare module comes back converted


def test_convert_takes_projected_lstms():
    torch.manual_seed(3)
    model = nn.Sequential(nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64))
    x = torch.randn(T, B, I, dtype=torch.float64)
    want, (want_h, want_c) = model(x)
    params = dict(model.named_parameters())
    assert frt.convert(model) is model and type(model[0]) is frt.LSTM and model[0].proj_size == 2
    got, (got_h, got_c) = model(x)
    assert got.shape == (T, B, 4) and got_h.shape == (4, B, 2) and got_c.shape == (4, B, H)
    for a, b, name in ((got, want, "y"), (got_h, want_h, "h_n"), (got_c, want_c, "c_n")):
        assert_close(a.detach().numpy(), b.detach().numpy(), np.float64, name)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert params["0.weight_hr_l1_reverse"].shape == (2, H)


def test_convert_and_revert_keep_a_module_shared_between_slots_shared():
    shared = nn.LSTM(I, H, dtype=torch.float64)
    model = nn.Module()
    model.a = model.b = shared
    model.stack = nn.Sequential(shared, nn.ModuleList([shared]))
    assert len(list(model.modules())) == 4
    for swap, cls in ((frt.convert, frt.LSTM), (frt.revert, nn.LSTM)):
        swap(model)
        one = model.a
        assert type(one) is cls and model.b is one and model.stack[0] is one and model.stack[1][0] is one
        assert len(list(model.modules())) == 4
        assert one.weight_hh_l0 is shared.weight_hh_l0


def test_torchscript_is_refused_with_the_alternatives():
    for model in (frt.GRU(I, H), nn.Sequential(frt.LSTM(I, H))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(NotImplementedError, match=r"TorchScript \(torch.jit.script\) cannot compile"):
                torch.jit.script(model)


def test_hook_handles_still_remove_their_hooks_after_convert_and_revert():
    model = nn.Sequential(nn.GRU(I, H))
    calls = []
    handles = [model[0].register_forward_pre_hook(lambda m, args: calls.append("pre")),
               model[0].register_forward_hook(lambda m, args, out: calls.append("hook")),
               model[0].register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))]
    x = torch.randn(T, B, I, requires_grad=True)
    for swap in (frt.convert, frt.revert):
        swap(model)
        model(x)[0].sum().backward()
        assert calls == ["pre", "hook", "backward"]
        calls.clear()
    frt.convert(model)
    for handle in handles:
        handle.remove()
    model(x)[0].sum().backward()
    assert calls == []


def test_convert_changes_nothing_when_a_module_is_unsupported():
    model = nn.Sequential(nn.GRU(I, H), nn.LSTM(H, H, proj_size=2, dtype=torch.float16))
    with pytest.raises(NotImplementedError, match="float16"):
        frt.convert(model)
    assert type(model[0]) is nn.GRU
    with pytest.raises(TypeError, match="model"):
        frt.convert("not a module")


def test_revert_gives_back_torch_nn_modules_for_exports_and_pickles_without_fusedrnn():
    torch.manual_seed(3)
    model = Encoder()
    model.blocks[1].eval()
    x = torch.randn(B, T, I, dtype=torch.float64)
    want = model(x).detach()
    params = dict(model.named_parameters())
    frt.convert(model)
    model.extra = type("OwnLSTM", (frt.LSTM,), {})(I, H)  # a subclass of the fused class: left alone
    calls = []
    model.lstm.register_forward_hook(lambda *args: calls.append("hook"))

    assert frt.revert(model) is model
    assert type(model.lstm) is nn.LSTM and type(model.blocks[0][0]) is nn.GRU and type(model.blocks[1]) is nn.RNN
    assert type(model.extra).__name__ == "OwnLSTM"
    del model.extra
    assert model.blocks[1].nonlinearity == "relu" and model.lstm.training and not model.blocks[1].training
    assert all(p is params[n] for n, p in model.named_parameters())  # the same objects
    assert torch.equal(model(x), want)  # torch.nn's own computation again
    assert calls == ["hook"]
    with warnings.catch_warnings():  # torch.nn's RNNs refresh _flat_weights under export, and torch warns
        warnings.filterwarnings("ignore", "The tensor attributes .*_flat_weights", UserWarning)
        exported = torch.export.export(model, (x,))  # what ONNX export and AOTInductor take: torch's own ops
    assert "fusedrnn" not in str(exported.graph)
    assert_close(exported.module()(x).detach().numpy(), want.numpy(), np.float64)
    pickled = io.BytesIO()
    torch.save(model.blocks, pickled)
    assert b"fusedrnn" not in pickled.getvalue()
    assert type(frt.revert(frt.GRU(I, H))) is nn.GRU  # a bare module comes back reverted
    with pytest.raises(TypeError, match="model"):
        frt.revert(None)


# ---- what is not supported, and bad input --------------------------------------------------------


def test_unsupported_configurations_raise_not_implemented_at_construction():
    with pytest.raises(NotImplementedError, match="float16"):
        frt.GRU(I, H, dtype=torch.float16)


def test_unsupported_tensors_raise_not_implemented_at_forward():
    gru = frt.GRU(I, H)
    with pytest.raises(NotImplementedError, match="CPU"):
        gru(torch.randn(T, B, I, device="meta"))
    gru.half()
    with pytest.raises(NotImplementedError, match="float16"):
        gru(torch.randn(T, B, I).half())


def test_bad_input_raises_errors_naming_the_argument():
    lstm = frt.LSTM(I, H, num_layers=2)
    x = torch.randn(T, B, I)
    h = torch.zeros(2, B, H)
    cases = [
        (TypeError, "input", lambda: lstm(x.numpy())),
        (TypeError, "input.*float32", lambda: lstm(x.double())),
        (ValueError, "input.*input_size", lambda: lstm(torch.randn(T, B, I + 1))),
        (ValueError, "input.*3-D", lambda: lstm(torch.randn(T, B, 1, I))),
        (ValueError, "input.*empty", lambda: lstm(torch.randn(0, B, I))),
        (ValueError, "input.*NaN", lambda: lstm(torch.full((T, B, I), float("nan")))),
        (TypeError, "hx.*tuple", lambda: lstm(x, h)),
        (ValueError, "c_0.*shape", lambda: lstm(x, (h, torch.zeros(2, B + 1, H)))),
        (TypeError, "h_0.*dtype", lambda: lstm(x, (h.double(), h))),
        (ValueError, "h_0.*NaN", lambda: lstm(x, (h + float("inf"), h))),
        (ValueError, "h_0.*NaN", lambda: lstm(x, (torch.cat([h[:1], h[1:] + float("nan")]), h))),  # layer 1's
        (ValueError, "c_0.*NaN", lambda: lstm(x, (h, torch.cat([h[:1], h[1:] + float("inf")])))),
        (ValueError, "nonlinearity", lambda: frt.RNN(I, H, nonlinearity="gelu")),
        (ValueError, "dropout", lambda: frt.GRU(I, H, dropout=1.5)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    with pytest.raises(ValueError, match="hx.*shape"):
        frt.GRU(I, H)(x, torch.zeros(2, B, H))


def test_wrong_shapes_and_dtypes_raise_what_torch_nn_raises_too():
    """Code written against torch.nn (`except RuntimeError` around a call that probes shapes) still
    catches the drop-in's errors, which stay ValueError and TypeError naming the argument."""
    x, h = torch.randn(T, B, I), torch.zeros(1, B, H)
    cases = [
        (ValueError, "input.*input_size", lambda m: m(torch.randn(T, B, I + 1))),
        (ValueError, "input.*3-D", lambda m: m(torch.randn(T, B, 1, I))),
        (ValueError, "h_0.*shape", lambda m: m(x, (torch.zeros(1, B + 1, H), h))),
        (ValueError, "c_0.*shape", lambda m: m(x, (h, torch.zeros(1, B, H + 1)))),
        (ValueError, "h_0.*shape", lambda m: m(x[:, 0], (h, h))),  # batched states for an unbatched input
        (TypeError, "h_0.*dtype", lambda m: m(x, (h.double(), h))),
        (TypeError, "input.*dtype", lambda m: m(x.double())),
    ]
    torch.manual_seed(0)
    reference, fused = nn.LSTM(I, H), frt.LSTM(I, H)
    for ours, match, call in cases:
        with pytest.raises(Exception) as torch_nn:
            call(reference)
        with pytest.raises(ours, match=match) as drop_in:
            call(fused)
        assert isinstance(drop_in.value, type(torch_nn.value)), (match, torch_nn.value)
    with torch.no_grad():
        fused.weight_hh_l0.data = torch.zeros(4 * H, H + 1)
    with pytest.raises(ValueError, match="weight_hh_l0.*shape") as drop_in:
        fused(x)
    assert isinstance(drop_in.value, RuntimeError)  # torch.nn: a RuntimeError from its matrix product


# ---- autograd ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell, packed):
    _, fused = module_pair(cell, 2, 2, num_layers=2, bidirectional=True, dtype=torch.float64)
    names = [n for n, _ in fused.named_parameters()]
    gen = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, h0, c0 = r(3, 2, 2), r(4, 2, 2), r(4, 2, 2)
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]
    lengths = torch.tensor([2, 3])

    def f(x, h0, c0, *params):
        hx = (h0, c0) if has_cell_state(cell) else h0
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, state = torch.func.functional_call(fused, dict(zip(names, params)), (inp, hx))
        return (output_tensor(out),) + (state if isinstance(state, tuple) else (state,))

    inputs = (x, h0, c0 if has_cell_state(cell) else c0.detach(), *params)
    assert torch.autograd.gradcheck(f, inputs)


def test_double_backward_raises():
    lstm = frt.LSTM(2, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(lstm(x)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


def test_backward_twice_with_retained_graph_and_tapes_freed_with_the_graph():
    live = len(_ops._live_tapes)
    gru = frt.GRU(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    y, _ = gru(x)
    assert len(_ops._live_tapes) == live + 2  # one per layer
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    assert torch.allclose(x.grad, 2 * first, rtol=1e-14, atol=0)
    del y
    assert len(_ops._live_tapes) == live
    with torch.no_grad():
        gru(x)
    assert len(_ops._live_tapes) == live  # nothing recorded without autograd


def test_module_and_operator_record_the_same_gradients_and_refuse_double_backward():
    # The modules record through _ops._RecordedLayer, direct callers of the operator through its
    # registered autograd formula: one formula, the same gradients, and neither has a second order.
    torch.manual_seed(6)
    lstm = frt.LSTM(I, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    slots = [getattr(lstm, f"{n}_l0{s}", None) for s in ("", "_reverse") for n in _ops.PARAMETERS]
    weights = [w for w in slots if w is not None]  # no weight_hr: the LSTM has no projection
    y_module, _ = lstm(x)
    y_operator, _, _, _ = frt.rnn_layer(x, *slots, None, None, None, "lstm", True, True)
    assert torch.equal(y_module, y_operator)
    leaves = [x, *weights]
    for a, b in zip(torch.autograd.grad(y_module.square().sum(), leaves),
                    torch.autograd.grad(y_operator.square().sum(), leaves)):
        assert torch.equal(a, b)
    for y in (lstm(x)[0], frt.rnn_layer(x, *slots, None, None, None, "lstm", True, True)[0]):
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            dx.sum().backward()


@pytest.mark.parametrize("wrap", ["checkpoint", "checkpoint_reentrant", "save_on_cpu"])
def test_activation_checkpointing_and_saved_tensor_hooks_give_the_same_gradients(wrap):
    torch.manual_seed(9)
    lstm = frt.LSTM(I, H, num_layers=2, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    run = lambda x: lstm(x)[0]  # noqa: E731
    wrapped = {
        "checkpoint": lambda x: torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False),
        "checkpoint_reentrant": lambda x: torch.utils.checkpoint.checkpoint(run, x, use_reentrant=True),
        "save_on_cpu": run,
    }[wrap]

    def gradients(f):  # by .backward(): reentrant checkpointing refuses torch.autograd.grad
        lstm.zero_grad()
        leaf = x.clone().requires_grad_()
        f(leaf).square().sum().backward()
        return [leaf.grad, *(p.grad for p in lstm.parameters())]

    want = gradients(run)
    with torch.autograd.graph.save_on_cpu() if wrap == "save_on_cpu" else contextlib.nullcontext():
        got = gradients(wrapped)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_saved_tensor_hooks_that_copy_and_changes_allowed_on_saved_tensors_give_torch_gradients(kind):
    """The tape reads the forward's memory; hooks that hand backward copies (a clone, an offload) or
    allow_mutation_on_saved_tensors after an in-place change must still give torch.nn's gradients."""
    torch.manual_seed(10)
    ref = getattr(nn, kind)(I, H, num_layers=2, dtype=torch.float64)
    fused = getattr(frt, kind)(I, H, num_layers=2, dtype=torch.float64)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)

    def gradients(module, context, change):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        with context():
            inner = leaf * 1.0
            y, _ = module(inner)
            if change:
                with torch.no_grad():
                    module.weight_hh_l1.mul_(0.5)
                    inner.add_(1.0)
            y.square().sum().backward()
        if change:
            with torch.no_grad():
                module.weight_hh_l1.mul_(2.0)
        return [leaf.grad, *(p.grad for p in module.parameters())]

    copying = lambda: torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t)  # noqa: E731
    for context, change in ((copying, False), (torch.autograd.graph.allow_mutation_on_saved_tensors, True)):
        for got, want in zip(gradients(fused, context, change), gradients(ref, context, change)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    live = len(_ops._live_tapes)
    gradients(fused, copying, False)
    assert len(_ops._live_tapes) == live  # the tapes run again for backward are freed with it

    def through_a_temporary_view(module):
        """The input a view made inline and gone after the call: its memory changes through its base."""
        module.zero_grad()
        base = torch.cat([x, x[:2]])
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            y, _ = module(base[:T])
            base.mul_(3.0)
            y.square().sum().backward()
        return [p.grad for p in module.parameters()]

    for got, want in zip(through_a_temporary_view(fused), through_a_temporary_view(ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_training_runs_where_torch_cannot_tell_the_saved_tensor_hooks(monkeypatch):
    """torch before 2.8 has no way to ask for the hooks in force: the layer then does not look for them."""
    monkeypatch.setattr(_ops, "_saved_tensor_hooks", None)
    gru = frt.GRU(I, H, dtype=torch.float64)
    ref = nn.GRU(I, H, dtype=torch.float64)
    ref.load_state_dict(gru.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    for module in (gru, ref):
        module(x)[0].square().sum().backward()
    torch.testing.assert_close(gru.weight_hh_l0.grad, ref.weight_hh_l0.grad, rtol=1e-12, atol=1e-12)


def test_in_place_change_of_a_weight_before_backward_is_detected():
    rnn = frt.RNN(I, H)
    y, _ = rnn(torch.randn(T, B, I))
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("hooks", [False, True], ids=["plain", "save_on_cpu"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_batch_first_input_refilled_before_backward_as_torch_nn_allows(cell, hooks):
    """A loop that refills one (B, T, I) buffer before the previous chunk's backward: the layer read a
    copy of the transposed input, so the gradients are torch.nn's (those of the data seen at forward),
    under saved-tensor hooks too."""
    ref, fused = module_pair(cell, I, H, num_layers=2, batch_first=True, dtype=torch.float64)
    data = torch.randn(B, T, I, dtype=torch.float64)
    grads = []
    for module in (ref, fused):
        buffer = data.clone().requires_grad_()
        with torch.autograd.graph.save_on_cpu() if hooks else contextlib.nullcontext():
            y, _ = module(buffer)
        with torch.no_grad():
            buffer.copy_(torch.randn(B, T, I, dtype=torch.float64))
        y.square().sum().backward()
        grads.append([buffer.grad, *(p.grad for p in module.parameters())])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_double_backward_through_a_batch_first_input_is_refused():
    rnn = frt.RNN(I, H, batch_first=True, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(rnn(x)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_in_place_change_of_an_input_read_in_place_is_still_detected():
    rnn = frt.RNN(I, H)
    x = torch.randn(T, B, I)
    y, _ = rnn(x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- torch.func -----------------------------------------------------------------------------------------


def functional_pair(cell, projected, **kwargs):
    """The module pair in float64 and, for each, f(params, x, hx) -> (y, h_n[, c_n]) through
    torch.func.functional_call, with one parameter dict that both take."""
    if projected:
        kwargs["proj_size"] = proj_of(H, projected)
    pair = module_pair(cell, I, H, dtype=torch.float64, **kwargs)

    def functional(module):
        def f(params, x, hx=None):
            y, state = torch.func.functional_call(module, params, (x, hx))
            return (y, *state) if isinstance(state, tuple) else (y, state)
        return f

    params = {n: p.detach() for n, p in pair[0].named_parameters()}
    return [functional(m) for m in pair], params


def initial_state(cell, projected, lead, batch, gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    h0 = r(lead, batch, proj_of(H, projected) or H)
    return (h0, r(lead, batch, H)) if has_cell_state(cell) else h0


def weighted_sum(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights))


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_func_grad_vjp_and_jacrev_match_torch_nn(cell, projected):
    (ref, fused), params = functional_pair(cell, projected, num_layers=2, bidirectional=True)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    hx = initial_state(cell, projected, 4, B, gen)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref(params, x, hx)]

    def loss(f):
        return lambda params, x, hx: weighted_sum(f(params, x, hx), weights)

    got = torch.func.grad(loss(fused), argnums=(0, 1, 2))(params, x, hx)
    want = torch.func.grad(loss(ref), argnums=(0, 1, 2))(params, x, hx)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert_close(g.numpy(), w.numpy(), np.float64)

    outputs, pullback = torch.func.vjp(lambda x: fused(params, x, hx), x)
    for o, w in zip(outputs, ref(params, x, hx)):
        assert_close(o.numpy(), w.numpy(), np.float64)
    (dx,) = pullback(tuple(weights))
    assert_close(dx.numpy(), want[1].numpy(), np.float64)

    # jacrev: one forward, then a vmap over the backward with the tape shared by every slice.
    jacobian = torch.func.jacrev(lambda x: fused(params, x, hx)[0])(x)
    expected = torch.autograd.functional.jacobian(lambda x: ref(params, x, hx)[0], x)
    assert_close(jacobian.numpy(), expected.numpy(), np.float64)


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_per_sample_gradients_by_vmap_of_grad_match_torch_nn(cell, projected):
    (ref, fused), params = functional_pair(cell, projected, batch_first=True)
    gen = torch.Generator().manual_seed(12)
    xs = torch.randn(B, 1, T, I, generator=gen, dtype=torch.float64)  # B samples, each a batch of one
    targets = torch.randn(B, 1, T, proj_of(H, projected) or H, generator=gen, dtype=torch.float64)

    def loss(f):
        return lambda params, x, target: (f(params, x)[0] - target).square().sum()

    got = torch.func.vmap(torch.func.grad(loss(fused)), in_dims=(None, 0, 0))(params, xs, targets)
    for k in range(B):  # torch.nn sample by sample
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        want = torch.autograd.grad(loss(ref)(leaves, xs[k], targets[k]), list(leaves.values()))
        for name, w in zip(leaves, want):
            assert got[name].shape == (B, *params[name].shape)
            assert_close(got[name][k].numpy(), w.numpy(), np.float64, name)


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_per_sample_gradients_run_as_one_batch(cell, projected, monkeypatch):
    # vmap(grad) over the inputs, the weights shared: one fused forward over every sample's rows and one
    # backward giving each sample's weight gradients apart, equal to each sample's own gradients; the
    # same with initial states batched or shared, and under a second vmap.
    (_, fused), params = functional_pair(cell, projected, num_layers=2, bidirectional=True)
    gen = torch.Generator().manual_seed(14)
    samples, rows = 3, 2
    xs = torch.randn(samples, T, rows, I, generator=gen, dtype=torch.float64)
    hx = initial_state(cell, projected, 4, rows, gen)

    def loss(p, x, hx):
        y, *state = fused(p, x, hx)
        return y.square().sum() + sum(s.sum() for s in state)

    groups = []
    by_groups = _ops._backward_by_groups
    monkeypatch.setattr(_ops, "_backward_by_groups", lambda n, *a: groups.append(n) or by_groups(n, *a))
    got = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0, None))(params, xs, hx)
    assert groups == [samples, samples]  # one backward a layer, each giving every sample's gradients
    for k in range(samples):
        want = torch.func.grad(loss, argnums=(0, 1))(params, xs[k], hx)
        for name, w in want[0].items():
            assert got[0][name].shape == (samples, *w.shape)
            assert_close(got[0][name][k].numpy(), w.numpy(), np.float64, name)
        assert_close(got[1][k].numpy(), want[1].numpy(), np.float64, "x")

    # Initial states batched with the samples.
    hxs = initial_state(cell, projected, 4, samples * rows, gen)
    hxs = tuple(h.unflatten(1, (samples, rows)).movedim(1, 0) for h in hxs) if isinstance(hxs, tuple) else (
        hxs.unflatten(1, (samples, rows)).movedim(1, 0))
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, hxs)
    for k in range(samples):
        want = torch.func.grad(loss)(params, xs[k], tuple(h[k] for h in hxs) if isinstance(hxs, tuple) else hxs[k])
        for name, w in want.items():
            assert_close(got[name][k].numpy(), w.numpy(), np.float64, name)

    nested = torch.func.vmap(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None)), in_dims=(None, 0, None))
    got = nested(params, xs.unflatten(0, (samples, 1)), hx)
    for k in range(samples):
        want = torch.func.grad(loss)(params, xs[k], hx)
        for name, w in want.items():
            assert_close(got[name][k, 0].numpy(), w.numpy(), np.float64, name)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_float32_per_sample_gradients_match_torch_nn_sample_by_sample(cell):
    # Two bidirectional layers, two rows a sample: each sample's gradients from the one grouped
    # backward against torch.nn's backward on that sample alone.
    torch.manual_seed(16)
    ref = getattr(nn, cell)(I, H, num_layers=2, bidirectional=True, batch_first=True)
    fused = frt.convert(copy.deepcopy(ref))
    params = {n: p.detach() for n, p in ref.named_parameters()}
    xs, targets = torch.randn(5, 2, T, I), torch.randn(5, 2, T, 2 * H)

    def loss(p, x, target):
        return (torch.func.functional_call(fused, p, (x,))[0] - target).square().mean()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, targets)
    for k in range(len(xs)):
        ref.zero_grad()
        (ref(xs[k])[0] - targets[k]).square().mean().backward()
        for name, p in ref.named_parameters():
            assert_close(got[name][k].numpy(), p.grad.numpy(), np.float32, f"{name}, sample {k}")


def test_per_sample_gradients_from_several_threads_at_once():
    # Four threads, each computing per-sample gradients of its own inputs with a module of its own (the
    # same weights: torch.func.functional_call swaps a module's parameters while it runs, so threads
    # cannot share one), get a quiet run's gradients, bit for bit.
    modules = [functional_pair("lstm", False) for _ in range(4)]
    params = modules[0][1]
    gen = torch.Generator().manual_seed(15)
    inputs = [torch.randn(3, T, 1, I, generator=gen, dtype=torch.float64) for _ in range(4)]
    per_sample = [torch.func.vmap(torch.func.grad(lambda p, x, f=fused: f(p, x)[0].square().sum()), in_dims=(None, 0))
                  for (_, fused), _ in modules]
    want = [per_sample[0](params, x) for x in inputs]
    errors = []

    def run(k):
        try:
            for _ in range(5):
                got = per_sample[k](params, inputs[k])
                assert all(torch.equal(got[name], want[k][name]) for name in got)
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_vmap_over_inputs_and_over_an_ensemble_of_modules(cell, projected):
    gen = torch.Generator().manual_seed(13)
    (_, fused), params = functional_pair(cell, projected)
    xs = torch.randn(T, 2, B, I, generator=gen, dtype=torch.float64)  # the vmapped dim second
    outputs = torch.func.vmap(lambda x: fused(params, x), in_dims=1)(xs)
    for k in range(2):  # the slices ran as one batch of 2*B rows: the same values, not the same bits
        for got, want in zip(outputs, fused(params, xs[:, k])):
            assert_close(got[k].numpy(), want.numpy(), np.float64)

    # Three modules' parameters stacked (torch.func.stack_module_state), one input: the forward and
    # the gradient of the summed loss with respect to every module's parameters.
    modules = [functional_pair(cell, projected)[0][1] for _ in range(3)]
    members = [{n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
               for _ in modules]
    stacked = {n: torch.stack([m[n] for m in members]) for n in params}
    x = xs[:, 0]

    def ensemble_loss(stacked):
        return torch.func.vmap(lambda p: fused(p, x)[0], in_dims=(0,))(stacked).square().sum()

    grads = torch.func.grad(ensemble_loss)(stacked)
    for k, member in enumerate(members):
        leaves = {n: p.clone().requires_grad_() for n, p in member.items()}
        loss = fused(leaves, x)[0].square().sum()
        want = torch.autograd.grad(loss, list(leaves.values()))
        for (name, g), w in zip(leaves.items(), want):
            assert_close(grads[name][k].numpy(), w.numpy(), np.float64, name)


def test_forward_mode_and_second_order_transforms_raise():
    (_, fused), params = functional_pair("lstm", False)
    x = torch.randn(T, B, I, dtype=torch.float64)
    f = lambda x: fused(params, x)[0]  # noqa: E731
    forward_mode = [
        lambda: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
        lambda: torch.func.jacfwd(f)(x),
        lambda: torch.func.hessian(lambda x: f(x).sum())(x),
    ]
    slots = [params.get(f"{n}_l0") for n in _ops.PARAMETERS] + [None] * len(_ops.PARAMETERS)
    operator = lambda x: frt.rnn_layer(x, *slots, None, None, None, "lstm", False, True)[0]  # noqa: E731
    forward_mode.append(lambda: torch.func.jvp(operator, (x,), (torch.ones_like(x),)))
    for call in forward_mode:
        with pytest.raises(NotImplementedError, match="forward-mode AD"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)  # torch.func.jvp's
            call()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            f(dual)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.jacrev(torch.func.jacrev(lambda x: f(x).sum()))(x)
    # Nested vmaps over the inputs run (the outer one as one batch, below); over an ensemble of modules
    # whose inputs are vmapped again, the backward is refused.
    def loss(p, x):
        return fused(p, x)[0].square().sum()

    stacked = {n: torch.stack([p, 2 * p]) for n, p in params.items()}
    nested = torch.func.vmap(lambda p: torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p, x[:, :2, None]))
    with pytest.raises(NotImplementedError, match="nested torch.func.vmap"):
        nested(stacked)


# ---- torch.compile, torch.export -----------------------------------------------------------------------


@pytest.mark.parametrize("cell, proj", [("lstm", 0), ("lstm", 2), ("gru", 0)], ids=["lstm", "lstm_proj", "gru"])
def test_operators_pass_opcheck(cell, proj):
    # Schema, autograd registration and fake implementation against the real one. Not
    # test_aot_dispatch_dynamic: it compares every output of two calls, and the tape handle is unique
    # to each call by design; the compile and export tests below run that path end to end.
    gen = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    gates, width = GATES[cell], proj or 3
    # Two directions, no biases; with a projection, weight_hr (P, H) and h of P features.
    weights = [[r(gates * 3, 2), r(gates * 3, width), None, None, r(proj, 3) if proj else None] for _ in range(2)]
    weights = weights[0] + weights[1]
    x, h0 = r(4, 3, 2), r(2, 3, width)
    c0 = r(2, 3, 3) if has_cell_state(cell) else None
    args = (x, *weights, h0, c0, torch.tensor([4, 2, 3]), cell, True, True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, args, test_utils=checks)
    y, h_n, c_n, tape = frt.rnn_layer(*args)
    dy, dh_n = torch.randn_like(y), torch.randn_like(h_n)
    dc_n = torch.randn_like(c_n) if has_cell_state(cell) else None
    detached = [None if w is None else w.detach() for w in weights]
    backward_args = (tape, x.detach(), *detached, dy, dh_n, dc_n, cell)
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer_backward.default, backward_args, test_utils=checks)


def test_operators_refuse_bad_operands_by_name_fake_implementations_too():
    # Called directly, the operators name what is wrong before any kernel runs; a meta tensor beside CPU
    # ones sends the call to the fake implementations, which refuse it likewise rather than return
    # uninitialised tensors.
    gen = torch.Generator().manual_seed(3)
    x, w_ih, w_hh = (torch.randn(*s, generator=gen) for s in ((5, 4, 3), (18, 3), (18, 6)))
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731

    def call(x=x, w_ih=w_ih, w_hh=w_hh, h0=None, lengths=None):
        return torch.ops.fusedrnn.rnn_layer(x, w_ih, w_hh, None, None, None, None, None, None, None, None, h0,
                                            None, lengths, "gru", True, True)

    h0 = torch.zeros(1, 4, 6)
    cases = [(dict(lengths=torch.tensor([5, 3, 2, 1], device="meta")), ValueError, r"^lengths: on meta, but input is on cpu"),
             (dict(h0=meta(h0)), ValueError, r"^h_0: on meta, but input is on cpu"),
             (dict(w_hh=meta(w_hh)), ValueError, r"^weight_hh: on meta, but input is on cpu"),
             (dict(x=x.bfloat16()), NotImplementedError, r"^input: fusedrnn supports float32 and float64, got torch.bfloat16"),
             (dict(x=x.long()), TypeError, r"^input: fusedrnn supports float32 and float64, got torch.int64"),
             (dict(h0=h0.bfloat16()), TypeError, r"^h_0: expected dtype torch.float32 \(the input's\), got torch.bfloat16"),
             (dict(x=x[0]), ValueError, r"^input: expected a 3-D tensor \(T, B, input_size\), got shape \(4, 3\)"),
             (dict(w_hh=w_hh[0]), ValueError, r"^weight_hh: expected a 2-D tensor"),
             (dict(lengths=torch.tensor([5, 3, 2, 1.5], dtype=torch.bfloat16)), ValueError, r"^lengths: expected whole numbers")]
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            call(**overrides)
    y, h_n, _, tape = call(lengths=torch.tensor([5, 3, 2, 1], dtype=torch.bfloat16))  # exact in bfloat16
    np.testing.assert_array_equal(y.numpy(), call(lengths=torch.tensor([5, 3, 2, 1]))[0].numpy())
    backward = lambda dy: torch.ops.fusedrnn.rnn_layer_backward(  # noqa: E731
        tape, x, w_ih, w_hh, None, None, None, None, None, None, None, None, dy, None, None, "gru")
    with pytest.raises(ValueError, match=r"^dy: on meta, but input is on cpu"):
        backward(meta(y))
    with pytest.raises(TypeError, match=r"^dy: expected dtype torch.float32 \(the input's\), got torch.bfloat16"):
        backward(y.bfloat16())
    # Every operand on meta: shapes only, as for any torch operator.
    on_meta = torch.ops.fusedrnn.rnn_layer(meta(x), meta(w_ih), meta(w_hh), *[None] * 11, "gru", False, True)
    assert on_meta[0].device.type == "meta" and on_meta[0].shape == (5, 4, 6)


class Stack(nn.Module):
    """Every cell, one after the other, with initial states."""

    def __init__(self):
        super().__init__()
        kw = dict(batch_first=True, dtype=torch.float64)
        self.lstm = frt.LSTM(I, H, num_layers=2, bidirectional=True, **kw)
        self.gru = frt.GRU(2 * H, H, **kw)
        self.tanh = frt.RNN(H, H, bidirectional=True, **kw)
        self.relu = frt.RNN(2 * H, H, nonlinearity="relu", **kw)

    def forward(self, x, h0, c0):
        y, (h, _) = self.lstm(x, (h0, c0))
        y, _ = self.gru(y, h[-1:])
        y, _ = self.tanh(y)
        y, h = self.relu(y)
        return y, h


def test_torch_compile_fullgraph_matches_eager():
    # backend="aot_eager": the AOTAutograd joint graph (custom op, fake implementation, autograd
    # formula) without inductor's code generation, to keep the test fast.
    torch.manual_seed(4)
    model = Stack()
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    leaves = [x, h0, c0, *model.parameters()]

    def results(fn):
        y, h = fn(x, h0, c0)
        return [y, h, *torch.autograd.grad(y.square().sum() + h.sum(), leaves)]

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for got, want in zip(results(compiled), results(model)):
        assert torch.equal(got, want)


def test_torch_compile_fullgraph_with_dropout_in_training_matches_eager():
    torch.manual_seed(4)
    model = frt.LSTM(I, H, num_layers=3, dropout=0.3, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(11)
    got = compiled(x)[0]
    torch.manual_seed(11)
    want = model(x)[0]
    assert torch.equal(got, want)


def test_torch_compile_compiles_a_new_module_once(monkeypatch):
    # The parameter names of each layer are formatted once per configuration and cached: with the cache
    # filled by the first trace, the trace guarded on the entry being absent and the next call compiled
    # again (an error under error_on_recompile).
    monkeypatch.setattr(_stack, "_weight_names", {})
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = frt.GRU(I, H, num_layers=3)
    compiled = torch.compile(model, backend=counting)
    x = torch.randn(T, B, I)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
    assert len(graphs) == 1


def test_torch_compile_of_packed_input_with_dropout_breaks_the_graph_once_whatever_the_layers():
    # torch.compile cannot trace pad_packed_sequence: the input's unpacking breaks the graph (as the
    # repacking of the output does), but the dropout between layers must not, or each layer's frame is
    # compiled apart and deep stacks reach the recompile limit.
    def graph_breaks(num_layers):
        torch.manual_seed(0)
        model = frt.LSTM(I, H, num_layers=num_layers, dropout=0.3)
        packed = pack_padded_sequence(torch.randn(T, B, I), torch.tensor([T, T - 1, 2]))
        with torch.no_grad():  # the dropout still runs: the module is in training mode
            return torch._dynamo.explain(model)(packed).graph_break_count

    torch._dynamo.reset()
    assert graph_breaks(2) == graph_breaks(6)


def _traced_where_nothing_recorded(how, model, x):
    def trace():
        if how.startswith("export"):
            return torch.export.export(model, (x,)).module()
        with warnings.catch_warnings():  # torch.jit.trace is deprecated, and warns of what it cannot trace
            warnings.simplefilter("ignore")
            return torch.jit.trace(model, (x,), check_trace=False)

    if how.endswith("no_grad"):
        with torch.no_grad():
            return trace()
    model.requires_grad_(False)  # traced frozen, trained (or explained) later
    traced = trace()
    model.requires_grad_(True)
    return traced


@pytest.mark.parametrize("how", ["jit.trace, no_grad", "export, no_grad", "jit.trace, frozen", "export, frozen"])
def test_programs_traced_where_nothing_recorded_still_differentiate(how):
    # The traced program holds record=False; where autograd needs the backward, the layer records anyway.
    ref, fused = module_pair("gru", I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    traced = _traced_where_nothing_recorded(how, fused, x)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    traced(xs[0])[0].square().sum().backward()
    ref(xs[1])[0].square().sum().backward()
    assert_close(xs[0].grad.numpy(), xs[1].grad.numpy(), np.float64)
    if how == "jit.trace, frozen":  # the parameters the trace holds learn too
        assert_close(fused.weight_hh_l0.grad.numpy(), ref.weight_hh_l0.grad.numpy(), np.float64)


def test_torch_export_traces_the_fused_operator():
    torch.manual_seed(5)
    model = Stack().eval()
    args = (torch.randn(B, T, I, dtype=torch.float64), torch.randn(4, B, H, dtype=torch.float64),
            torch.randn(4, B, H, dtype=torch.float64))
    exported = torch.export.export(model, args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("fusedrnn.rnn_layer.default") == 5  # 2 LSTM layers + GRU + 2 RNNs
    for got, want in zip(exported.module()(*args), model(*args)):
        assert torch.equal(got, want)


def test_exported_program_with_dynamic_batch_and_time_saves_and_loads():
    torch.manual_seed(5)
    model = Stack().eval()
    batch, steps = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("steps", min=1, max=512)

    def args(b, t):
        return (torch.randn(b, t, I, dtype=torch.float64), torch.randn(4, b, H, dtype=torch.float64),
                torch.randn(4, b, H, dtype=torch.float64))

    exported = torch.export.export(model, args(B, T), dynamic_shapes=({0: batch, 1: steps}, {1: batch}, {1: batch}))
    saved = io.BytesIO()
    torch.export.save(exported, saved)
    saved.seek(0)
    loaded = torch.export.load(saved).module()
    for b, t in ((B, T), (1, 1), (5, 11)):
        call = args(b, t)
        for got, want in zip(loaded(*call), model(*call)):
            assert torch.equal(got, want)


class _OperatorLog(TorchDispatchMode):
    """Records the operators a call dispatches (as make_fx's tracing mode would see them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("record", [False, True], ids=["no_grad", "recording"])
def test_eager_calls_skip_the_dispatcher_and_traced_ones_see_the_operator(record):
    torch.manual_seed(6)
    model = Stack()
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=record)
    h0, c0 = torch.randn(4, B, H, dtype=torch.float64), torch.randn(4, B, H, dtype=torch.float64)
    with torch.set_grad_enabled(record):
        calls = []
        original = _ops.rnn_layer
        _ops.rnn_layer = lambda *args: calls.append(args) or original(*args)
        try:
            eager = model(x, h0, c0)
            assert not calls  # the operator's function was called directly
            with _OperatorLog() as log:
                traced = model(x, h0, c0)
        finally:
            _ops.rnn_layer = original
        assert len(calls) == 5 and log.ops.count("fusedrnn.rnn_layer.default") == 5
    for got, want in zip(traced, eager):
        assert torch.equal(got, want)
    if record:
        leaves = [x, *model.parameters()]
        grads = [torch.autograd.grad(y.square().sum() + h.sum(), leaves) for y, h in (eager, traced)]
        for got, want in zip(*grads):
            assert torch.equal(got, want)


def test_torch_jit_trace_records_the_operator():
    torch.manual_seed(7)
    model = frt.GRU(I, H, dtype=torch.float64).eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, and warns about numpy inside
        traced = torch.jit.trace(model, (x,), check_trace=False)
        assert "fusedrnn::rnn_layer" in [node.kind() for node in traced.graph.nodes()]
        other = torch.randn(T, B, I, dtype=torch.float64)
        for got, want in zip(traced(other), model(other)):
            assert torch.equal(got, want)


# ---- training ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_two_processes(tmp_path):
    # A forkserver that has imported torch (and the torch._dynamo that DDP's constructor imports)
    # once starts both ranks in well under the time two fresh interpreters take to import it.
    mp.get_context("forkserver").set_forkserver_preload(["torch_ddp_worker", "torch._dynamo"])
    mp.start_processes(torch_ddp_worker.run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="forkserver")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, x, target = torch_ddp_worker.model_and_data()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    torch_ddp_worker.train(model, x, target)  # one process, the whole batch
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert_close(ranks[0][name].numpy(), value.numpy(), np.float64, name)
        assert not torch.equal(value, initial[name]), name  # training did move it


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_adam_training_loss_curves_agree_step_by_step(dtype):
    torch.manual_seed(6)
    x = torch.randn(16, 8, 3, dtype=dtype)
    target = x.cumsum(1)[:, -1, :1]  # sum of the first feature over the sequence

    def losses(rnn_cls):
        torch.manual_seed(7)
        model = nn.ModuleDict({"rnn": rnn_cls(3, 16, num_layers=2, batch_first=True, dtype=dtype),
                               "head": nn.Linear(16, 1, dtype=dtype)})
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        curve = []
        for _ in range(20):
            opt.zero_grad()
            y, _ = model["rnn"](x)
            loss = nn.functional.mse_loss(model["head"](y[:, -1]), target)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return np.array(curve)

    fused, ref = losses(frt.LSTM), losses(nn.LSTM)
    assert fused[-1] < 0.5 * fused[0]  # it learns
    np.testing.assert_allclose(fused, ref, rtol=1e-10 if dtype == torch.float64 else 1e-5)


def test_import_fusedrnn_does_not_import_torch():
    code = "import sys, fusedrnn; assert 'torch' not in sys.modules, 'torch was imported'; print(fusedrnn.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fusedrnn"


def test_torch_func_grad_under_a_tracer_matches_plain_grad():
    # make_fx or a dispatch mode around a grad transform: the transform's Function, with the operator
    # inside it for the tracer.
    from torch.func import functional_call, grad
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(3)
    fused = frt.GRU(I, H, dtype=torch.float64)
    params = {k: v.detach() for k, v in fused.named_parameters()}
    x = torch.randn(T, B, I, dtype=torch.float64)
    loss = grad(lambda p, x: functional_call(fused, p, (x,))[0].square().sum())
    want = loss(params, x)
    with FlopCounterMode(display=False):
        under_mode = loss(params, x)
    graph = make_fx(loss)(params, x)
    assert "fusedrnn.rnn_layer" in str(graph.graph) and "fusedrnn.rnn_layer_backward" in str(graph.graph)
    for got in (under_mode, graph(params, x)):
        for name in params:
            assert torch.equal(got[name], want[name])


def test_autograds_own_batched_gradients_are_refused_by_name():
    fused = frt.GRU(2, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    y = fused(x)[0]
    with pytest.raises(NotImplementedError, match="batched gradients through autograd's own vmap"):
        torch.autograd.grad(y, x, torch.randn(5, *y.shape, dtype=torch.float64), is_grads_batched=True)


def test_fx_symbolic_trace_says_how_to_trace_the_layer():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = frt.GRU(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = Model()
    with pytest.raises(TypeError, match=r"^input: torch.fx.symbolic_trace cannot trace into fusedrnn.torch.GRU"):
        torch.fx.symbolic_trace(model)

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, frt.GRU) or super().is_leaf_module(m, name)

    graph = torch.fx.GraphModule(model, Leaves().trace(model))
    x = torch.randn(5, 2, 3)
    assert torch.equal(graph(x), model(x))


def test_weights_of_another_size_are_refused_by_name():
    """The kernels read the hidden size from the weights: a set replaced through .data (or substituted by
    torch.func.functional_call) for another hidden or projection size, consistent in itself, would run a
    layer of that size; torch.nn refuses it, and so does the drop-in, naming the parameter."""
    x = torch.randn(4, 2, 3)

    def resized(module, **shapes):
        for name, shape in shapes.items():
            getattr(module, name).data = torch.randn(shape)
        return module

    cases = [
        (resized(frt.RNN(3, 5), weight_ih_l0=(6, 3), weight_hh_l0=(6, 6), bias_ih_l0=(6,), bias_hh_l0=(6,)),
         r"^weight_ih_l0: expected shape \(5, 3\) for RNN\(input_size=3, hidden_size=5\), got \(6, 3\)"),
        (resized(frt.LSTM(3, 5, proj_size=2), weight_hr_l0=(3, 5), weight_hh_l0=(20, 3)),
         r"^weight_hh_l0: expected shape \(20, 2\) for LSTM\(input_size=3, hidden_size=5, proj_size=2\)"),
        (resized(frt.GRU(3, 5, num_layers=2, bidirectional=True), weight_hh_l1_reverse=(15, 4)),
         r"^weight_hh_l1_reverse: expected shape \(15, 5\)"),
        (resized(frt.LSTM(3, 5, proj_size=2, num_layers=2), weight_ih_l1=(24, 2), weight_hh_l1=(24, 2),
                 weight_hr_l1=(2, 6), bias_ih_l1=(24,), bias_hh_l1=(24,)),  # the output's width unchanged
         r"^weight_ih_l1: expected shape \(20, 2\)"),
        (resized(frt.GRU(3, 5, num_layers=2), weight_ih_l0=(18, 3), weight_hh_l0=(18, 6), bias_ih_l0=(18,),
                 bias_hh_l0=(18,), weight_ih_l1=(15, 6)),  # a middle layer of another size
         r"^weight_ih_l0: expected shape \(15, 3\)"),
    ]
    for module, message in cases:
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=message):
                module(x)
    module = frt.GRU(3, 5)
    params = {**dict(module.named_parameters()), "weight_hh_l0": torch.randn(18, 6), "weight_ih_l0": torch.randn(18, 3),
              "bias_ih_l0": torch.randn(18), "bias_hh_l0": torch.randn(18)}
    with pytest.raises(ValueError, match=r"^weight_ih_l0: expected shape \(15, 3\)"):
        torch.func.functional_call(module, params, (x,))


def test_a_parameter_of_another_dtype_or_device_is_named():
    """The first parameter gives the dtype and device the call is checked against, so one parameter
    converted or moved alone was blamed on the input ("expected dtype float64 (the parameters')") or on
    a kernel slot ("bias_hh: ..."), without its layer or direction."""
    x = torch.randn(4, 2, 3)

    def changed(module, name, to):
        setattr(module, name, nn.Parameter(getattr(module, name).detach().to(to)))
        return module

    cases = [
        (changed(frt.GRU(3, 4, num_layers=2), "bias_hh_l1", torch.float64), x, TypeError,
         r"^bias_hh_l1: dtype torch.float64, where the module's other parameters have torch.float32$"),
        (changed(frt.LSTM(3, 4, bidirectional=True, num_layers=2), "weight_hh_l1_reverse", torch.float64), x,
         TypeError, r"^weight_hh_l1_reverse: dtype torch.float64, where"),
        (changed(frt.RNN(3, 4), "weight_ih_l0", torch.float64), x, TypeError, r"^weight_ih_l0: dtype torch.float64"),
        (changed(frt.RNN(3, 4), "weight_ih_l0", torch.float64), x.double(), TypeError, r"^weight_ih_l0: dtype"),
        (changed(frt.GRU(3, 4, num_layers=2), "bias_hh_l1", "meta"), x, ValueError,
         r"^bias_hh_l1: device meta, where the module's other parameters have cpu$"),
    ]
    for module, given, error, message in cases:
        with pytest.raises(error, match=message):
            module(given)


def test_modules_built_on_the_meta_device_run_once_given_real_parameters():
    """torch.nn's lazy construction: built under torch.device("meta") (no memory, no initialisation),
    then to_empty() and a checkpoint loaded; convert() of such a model too. A meta tensor still cannot run."""
    reference = nn.LSTM(3, 4, num_layers=2, proj_size=2)
    x = torch.randn(5, 2, 3)
    with torch.device("meta"):
        lazy = frt.LSTM(3, 4, num_layers=2, proj_size=2)
        model = nn.Sequential(nn.GRU(3, 4))
    with pytest.raises(NotImplementedError, match="got a tensor on meta"):
        lazy(x)
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(reference.state_dict())
    for got, want in zip(torch.utils._pytree.tree_leaves(lazy(x)), torch.utils._pytree.tree_leaves(reference(x))):
        torch.testing.assert_close(got, want)
    converted = frt.convert(model)
    assert isinstance(converted[0], frt.GRU) and converted[0].weight_ih_l0.is_meta
    converted.to_empty(device="cpu")
    assert converted[0](x)[0].shape == (5, 2, 4)
    with torch.device("meta"), pytest.raises(NotImplementedError, match="float16"):
        frt.GRU(3, 4, dtype=torch.float16)


def test_parametrized_modules_are_refused_by_convert_and_revert():
    """torch.nn.utils.parametrize turns a module into a generated subclass holding its parametrizations,
    which a swap would drop: convert and revert refuse it, naming it, and change nothing (they passed it
    over silently). Parametrizing after convert works as with torch.nn."""
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.LSTM(3, 5), nn.GRU(5, 5))
    parametrizations.weight_norm(model[0], "weight_hh_l0")
    with pytest.raises(NotImplementedError, match=r"^model: the LSTM at '0' is parametrized \(weight_hh_l0\)"):
        frt.convert(model)
    assert type(model[1]) is nn.GRU  # nothing changed
    fused = nn.Sequential(frt.LSTM(3, 5))
    parametrizations.weight_norm(fused[0], "weight_hh_l0")
    with pytest.raises(NotImplementedError, match=r"^model: the LSTM at '0' is parametrized"):
        frt.revert(fused)
    reference = nn.LSTM(3, 5)
    reference.load_state_dict({k: v for k, v in fused[0].state_dict().items() if "parametrizations" not in k},
                              strict=False)
    parametrizations.weight_norm(reference, "weight_hh_l0")
    reference.load_state_dict(fused[0].state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(fused(x)[0], reference(x)[0])

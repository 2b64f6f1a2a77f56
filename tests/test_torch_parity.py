"""Outputs and every gradient equal torch.nn.LSTM / GRU / RNN's on the same weights.

torch is an optional extra; this module is skipped when it is not installed. Dropout is 0 throughout:
torch's dropout masks come from its own generator and cannot be reproduced."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from helpers import CELL_CASES, CELLS, assert_close, has_cell_state, make_module, proj_of  # noqa: E402

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

# Every test here runs on each SIMD level of the kernels this machine supports.
pytestmark = pytest.mark.usefixtures("simd_level")


def torch_module(cell, input_size, hidden_size, dtype, seed, **kwargs):
    torch.manual_seed(seed)
    tdtype = TORCH_DTYPES[np.dtype(dtype)]
    proj_size = kwargs.pop("proj_size", 0)
    if proj_size:  # GRU and RNN refuse the argument itself, even as 0
        kwargs["proj_size"] = proj_size
    if cell == "lstm":
        return torch.nn.LSTM(input_size, hidden_size, dtype=tdtype, **kwargs)
    if cell == "gru":
        return torch.nn.GRU(input_size, hidden_size, dtype=tdtype, **kwargs)
    return torch.nn.RNN(input_size, hidden_size, nonlinearity=cell[len("rnn_"):], dtype=tdtype, **kwargs)


def run_torch(tm, cell, x, h0, c0, lengths, dy, dh_n, dc_n, batch_first):
    """Forward and backward through torch with loss = <y, dy> + <h_n, dh_n> (+ <c_n, dc_n>).
    An absent h0/c0 is fed as zeros with requires_grad, so torch also reports dh0/dc0 for it."""
    tm.zero_grad()
    xt = torch.tensor(x, requires_grad=True)
    lead = (tm.num_layers * (2 if tm.bidirectional else 1),) + (
        (x.shape[0 if batch_first else 1],) if x.ndim == 3 else ())
    h_zeros = np.zeros(lead + (tm.proj_size or tm.hidden_size,), x.dtype)
    c_zeros = np.zeros(lead + (tm.hidden_size,), x.dtype)
    ht = torch.tensor(h_zeros if h0 is None else h0, requires_grad=True)
    ct = torch.tensor(c_zeros if c0 is None else c0, requires_grad=True)
    hx = (ht, ct) if has_cell_state(cell) else ht
    if lengths is None:
        y, state = tm(xt, hx)
    else:
        steps = x.shape[1 if batch_first else 0]
        packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        y_packed, state = tm(packed, hx)
        y, _ = pad_packed_sequence(y_packed, batch_first=batch_first, total_length=steps)
    h_n, c_n = state if has_cell_state(cell) else (state, None)
    loss = (y * torch.from_numpy(dy)).sum() + (h_n * torch.from_numpy(dh_n)).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.from_numpy(dc_n)).sum()
    loss.backward()
    out = {"y": y, "h_n": h_n, "c_n": c_n, "dx": xt.grad, "dh0": ht.grad,
           "dc0": ct.grad if has_cell_state(cell) else None}
    out = {k: None if v is None else v.detach().numpy() for k, v in out.items()}
    out["grads"] = {name: p.grad.numpy() for name, p in tm.named_parameters()}
    return out


def run_fusedrnn(m, cell, x, h0, c0, lengths, dy, dh_n, dc_n):
    hx = (h0, c0) if has_cell_state(cell) else h0
    if has_cell_state(cell) and h0 is None:
        hx = None
    y, state = m(x, hx, lengths=lengths)
    h_n, c_n = state if has_cell_state(cell) else (state, None)
    dx, dstate = m.backward(dy, (dh_n, dc_n) if has_cell_state(cell) else dh_n)
    dh0, dc0 = dstate if has_cell_state(cell) else (dstate, None)
    return {"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0, "grads": m.grads}


def compare(cell, got, want, dtype):
    for key in ("y", "h_n", "c_n", "dx", "dh0", "dc0"):
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key].dtype == dtype, key
            assert_close(got[key], want[key], dtype, key)
    assert list(got["grads"]) == list(want["grads"])
    for name, g in want["grads"].items():
        assert_close(got["grads"][name], g, dtype, f"grad {name}")


def check_parity(rng, cell, dtype, steps, batch, inp, hidden, *, num_layers=1, bidirectional=False,
                 batch_first=False, with_state=True, lengths=None, bias=True, unbatched=False, proj_size=0):
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                  proj_size=proj_size)
    tm = torch_module(cell, inp, hidden, dtype, seed=int(rng.integers(2**31)), **kwargs)
    if not proj_size:
        del kwargs["proj_size"]
    m = make_module(cell, inp, hidden, dtype=dtype, **kwargs)
    m.load_state_dict(tm.state_dict())  # torch tensors, as they come
    lead = num_layers * (2 if bidirectional else 1)
    width = proj_size or hidden  # of h and each direction's y; c keeps hidden
    dirs_h = width * (2 if bidirectional else 1)
    rows = () if unbatched else (batch,)
    x_shape = (steps, inp) if unbatched else ((batch, steps, inp) if batch_first else (steps, batch, inp))
    y_shape = x_shape[:-1] + (dirs_h,)
    h_shape, c_shape = (lead, *rows, width), (lead, *rows, hidden)
    r = lambda shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    x = r(x_shape)
    h0 = r(h_shape) if with_state else None
    c0 = r(c_shape) if with_state and has_cell_state(cell) else None
    dy, dh_n = r(y_shape), r(h_shape)
    dc_n = r(c_shape) if has_cell_state(cell) else None
    want = run_torch(tm, cell, x, h0, c0, lengths, dy, dh_n, dc_n, batch_first)
    got = run_fusedrnn(m, cell, x, h0, c0, lengths, dy, dh_n, dc_n)
    compare(cell, got, want, dtype)
    return got, want


LENGTH_CASES = {
    "full": None,
    "lengths": np.array([3, 5, 1]),      # unsorted; the longest row covers every step
    "short": np.array([2, 1, 3]),        # every row ends before T: trailing steps are all padding
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lengths", list(LENGTH_CASES), ids=list(LENGTH_CASES))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_major", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_parity_with_torch(rng, cell, projected, num_layers, bidirectional, batch_first, with_state, lengths,
                           dtype):
    got, _ = check_parity(rng, cell, np.dtype(dtype), 5, 3, 4, 6, num_layers=num_layers,
                          bidirectional=bidirectional, batch_first=batch_first, with_state=with_state,
                          lengths=LENGTH_CASES[lengths], proj_size=proj_of(6, projected))
    if LENGTH_CASES[lengths] is not None:
        y = got["y"].transpose(1, 0, 2) if batch_first else got["y"]
        for b, length in enumerate(LENGTH_CASES[lengths]):
            assert np.all(y[length:, b] == 0.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_parity_without_bias(rng, cell, projected, dtype):
    got, _ = check_parity(rng, cell, np.dtype(dtype), 4, 3, 5, 4, num_layers=2, bidirectional=True,
                          bias=False, lengths=np.array([4, 2, 3]), proj_size=proj_of(4, projected))
    assert not any("bias" in name for name in got["grads"])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "hx"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_parity_unbatched(rng, cell, projected, with_state, bidirectional):
    # torch.nn accepts a 2-D (T, input_size) sequence with 2-D (L*D, H) states; so must fusedrnn.
    got, _ = check_parity(rng, cell, np.dtype(np.float64), 6, 1, 3, 5, num_layers=2,
                          bidirectional=bidirectional, with_state=with_state, unbatched=True,
                          proj_size=proj_of(5, projected))
    assert got["y"].ndim == 2 and got["h_n"].ndim == 2 and got["dx"].shape == (6, 3)


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (6, 1, 4, 5), (4, 3, 2, 1), (3, 2, 5, 129), (5, 4, 11, 3)],
                         ids=["T1", "B1", "H1", "H129", "I11"])
@pytest.mark.parametrize("cell", CELLS)
def test_parity_odd_sizes(rng, cell, shape):
    steps, batch, inp, hidden = shape
    lengths = np.maximum(1, steps - np.arange(batch) % steps)
    check_parity(rng, cell, np.dtype(np.float64), steps, batch, inp, hidden, bidirectional=True,
                 lengths=lengths)


# (T, B, I, H, P): a projection to one feature, P = H - 1, H = 129 with odd P, a single step and row.
PROJECTED_SHAPES = {"P1": (4, 3, 4, 5, 1), "P_H-1": (4, 3, 2, 6, 5), "H129-P43": (3, 2, 5, 129, 43),
                    "H129-P1": (3, 2, 5, 129, 1), "T1": (1, 3, 4, 5, 2), "B1": (6, 1, 4, 5, 3),
                    "H2-P1": (5, 3, 3, 2, 1)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(PROJECTED_SHAPES.values()), ids=list(PROJECTED_SHAPES))
def test_parity_odd_sizes_projected(rng, shape, dtype):
    steps, batch, inp, hidden, proj = shape
    lengths = np.maximum(1, steps - np.arange(batch) % steps)
    got, _ = check_parity(rng, "lstm", np.dtype(dtype), steps, batch, inp, hidden, num_layers=2,
                          bidirectional=True, lengths=lengths, proj_size=proj)
    assert got["y"].shape == (steps, batch, 2 * proj) and got["c_n"].shape == (4, batch, hidden)
    assert got["grads"]["weight_hr_l1_reverse"].shape == (proj, hidden)


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_parity_longer_sequence_float32(rng, cell, projected):
    # Errors must not grow out of bounds along a longer sequence at float32.
    check_parity(rng, cell, np.dtype(np.float32), 40, 4, 16, 32, num_layers=2, bidirectional=True,
                 lengths=np.array([40, 13, 1, 27]), proj_size=proj_of(32, projected))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 3], ids=["L1", "L3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_parameter_names_and_shapes_match_torch(cell, projected, bias, num_layers, bidirectional):
    kwargs = dict(num_layers=num_layers, bias=bias, bidirectional=bidirectional)
    if projected:
        kwargs["proj_size"] = proj_of(5, projected)
    tm = torch_module(cell, 7, 5, np.float32, seed=0, **kwargs)
    m = make_module(cell, 7, 5, **kwargs)
    want = [(name, tuple(p.shape)) for name, p in tm.named_parameters()]
    assert [(name, p.shape) for name, p in m.named_parameters()] == want
    assert [(name, v.shape) for name, v in m.state_dict().items()] == want
    assert [p.shape for p in m.parameters()] == [s for _, s in want]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_state_dict_round_trip_into_torch(rng, cell, projected, dtype):
    # fusedrnn's state_dict loads into torch unchanged (strict) and both then compute the same thing.
    kwargs = dict(num_layers=2, bidirectional=True)
    if projected:
        kwargs["proj_size"] = proj_of(6, projected)
    m = make_module(cell, 4, 6, dtype=dtype, seed=7, **kwargs)
    tm = torch_module(cell, 4, 6, dtype, seed=1, **kwargs)
    result = tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in tm.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), getattr(m, name))
    x = rng.standard_normal((5, 3, 4)).astype(dtype)
    with torch.no_grad():
        y_torch, _ = tm(torch.from_numpy(x))
    m.eval()
    y, _ = m(x)
    assert_close(y, y_torch.numpy(), np.dtype(dtype), "y")


def test_load_state_dict_casts_torch_float32_into_float64_module(rng):
    tm = torch_module("lstm", 3, 4, np.float32, seed=3)
    m = make_module("lstm", 3, 4, dtype=np.float64)
    m.load_state_dict(tm.state_dict())
    for name, p in tm.named_parameters():
        assert getattr(m, name).dtype == np.float64
        np.testing.assert_array_equal(getattr(m, name), p.detach().numpy().astype(np.float64))


def test_load_state_dict_takes_a_bfloat16_torch_state_dict():
    """NumPy has no bfloat16; such a state dict (torch.nn.LSTM(...).to(torch.bfloat16)) loads as torch.nn
    loads it, cast to the module's dtype."""
    tm = torch_module("lstm", 3, 4, np.float32, seed=3).to(torch.bfloat16)
    m = make_module("lstm", 3, 4, dtype=np.float32)
    m.load_state_dict(tm.state_dict())
    for name, p in tm.named_parameters():
        np.testing.assert_array_equal(getattr(m, name), p.detach().float().numpy())


def test_load_state_dict_accepts_parameters_requiring_grad():
    # A dict built from named_parameters() holds tensors with requires_grad=True.
    tm = torch_module("gru", 3, 4, np.float64, seed=4)
    m = make_module("gru", 3, 4, dtype=np.float64)
    m.load_state_dict(dict(tm.named_parameters()))
    for name, p in tm.named_parameters():
        np.testing.assert_array_equal(getattr(m, name), p.detach().numpy())

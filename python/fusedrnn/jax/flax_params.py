"""Converters between fusedrnn/torch.nn parameters (one layer direction) and the parameters of Flax's
LSTM and GRU cells (flax.linen OptimizedLSTMCell, LSTMCell and GRUCell, which share one layout).

Flax keeps one Dense per gate and side: a kernel (input, H) = torch's gate rows transposed. Its LSTM
has a bias on the recurrent side only (`h{i,f,g,o}`), so torch's two biases add up there. Its GRU
has input-side biases for r and z (`ir`, `iz`: b_i + b_h add up) and, like torch, keeps n's two biases
apart because b_hn sits inside r * (W_hn h + b_hn): `in` holds b_in and `hn` b_hn. Going from Flax to
torch the sums land in bias_ih and bias_hh holds zeros for those gates (the same function).

Flax's cells have no projection. An LSTM's weight_hr (P, H) (torch's proj_size) travels as the entry
"proj": {"kernel": (H, P)}, the kernel of a bias-free Dense(P) applied to the cell's output o*tanh(c);
the recurrent kernels "h*" are then (P, H), read from the projected h. Flax's LSTM cells cannot run
such parameters themselves (their h is H wide); the entry keeps the conversion lossless."""

from __future__ import annotations

import jax.numpy as jnp

from ._rnn import _array

_GATES = {"lstm": "ifgo", "gru": "rzn"}


def _cell_gates(cell: str) -> str:
    if cell not in _GATES:
        raise ValueError(f"cell: Flax cells exist for {tuple(_GATES)}, got {cell!r}")
    return _GATES[cell]


def _suffix(layer: int, reverse: bool) -> str:
    return f"_l{layer}" + ("_reverse" if reverse else "")


def to_flax(cell: str, params, *, layer: int = 0, reverse: bool = False) -> dict:
    """The Flax cell parameters ({"ii": {"kernel": ...}, "hi": {...}, ...}) of one layer direction of
    torch-named `params` (a cell without biases gets zero biases), and "proj" when an LSTM's params have
    weight_hr (a projection)."""
    gates = _cell_gates(cell)
    s = _suffix(layer, reverse)
    for name in ("weight_ih" + s, "weight_hh" + s):
        if name not in params:
            raise ValueError(f"params: no {name!r} for layer {layer}{' reverse' if reverse else ''} (the params hold "
                             f"{sorted(params)})")
    w_ih, w_hh = (_array(name + s, params[name + s]) for name in ("weight_ih", "weight_hh"))
    if w_hh.ndim != 2 or w_hh.shape[0] == 0 or w_hh.shape[0] % len(gates):
        raise ValueError(f"weight_hh{s}: expected {len(gates)}*hidden_size rows (a {cell}'s {len(gates)} gates), "
                         f"got shape {tuple(w_hh.shape)}")
    hidden = w_hh.shape[0] // len(gates)
    w_hr = _array("weight_hr" + s, params["weight_hr" + s]) if "weight_hr" + s in params else None
    if w_hr is not None and cell != "lstm":
        raise ValueError(f"params: weight_hr{s} given, but {cell!r} takes no projection (only an LSTM does)")
    width = w_hr.shape[0] if w_hr is not None and w_hr.ndim == 2 else hidden  # h's: the projection's if any
    if w_hr is not None and not 0 < width < hidden:
        raise ValueError(f"weight_hr{s}: expected shape (proj_size, {hidden}) with 0 < proj_size < hidden_size "
                         f"({hidden}, from weight_hh{s}), got {tuple(w_hr.shape)}")
    zeros = jnp.zeros(w_hh.shape[0], w_hh.dtype)
    b_ih, b_hh = (_array(name + s, params.get(name + s, zeros)) for name in ("bias_ih", "bias_hh"))
    expected = {"weight_hh": (len(gates) * hidden, width), "weight_ih": (len(gates) * hidden, w_ih.shape[1] if w_ih.ndim == 2 else "input_size"),
                "bias_ih": (len(gates) * hidden,), "bias_hh": (len(gates) * hidden,), "weight_hr": (width, hidden)}
    for name, value in (("weight_hh", w_hh), ("weight_ih", w_ih), ("bias_ih", b_ih), ("bias_hh", b_hh),
                        ("weight_hr", w_hr)):
        if value is not None and tuple(value.shape) != expected[name]:
            raise ValueError(f"{name}{s}: expected shape {expected[name]} for a {cell} of hidden size {hidden} "
                             f"(from weight_hh{s}), got {tuple(value.shape)}")
    rows = {g: slice(k * hidden, (k + 1) * hidden) for k, g in enumerate(gates)}
    out = {}
    for g, r in rows.items():
        out["i" + g] = {"kernel": w_ih[r].T}
        out["h" + g] = {"kernel": w_hh[r].T}
    if cell == "lstm":
        for g, r in rows.items():
            out["h" + g]["bias"] = b_ih[r] + b_hh[r]
    else:
        for g in "rz":
            out["i" + g]["bias"] = b_ih[rows[g]] + b_hh[rows[g]]
        out["in"]["bias"] = b_ih[rows["n"]]
        out["hn"]["bias"] = b_hh[rows["n"]]
    if w_hr is not None:
        out["proj"] = {"kernel": w_hr.T}
    return out


def from_flax(cell: str, flax_params, *, layer: int = 0, reverse: bool = False) -> dict:
    """Torch-named parameters (weight_ih_l{layer}[_reverse], ..., bias_hh_...) of one layer direction
    from a Flax cell's parameters; with an LSTM's "proj" entry (a projection), also weight_hr_...."""
    gates = _cell_gates(cell)
    s = _suffix(layer, reverse)
    expected = {side + g for side in "ih" for g in gates}
    projected = cell == "lstm" and "proj" in flax_params
    if set(flax_params.keys()) != expected | ({"proj"} if projected else set()):
        optional = " (and 'proj', a projection)" if cell == "lstm" else ""
        raise ValueError(f"flax_params: expected the entries {sorted(expected)}{optional} of a Flax {cell} cell, "
                         f"got {sorted(flax_params.keys())}")

    def entry(name: str, field: str, shape=None):
        """flax_params[name][field] as a JAX array, of `shape` where given (a size None: any)."""
        try:
            value = jnp.asarray(flax_params[name][field])
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"flax_params[{name!r}]: expected a {field!r} entry (a Flax Dense's), got "
                             f"{type(flax_params[name]).__name__} without it") from err
        if shape is not None and (value.ndim != len(shape) or any(
                want is not None and got != want for got, want in zip(value.shape, shape))):
            raise ValueError(f"flax_params[{name!r}][{field!r}]: expected shape "
                             f"{tuple('*' if w is None else w for w in shape)} (the sizes of flax_params"
                             f"[{'i' + gates[0]!r}]['kernel']{' and proj' if projected else ''}), got "
                             f"{tuple(value.shape)}")
        return value

    # The sizes from the first gate's kernels; every other entry must agree with them.
    inp, hidden = entry("i" + gates[0], "kernel", (None, None)).shape
    state = entry("proj", "kernel", (hidden, None)).shape[1] if projected else hidden
    if projected and not 0 < state < hidden:
        raise ValueError(f"flax_params['proj']['kernel']: expected shape ({hidden}, proj_size) with 0 < proj_size < "
                         f"hidden_size ({hidden}), got {tuple(flax_params['proj']['kernel'].shape)}")
    kernel = lambda name: entry(name, "kernel", (inp if name[0] == "i" else state, hidden)).T  # noqa: E731
    bias = lambda name: entry(name, "bias", (hidden,))  # noqa: E731
    w_ih = jnp.concatenate([kernel("i" + g) for g in gates])
    w_hh = jnp.concatenate([kernel("h" + g) for g in gates])
    zeros = jnp.zeros(w_hh.shape[1], w_hh.dtype)
    if cell == "lstm":
        b_ih = jnp.concatenate([bias("h" + g) for g in gates])
        b_hh = jnp.zeros_like(b_ih)
    else:
        b_ih = jnp.concatenate([bias("ir"), bias("iz"), bias("in")])
        b_hh = jnp.concatenate([zeros, zeros, bias("hn")])
    out = {"weight_ih" + s: w_ih, "weight_hh" + s: w_hh, "bias_ih" + s: b_ih, "bias_hh" + s: b_hh}
    if projected:
        out["weight_hr" + s] = entry("proj", "kernel").T
    return out

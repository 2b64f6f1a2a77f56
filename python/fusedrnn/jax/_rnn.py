"""Functional LSTM, GRU and RNN stacks for JAX over the fused kernels: parameters as a dict keyed and
shaped like torch.nn's state_dict, traceable (jit, grad, vmap, shard_map), one FFI call per layer.

Conventions are the NumPy modules' (fusedrnn.modules): x (T, B, I), (B, T, I) with batch_first, or
unbatched (T, I); states (L*D, B, H); y (T, B, D*H); LSTM returns (y, (h_n, c_n)), GRU and RNN (y, h_n).
An LSTM with a projection (torch.nn.LSTM's proj_size P, parameters weight_hr_l{k} (P, H)) has h0, h_n
and y of P features per direction (the next layer's input D*P wide, weight_hh (4H, P)); c stays H wide.
The loop over layers is the shared layer-stack driver's (fusedrnn._stack.over_layers).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks, _stack
from ..functional import CELLS, GATES, has_cell_state, takes_projection
from . import _ffi

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
_NAME = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


def param_names(num_layers: int = 1, *, bias: bool = True, bidirectional: bool = False,
                proj_size: int = 0) -> list[str]:
    """The parameter names of a stack, in torch.nn's order (weight_hr last in each direction when
    proj_size > 0)."""
    num_layers = _checks.positive_int("num_layers", num_layers)
    proj_size = _checks.positive_int("proj_size", proj_size, minimum=0)  # its bound needs hidden_size
    bias, bidirectional = _checks.flag("bias", bias), _checks.flag("bidirectional", bidirectional)
    kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
    kinds += ("weight_hr",) if proj_size else ()
    suffixes = ("", "_reverse") if bidirectional else ("",)
    return [f"{k}_l{layer}{s}" for layer in range(num_layers) for s in suffixes for k in kinds]


def param_shapes(cell: str, input_size: int, hidden_size: int, num_layers: int = 1, *, bias: bool = True,
                 bidirectional: bool = False, proj_size: int = 0) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter of a stack, as torch.nn's state_dict has them. proj_size (an
    LSTM's, 0 < proj_size < hidden_size; 0: none) adds weight_hr (proj_size, hidden_size) and makes h,
    hence weight_hh's columns and the next layer's input, proj_size wide per direction."""
    _checks.cell(cell)
    input_size = _checks.positive_int("input_size", input_size)
    hidden_size = _checks.positive_int("hidden_size", hidden_size)
    num_layers = _checks.positive_int("num_layers", num_layers)
    proj_size = _checks.proj_size(proj_size, hidden_size, cell)
    bias, bidirectional = _checks.flag("bias", bias), _checks.flag("bidirectional", bidirectional)
    width = proj_size or hidden_size
    gh = GATES[cell] * hidden_size
    dirs = 2 if bidirectional else 1
    shapes = {}
    for name in param_names(num_layers, bias=bias, bidirectional=bidirectional, proj_size=proj_size):
        kind, layer = _NAME.match(name).group(1, 2)
        inputs = input_size if layer == "0" else dirs * width
        shapes[name] = {"weight_ih": (gh, inputs), "weight_hh": (gh, width),
                        "weight_hr": (proj_size, hidden_size)}.get(kind, (gh,))
    return shapes


def init(key, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, *, bias: bool = True,
         bidirectional: bool = False, proj_size: int = 0, dtype=jnp.float32) -> dict:
    """Parameters drawn as torch.nn draws them: every entry (weight_hr's too) uniform in
    [-1/sqrt(H), 1/sqrt(H)], one key split per parameter."""
    dtype = jnp.dtype(_checks.float_dtype("dtype", dtype))
    shapes = param_shapes(cell, input_size, hidden_size, num_layers, bias=bias, bidirectional=bidirectional,
                          proj_size=proj_size)
    bound = 1.0 / math.sqrt(hidden_size)
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.uniform(k, shape, dtype, -bound, bound) for k, (name, shape) in zip(keys, shapes.items())}


def _structure(params) -> tuple[int, bool, bool, bool]:
    """(num_layers, bidirectional, bias, projected) of a parameter dict whose names are exactly a
    stack's."""
    if not hasattr(params, "keys"):
        raise TypeError(f"params: expected a mapping of torch.nn parameter names to arrays, got "
                        f"{type(params).__name__}")
    names = set(params.keys())
    parsed = [_NAME.match(n) if isinstance(n, str) else None for n in names]
    if not names or any(m is None for m in parsed):
        bad = sorted(str(n) for n, m in zip(names, parsed) if m is None)
        raise ValueError(f"params: expected torch.nn names such as 'weight_ih_l0', got {bad or 'no entries'}")
    num_layers = 1 + max(int(m.group(2)) for m in parsed)
    bidirectional = any(m.group(3) for m in parsed)
    bias = any(m.group(1).startswith("bias") for m in parsed)
    projected = any(m.group(1) == "weight_hr" for m in parsed)
    want = set(param_names(num_layers, bias=bias, bidirectional=bidirectional, proj_size=int(projected)))
    if names != want:
        raise ValueError(f"params: missing {sorted(want - names)} / unexpected {sorted(names - want)} for "
                         f"{num_layers} layer(s), bidirectional={bidirectional}, bias={bias}, "
                         f"projection={projected}")
    return num_layers, bidirectional, bias, projected


def _array(name: str, value, dtype=None, whose: str = "x's"):
    """`value` as a JAX array, of exactly `dtype` (`whose`) when given. The dtype the caller passed is compared,
    before JAX's canonicalisation (float64 becomes float32 without jax_enable_x64) could hide a mix.
    A NumPy array of the other byte order is taken as its values (JAX takes the native order only)."""
    if isinstance(value, np.ndarray) and not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    try:
        arr = value if isinstance(value, jax.Array) else jnp.asarray(value)
        given = np.dtype(getattr(value, "dtype", arr.dtype))
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a torch tensor that requires grad
        of_dtype = f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else ""
        raise TypeError(f"{name}: expected a JAX or NumPy array of numbers, got {type(value).__name__}"
                        f"{of_dtype}") from err
    if dtype is not None:
        for got in (arr.dtype, given):
            if np.dtype(got) != np.dtype(dtype):
                raise TypeError(f"{name}: expected dtype {np.dtype(dtype)} ({whose}), got {np.dtype(got)}")
    return arr


def _checked_dropout_key(key):
    """One PRNG key (jax.random.key's, or a raw uint32 key of jax.random.PRNGKey), or None."""
    if key is None:
        return None
    if not isinstance(key, jax.Array):
        raise TypeError(f"dropout_key: expected a PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (key.shape == () if typed else key.dtype == jnp.uint32 and key.ndim == 1):
        raise ValueError(f"dropout_key: expected one PRNG key (jax.random.key(seed)), got dtype {key.dtype} and "
                         f"shape {tuple(key.shape)}")
    return key


def _check_x_rank(shape) -> None:
    if len(shape) not in (2, 3):
        raise ValueError(f"x: expected a 2-D or 3-D array, got shape {tuple(shape)}")


def _check_x_width(features: int, w_ih0) -> None:
    """x's last dimension is weight_ih_l0's input size (another rank of weight_ih_l0 is that parameter's
    own error)."""
    if w_ih0.ndim == 2 and w_ih0.shape[1] != features:
        raise ValueError(f"x: expected input_size {w_ih0.shape[1]} in the last dimension "
                         f"(weight_ih_l0 is {tuple(w_ih0.shape)}), got {features}")


def _shape(name: str, arr, expected) -> None:
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(arr.shape)}")


def _projected_sizes(cell: str, w_hh0, w_hr0) -> tuple[int, int]:
    """(H, P) of a projected stack: H from weight_hh_l0's rows (gates*H), P from weight_hr_l0's, so that
    a mismatch elsewhere is reported against the parameter that has it."""
    gates = GATES[cell]
    if w_hh0.shape[0] < gates or w_hh0.shape[0] % gates:
        raise ValueError(f"weight_hh_l0: expected {gates}*hidden_size rows, got shape {tuple(w_hh0.shape)}")
    hidden = w_hh0.shape[0] // gates
    if w_hr0.ndim != 2 or not 0 < w_hr0.shape[0] < hidden:
        raise ValueError(f"weight_hr_l0: expected shape (proj_size, {hidden}) with 0 < proj_size < hidden_size "
                         f"({hidden}, from weight_hh_l0), got {tuple(w_hr0.shape)}")
    return hidden, w_hr0.shape[0]


def _checked_lengths(lengths, steps: int, batch: int):
    """int32 (B,) lengths, or None when absent. Known values (not traced) get the NumPy modules' checks;
    traced ones are checked by the kernel call at run time, where a traced float length that is not a
    whole number within int32's range is reported as 0 at its index."""
    if lengths is None:
        return None
    if not isinstance(lengths, jax.core.Tracer) and any(isinstance(v, jax.core.Tracer)
                                                        for v in jax.tree.leaves(lengths)):
        lengths = _array("lengths", lengths)  # a list passed through jit: traced entries
    if isinstance(lengths, jax.core.Tracer):
        if lengths.shape != (batch,):
            raise ValueError(f"lengths: expected shape ({batch},) (one length per batch row), got {lengths.shape}")
        if jnp.issubdtype(lengths.dtype, jnp.floating):  # the NumPy modules' rule: whole numbers
            wide = lengths.astype(jnp.promote_types(lengths.dtype, jnp.float32))  # holds 2**31 (float16 does not)
            whole = (wide == jnp.round(wide)) & (jnp.abs(wide) < 2.0**31)  # NaN and inf are not
            return jnp.where(whole, wide, 0).astype(jnp.int32)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype}")
        return _int_lengths(lengths)
    checked = _checks.lengths(np.asarray(lengths), steps, batch)
    return None if checked is None else jnp.asarray(checked, jnp.int32)


def _int_lengths(lengths):
    """Traced integer lengths as the kernel call reads them (32- or 64-bit, signed or not), never narrowed
    into range: the call's run-time check must see, and report, a value outside [1, T] as given."""
    if jnp.dtype(lengths.dtype).itemsize >= 4:
        return lengths
    return lengths.astype(jnp.int32)


def _finite_on_host(name: str, arr) -> bool:
    """Refuses NaN or infinity in `arr` where its values are known and in the host's memory (an eager
    call's array on one CPU device): a ValueError naming it, as the NumPy modules raise, where the
    kernel's run-time error reaches Python as JaxRuntimeError or, from JAX's fast path for a call it ran
    before, as ValueError. Returns whether it checked: a traced array, or one elsewhere (whose copy to
    the host would cost more than the check), is left to the kernel."""
    if isinstance(arr, jax.core.Tracer) or not arr.is_fully_addressable:
        return False
    devices = arr.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return False
    _checks.finite(name, np.asarray(arr))  # a view of the CPU buffer, not a copy
    return True


def _static(name: str, value, kind: str):
    """`value` as given, where a traced one (an option passed through jit, grad or vmap) is refused:
    the options choose what is compiled."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name}: expected a Python {kind} (a static option: pass it outside the "
                        "transformed function, or name it in jit's static_argnames), got a traced value")
    return value


def dropout_on(deterministic, dropout: float, num_layers: int) -> bool:
    """Whether the Flax modules' dropout between layers runs: dropout > 0, more than one layer, and not
    `deterministic` (None: not). Only where dropout could run is `deterministic` read, and then it must
    be a static bool; elsewhere it changes nothing (a traced one, as jax.eval_shape passes, included)."""
    if dropout == 0 or num_layers == 1:
        return False
    if deterministic is None:
        return True
    return not _checks.flag("deterministic", _static("deterministic", deterministic, "bool"))


def forward(cell: str, params, x, hx=None, *, lengths=None, batch_first: bool = False, dropout: float = 0.0,
            dropout_key=None, cell_clip: float | None = None, check_finite: bool = True):
    """Runs a stack of `cell` layers ("lstm", "gru", "rnn_tanh", "rnn_relu") given torch.nn-named
    `params` (the number of layers, directions and biases, and an LSTM's projection, follow from the
    names: weight_hr_l{k}[_reverse] (P, H) project h to P features, as torch.nn.LSTM(proj_size=P)).

    x: (T, B, I), (B, T, I) with batch_first, or unbatched (T, I). hx: None (zeros); for LSTM a pair
    (h0, c0), else h0; each (L*D, B, H) ((L*D, H) unbatched), h0 (L*D, B, P) with a projection.
    lengths: (B,) ints (or whole-number floats) in [1, T]; row b stops at its own last step (later
    outputs zero, h_n its state there). dropout: probability of zeroing each inner layer's output,
    applied only when `dropout_key` (a PRNG key) is given. cell_clip: LSTM only, bounds |c|.
    check_finite: NaN or infinity in x, the states or the incoming gradients raise at run time (an
    error from the call); in x and the states of an eager call (arrays known, on one CPU device), a
    ValueError before it runs.

    Returns (y, (h_n, c_n)) for LSTM, else (y, h_n); y has D*H features (D*P with a projection, as
    h_n has P)."""
    _checks.cell(cell)
    batch_first = _checks.flag("batch_first", _static("batch_first", batch_first, "bool"))
    dropout = _checks.probability("dropout", _static("dropout", dropout, "float"))
    dropout_key = _checked_dropout_key(dropout_key)
    num_layers, bidirectional, bias, projected = _structure(params)
    if projected and not takes_projection(cell):
        raise ValueError(f"weight_hr_l0: {cell!r} takes no projection (proj_size; only an LSTM does)")
    dirs = 2 if bidirectional else 1
    given = getattr(x, "dtype", None)
    x = _array("x", x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected float32 or float64, got {x.dtype}")
    if given is not None and np.dtype(given).newbyteorder("=") != x.dtype:
        raise TypeError(f"x: got dtype {np.dtype(given)}, which JAX runs as {x.dtype} without jax_enable_x64: "
                        f"pass {x.dtype}, or enable float64 (jax.config.update('jax_enable_x64', True))")
    _check_x_rank(x.shape)
    dtype = x.dtype
    unbatched = x.ndim == 2
    seq = x[:, None, :] if unbatched else (jnp.swapaxes(x, 0, 1) if batch_first else x)
    steps, batch, features = seq.shape
    if steps == 0 or batch == 0:
        raise ValueError(f"x: empty input (no time steps or an empty batch), got shape {tuple(x.shape)}")

    w_hh0 = _array("weight_hh_l0", params["weight_hh_l0"], dtype)
    if w_hh0.ndim != 2 or w_hh0.shape[1] < 1:
        raise ValueError(f"weight_hh_l0: expected a 2-D array (gates*hidden_size, hidden_size or proj_size), "
                         f"got shape {tuple(w_hh0.shape)}")
    hidden, proj = w_hh0.shape[1], 0
    if projected:
        hidden, proj = _projected_sizes(cell, w_hh0, _array("weight_hr_l0", params["weight_hr_l0"], dtype))
    elif w_hh0.shape[0] != GATES[cell] * hidden:  # else every other shape would be judged by a wrong size
        raise ValueError(f"weight_hh_l0: expected shape ({GATES[cell]}*hidden_size, hidden_size) for cell "
                         f"{cell!r}, got {tuple(w_hh0.shape)}")
    width = proj or hidden
    expected = param_shapes(cell, max(features, 1), hidden, num_layers, bias=bias, bidirectional=bidirectional,
                            proj_size=proj)
    _check_x_width(features, _array("weight_ih_l0", params["weight_ih_l0"], dtype))
    kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
    kinds += ("weight_hr",) if projected else ()
    weights = []
    for layer in range(num_layers):
        per_direction = []
        for d in range(dirs):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            for kind in kinds:
                name = kind + suffix
                w = _array(name, params[name], dtype)
                _shape(name, w, expected[name])
                per_direction.append(w)
        weights.append(tuple(per_direction))

    has_c = has_cell_state(cell)
    if has_c:
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("hx: expected a tuple (h0, c0) for an LSTM")
        h0, c0 = (None, None) if hx is None else hx
    else:
        h0, c0 = hx, None
    state_names = ("h0" if has_c else "hx", "c0")
    states = []
    for name, value, size in zip(state_names, (h0, c0), (width, hidden)):
        if value is not None:
            value = _array(name, value, dtype)
            _shape(name, value, (num_layers * dirs, size) if unbatched else (num_layers * dirs, batch, size))
        states.append(value)
    if unbatched and lengths is not None:
        raise ValueError("lengths: not meaningful for an unbatched (T, input_size) input")
    lens = _checked_lengths(lengths, steps, batch)
    cell_clip = _checks.cell_clip(_static("cell_clip", cell_clip, "float"), cell)

    check = _checks.flag("check_finite", _static("check_finite", check_finite, "bool"))
    # x checked here need not be again by the kernel; the states are (its flag covers dh_n, dc_n too).
    x_checked = check and _finite_on_host("x", x)
    if check:
        for name, value in zip(state_names, states):
            if value is not None:
                _finite_on_host(name, value)
    if unbatched:
        states = [None if s is None else s[:, None, :] for s in states]
    specs = [_ffi.LayerSpec(cell, dirs, cell_clip, check_x=check and layer == 0 and not x_checked,
                            check_dy=check and layer == num_layers - 1, check_states=check)
             for layer in range(num_layers)]
    empty = jnp.zeros((0,), dtype)
    lens_arg = jnp.zeros((0,), jnp.int32) if lens is None else lens

    def run_layer(layer, layer_input, h0_l, c0_l):
        return _ffi.layer(specs[layer], layer_input, empty if h0_l is None else h0_l, empty if c0_l is None else c0_l,
                          lens_arg, weights[layer])

    between = None
    if dropout > 0 and dropout_key is not None and num_layers > 1:
        scale = 0.0 if dropout >= 1.0 else 1.0 / (1.0 - dropout)

        def between(layer, y):
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, layer), 1.0 - dropout, y.shape)
            return y * jnp.where(keep, scale, 0.0).astype(y.dtype)

    y, h_n, c_n = _stack.over_layers(run_layer, seq, states[0], states[1], num_layers=num_layers,
                                     num_directions=dirs, between=between)
    h_n = jnp.concatenate(h_n, axis=0)
    c_n = jnp.concatenate(c_n, axis=0) if has_c else None
    if unbatched:
        y, h_n = y[:, 0, :], h_n[:, 0, :]
        c_n = None if c_n is None else c_n[:, 0, :]
    elif batch_first:
        y = jnp.swapaxes(y, 0, 1)
    return (y, (h_n, c_n)) if has_c else (y, h_n)


def lstm(params, x, hx=None, **options):
    """forward("lstm", ...): returns (y, (h_n, c_n))."""
    return forward("lstm", params, x, hx, **options)


def gru(params, x, hx=None, **options):
    """forward("gru", ...): returns (y, h_n)."""
    return forward("gru", params, x, hx, **options)


def rnn(params, x, hx=None, *, nonlinearity: str = "tanh", **options):
    """forward("rnn_tanh" or "rnn_relu", ...) as torch.nn.RNN's nonlinearity: returns (y, h_n)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return forward(f"rnn_{nonlinearity}", params, x, hx, **options)


__all__ = ["CELLS", "forward", "lstm", "gru", "rnn", "init", "param_names", "param_shapes"]

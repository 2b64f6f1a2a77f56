"""Flax NNX modules over fusedrnn.jax: LSTM, GRU and RNN with nnx.Param weights named and shaped as
torch.nn's (weight_ih_l0, ..., weight_hh_l1_reverse), initialised as torch.nn does. LSTM takes torch's
proj_size (weight_hr_l{k} (proj_size, hidden_size); h and y proj_size wide per direction). Needs flax.

    model = fusedrnn.jax.nnx.LSTM(1, 64, num_layers=2, dropout=0.1, rngs=nnx.Rngs(0))
    y, (h_n, c_n) = model(x)          # x (T, B, 1); model.eval() turns dropout off
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._optional import require
from ..modules import IncompatibleKeys
from ._rnn import _array, dropout_on, forward, init, param_names

nnx = require("flax.nnx", "flax")


def _dropout_stream(rngs: nnx.Rngs):
    """The Rngs' "dropout" stream (its default one where it has no such stream)."""
    try:
        return rngs["dropout"]
    except (KeyError, AttributeError) as err:
        raise ValueError("rngs: dropout needs a 'dropout' stream (nnx.Rngs(params=..., dropout=...), or "
                         "nnx.Rngs(seed) for one default stream)") from err


class RNNBase(nnx.Module):
    """A stack of `cell` layers ("lstm", "gru", "rnn_tanh", "rnn_relu"); the call takes x, hx, lengths
    and check_finite and returns what fusedrnn.jax.forward does (the constructor takes its other
    options). Dropout between layers draws its keys from the "dropout" stream
    of the Rngs given at construction (or to the call) unless the module is deterministic (eval())."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 cell_clip: float | None = None, proj_size: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        # Every option is checked here, as the NumPy modules do, not at the first call.
        cell = _checks.cell(cell)
        bias, batch_first = _checks.flag("bias", bias), _checks.flag("batch_first", batch_first)
        bidirectional = _checks.flag("bidirectional", bidirectional)
        dropout = _checks.probability("dropout", dropout)
        cell_clip = _checks.cell_clip(cell_clip, cell)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs: expected an nnx.Rngs (its 'params' stream draws the weights), got "
                            f"{type(rngs).__name__}")
        params = init(rngs.params(), cell, input_size, hidden_size, num_layers, bias=bias,
                      bidirectional=bidirectional, proj_size=proj_size, dtype=dtype)
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))
        self.cell = cell
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.proj_size = int(proj_size)
        self.dropout, self.cell_clip = dropout, cell_clip
        self.deterministic = False
        self.rngs = _dropout_stream(rngs).fork() if dropout > 0 else nnx.data(None)

    def param_names(self) -> list[str]:
        """The module's parameter names, in torch.nn's order."""
        return param_names(self.num_layers, bias=self.bias, bidirectional=self.bidirectional,
                           proj_size=self.proj_size)

    def state_dict(self) -> dict:
        """name -> array, keyed as torch.nn's state_dict (what fusedrnn.jax.forward takes)."""
        return {name: getattr(self, name)[...] for name in self.param_names()}

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Loads parameters from a mapping keyed as torch.nn's, as the NumPy modules' load_state_dict:
        shapes and dtypes must match and known (not traced) values be finite, all checked before any is
        written. With strict (the default), a key the mapping lacks or the module lacks is a ValueError
        naming them all. Returns the module's keys the mapping lacks and the mapping's keys the module
        lacks, empty unless strict=False."""
        names = self.param_names()
        missing, unexpected = _checks.state_dict_keys(state_dict, names, strict)
        loaded = {}
        for name in names:
            if name not in state_dict:
                continue
            key, current = f"state_dict[{name!r}]", getattr(self, name)[...]
            value = _array(key, state_dict[name], current.dtype, "the parameter's")
            _checks.shape(key, value, current.shape)
            if not isinstance(value, jax.core.Tracer):
                _checks.finite(key, np.asarray(value))
            loaded[name] = value
        for name, value in loaded.items():
            getattr(self, name)[...] = value
        return IncompatibleKeys(missing, unexpected)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``, as nnx.Dropout's.

        Args:
          deterministic: if True, turns dropout between layers off.
        """
        if deterministic is not None:
            self.deterministic = _checks.flag("deterministic", deterministic)

    def __call__(self, x, hx=None, *, lengths=None, deterministic: bool | None = None, rngs=None,
                 check_finite: bool = True):
        """x, hx, lengths and check_finite as fusedrnn.jax.forward takes them, returning what it does.
        deterministic: None (the module's, eval() sets it) or a bool for this call. rngs: an nnx.Rngs
        (its "dropout" stream), an RngStream or a PRNG key, as nnx.Dropout takes."""
        deterministic = self.deterministic if deterministic is None else deterministic
        key = None
        if dropout_on(deterministic, self.dropout, self.num_layers):
            source = rngs if rngs is not None else self.rngs
            if source is None:
                raise ValueError("rngs: dropout needs a 'dropout' stream, given at construction or to the call")
            if isinstance(source, nnx.Rngs):
                key = _dropout_stream(source)()
            elif isinstance(source, nnx.RngStream):
                key = source()
            elif isinstance(source, jax.Array):
                key = source
            else:
                raise TypeError(f"rngs: expected an nnx.Rngs, an nnx.RngStream or a PRNG key, got "
                                f"{type(source).__name__}")
        return forward(self.cell, self.state_dict(), x, hx, lengths=lengths, batch_first=self.batch_first,
                       dropout=self.dropout, dropout_key=key, cell_clip=self.cell_clip, check_finite=check_finite)


class LSTM(RNNBase):
    """Long short-term memory layers, as torch.nn.LSTM(input_size, hidden_size, num_layers): the other
    options by keyword (bias, batch_first, dropout, bidirectional, cell_clip, proj_size, dtype, rngs)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **options):
        super().__init__("lstm", input_size, hidden_size, num_layers, **options)


class GRU(RNNBase):
    """Gated recurrent unit layers, as torch.nn.GRU(input_size, hidden_size, num_layers): the other
    options by keyword (bias, batch_first, dropout, bidirectional, dtype, rngs)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **options):
        super().__init__("gru", input_size, hidden_size, num_layers, **options)


class RNN(RNNBase):
    """Elman RNN layers (nonlinearity "tanh" or "relu"), as torch.nn.RNN(input_size, hidden_size,
    num_layers): the other options by keyword (nonlinearity, bias, batch_first, dropout, bidirectional,
    dtype, rngs)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, nonlinearity: str = "tanh",
                 **options):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, **options)

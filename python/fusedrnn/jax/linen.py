"""Flax linen modules over fusedrnn.jax: LSTM, GRU and RNN whose parameters are named and shaped as
torch.nn's (weight_ih_l0, ..., weight_hh_l1_reverse), drawn as torch.nn draws them (uniform in
[-1/sqrt(H), 1/sqrt(H)]) from the "params" stream. The input size comes from x's last dimension at
init. LSTM takes torch's proj_size (weight_hr_l{k} (proj_size, hidden_size); h and y proj_size wide per
direction). Needs flax.

    model = fusedrnn.jax.linen.LSTM(64, num_layers=2, dropout=0.1)
    variables = model.init(jax.random.key(0), x, deterministic=True)   # x (T, B, I)
    y, (h_n, c_n) = model.apply(variables, x, deterministic=True)
    y, _ = model.apply(variables, x, rngs={"dropout": key})             # dropout between layers
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from .. import _checks
from .._optional import require
from ._rnn import _check_x_rank, _check_x_width, dropout_on, forward, param_shapes

nn = require("flax.linen", "flax")


class RNNBase(nn.Module):
    """A stack of the cell named by cell_name(); the call takes x, hx, lengths and check_finite and
    returns what fusedrnn.jax.forward does (the fields are its other options). Dropout between layers
    (unless deterministic, given as a field or to the call) draws its key from the "dropout" stream."""

    hidden_size: int
    num_layers: int = 1
    # The rest by keyword: torch's positional order (nonlinearity or proj_size among them) cannot be kept
    # by fields a subclass adds after these, and a value in the wrong field would run silently.
    _: dataclasses.KW_ONLY
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    cell_clip: float | None = None
    deterministic: bool | None = None
    param_dtype: Any = jnp.float32

    def cell_name(self) -> str:
        """The functional cell name ("lstm", "gru", "rnn_tanh" or "rnn_relu") the subclass runs."""
        raise NotImplementedError

    def projection(self) -> int:
        """The projection size (LSTM's proj_size), 0 for none."""
        return 0

    @nn.compact
    def __call__(self, x, hx=None, *, lengths=None, deterministic: bool | None = None, check_finite: bool = True):
        cell = self.cell_name()
        # x is judged against the parameters here: flax would blame weight_ih_l0 for a wrong x.
        _check_x_rank(jnp.shape(x))
        input_size = jnp.shape(x)[-1]
        if self.has_variable("params", "weight_ih_l0"):
            _check_x_width(input_size, self.get_variable("params", "weight_ih_l0"))
        param_dtype = _checks.float_dtype("param_dtype", self.param_dtype)
        shapes = param_shapes(cell, input_size, self.hidden_size, self.num_layers, bias=self.bias,
                              bidirectional=self.bidirectional, proj_size=self.projection())
        bound = 1.0 / math.sqrt(self.hidden_size)

        def uniform(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        params = {name: self.param(name, uniform, shape, param_dtype) for name, shape in shapes.items()}
        deterministic = self.deterministic if deterministic is None else deterministic
        dropout = _checks.probability("dropout", self.dropout)
        key = None
        if dropout_on(deterministic, dropout, self.num_layers):
            if not self.has_rng("dropout"):
                raise ValueError("rngs: dropout needs a 'dropout' stream (apply(..., rngs={'dropout': key})), "
                                 "or deterministic=True")
            key = self.make_rng("dropout")
        return forward(cell, params, x, hx, lengths=lengths, batch_first=self.batch_first, dropout=self.dropout,
                       dropout_key=key, cell_clip=self.cell_clip, check_finite=check_finite)


class LSTM(RNNBase):
    """Long short-term memory layers, as torch.nn.LSTM (proj_size a field, by keyword)."""

    _: dataclasses.KW_ONLY
    proj_size: int = 0

    def cell_name(self) -> str:
        return "lstm"

    def projection(self) -> int:
        return self.proj_size


class GRU(RNNBase):
    """Gated recurrent unit layers, as torch.nn.GRU."""

    _: dataclasses.KW_ONLY

    def cell_name(self) -> str:
        return "gru"


class RNN(RNNBase):
    """Elman RNN layers, as torch.nn.RNN (nonlinearity "tanh" or "relu" a field, by keyword)."""

    _: dataclasses.KW_ONLY
    nonlinearity: str = "tanh"

    def cell_name(self) -> str:
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {self.nonlinearity!r}")
        return f"rnn_{self.nonlinearity}"

"""fusedrnn: fused LSTM, GRU and RNN forward and backward kernels with a NumPy API.

Modules (weights named and shaped exactly as torch.nn's)::

    lstm = fusedrnn.LSTM(64, 128, num_layers=2, bidirectional=True)
    y, (h_n, c_n) = lstm(x, lengths=lengths)
    dx, (dh0, dc0) = lstm.backward(dy)
    lstm.grads["weight_hh_l1_reverse"]

``fusedrnn.functional`` runs one layer in one direction with explicit weights. Training toolkit:
``fusedrnn.sequences`` (padding, bucketing, windows), ``fusedrnn.bptt`` (truncated BPTT),
``fusedrnn.losses``, ``fusedrnn.optim`` (SGD, Adam), ``fusedrnn.gradients`` (clipping, gradient-flow
diagnosis); ``fusedrnn.reference`` is the plain float64 NumPy implementation the kernels are tested
against.
"""

import numbers

from . import _blas_loader

_blas_loader.preload()

from . import _core, functional  # noqa: E402  (needs the BLAS library loaded first)
from . import bptt, gradients, losses, optim, reference, sequences  # noqa: E402
from .bptt import truncated_bptt  # noqa: E402
from .gradients import clip_grad_norm, clip_grad_value  # noqa: E402
from .modules import GRU, LSTM, RNN, RNNBase  # noqa: E402

__version__ = "0.1.0"
_MAX_THREADS = 1024

__all__ = ["LSTM", "GRU", "RNN", "RNNBase", "functional", "set_num_threads", "get_num_threads", "bptt",
           "gradients", "losses", "optim", "reference", "sequences", "truncated_bptt", "clip_grad_norm",
           "clip_grad_value"]


def set_num_threads(n: int) -> None:
    """Sets the number of native threads all fusedrnn compute uses (the BLAS pool)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int thread count, got {type(n).__name__}")
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"n: expected a thread count in [1, {_MAX_THREADS}], got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of native threads fusedrnn compute uses."""
    return _core.get_num_threads()

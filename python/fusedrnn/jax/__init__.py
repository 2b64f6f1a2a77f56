"""fusedrnn for JAX: the fused LSTM, GRU and RNN kernels as XLA FFI custom calls, inside jit, grad
(reverse mode), vmap and shard_map. Parameters are a dict keyed and shaped like torch.nn's state_dict::

    import fusedrnn.jax as fj
    params = fj.init(jax.random.key(0), "lstm", 32, 64, num_layers=2, bidirectional=True)
    y, (h_n, c_n) = jax.jit(fj.lstm)(params, x)            # x (T, B, 32)
    grads = jax.grad(lambda p: fj.lstm(p, x)[0].sum())(params)

An LSTM's projection (torch.nn.LSTM's proj_size P) follows from `weight_hr_l{k}` (P, H) parameters
(fj.init(..., proj_size=P)): h0, h_n and y are then P wide per direction, as in torch.

`fusedrnn.jax.nnx` and `fusedrnn.jax.linen` hold Flax NNX and linen modules, and
`fusedrnn.jax.flax_params` converts parameters to and from Flax's OptimizedLSTMCell/GRUCell. Arrays on
the CPU run the CPU kernels; arrays on an NVIDIA GPU run the CUDA backend when fusedrnn's CUDA module
loads with its handlers (else the call fails saying what to install). Forward-mode differentiation
(jvp, jacfwd, hessian) and second derivatives raise an error; a derivative of a program that takes a
gradient it cuts with stop_gradient, or uses only the value of, runs. `jax.export` takes programs
that call the layers given `disabled_checks=fj.export_disabled_checks()`.
"""

from .._optional import require

require("jax", "jax")

from . import _ffi  # noqa: E402
from ._ffi import export_disabled_checks  # noqa: E402
from ._rnn import CELLS, forward, gru, init, lstm, param_names, param_shapes, rnn  # noqa: E402

_ffi.register()

__all__ = ["CELLS", "forward", "lstm", "gru", "rnn", "init", "param_names", "param_shapes", "export_disabled_checks"]

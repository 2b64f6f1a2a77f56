"""fusedrnn as a drop-in for torch.nn.LSTM, GRU and RNN (CPU tensors, and CUDA tensors where fusedrnn's CUDA
module is installed; float32 and float64).

    import fusedrnn.torch as frt
    model.encoder = frt.LSTM(256, 512, num_layers=2, batch_first=True, bidirectional=True)
    frt.convert(model)   # or swap every torch.nn.LSTM/GRU/RNN inside a model, weights kept
    frt.revert(model)    # and back, for ONNX export or a pickle without fusedrnn

The modules are torch.nn modules with torch's constructor, parameters, state_dict and forward
signature (PackedSequence included). The fused layer is a torch.library operator
(`torch.ops.fusedrnn.rnn_layer`) with a fake implementation and an autograd formula, so
torch.compile and torch.export trace through it. Importing this module imports torch; importing
fusedrnn alone does not. Once imported, fusedrnn's native work runs on torch's OpenMP threads
(`use_torch_threads`), which torch keeps awake between its own operators.
"""

from .._optional import require

_torch = require("torch", "torch")
# The operators are registered with torch.library.custom_op (register_fake, register_autograd), new in
# torch 2.4: the floor the torch extra declares.
TORCH_FLOOR = "2.4"
if not hasattr(_torch.library, "custom_op"):
    raise ImportError(f"fusedrnn.torch needs torch>={TORCH_FLOOR} (torch.library.custom_op); this is torch "
                      f"{_torch.__version__}: pip install 'fusedrnn[torch]'")

from ._ops import rnn_layer, rnn_layer_backward  # noqa: E402
from ._threads import torch_openmp_runtime, use_torch_threads  # noqa: E402
from .modules import GRU, LSTM, RNN, convert, revert  # noqa: E402

use_torch_threads()

__all__ = ["LSTM", "GRU", "RNN", "convert", "revert", "rnn_layer", "rnn_layer_backward", "use_torch_threads",
           "torch_openmp_runtime"]

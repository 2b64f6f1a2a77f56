"""fusedrnn as a drop-in for torch.nn.LSTM, GRU and RNN (CPU; float32 and float64).

    import fusedrnn.torch as frt
    model.encoder = frt.LSTM(256, 512, num_layers=2, batch_first=True, bidirectional=True)
    frt.convert(model)   # or swap every torch.nn.LSTM/GRU/RNN inside a model, weights kept

The modules are torch.nn modules with torch's constructor, parameters, state_dict and forward
signature (PackedSequence included). The fused layer is a torch.library operator
(`torch.ops.fusedrnn.rnn_layer`) with a fake implementation and an autograd formula, so
torch.compile and torch.export trace through it. Importing this module imports torch; importing
fusedrnn alone does not.
"""

from ._ops import rnn_layer, rnn_layer_backward
from .modules import GRU, LSTM, RNN, convert

__all__ = ["LSTM", "GRU", "RNN", "convert", "rnn_layer", "rnn_layer_backward"]

"""torch.nn.LSTM / GRU / RNN with the fused kernels underneath.

Each class subclasses torch.nn.RNNBase with its torch.nn counterpart's constructor, so the
parameters, state_dict keys, `_flat_weights` bookkeeping and repr are torch's own; only `forward`
differs. They do not subclass torch.nn.LSTM/GRU/RNN themselves: torch.compile refuses to trace any
module that is an instance of those. Between layers the output goes through torch's own dropout, in
the layout torch drops in (packed rows for a PackedSequence), so under the same torch.manual_seed the
masks are the ones torch.nn would draw. The loop over layers (each layer's initial states, dropout
between layers) is the layer-stack driver's (fusedrnn._stack.over_layers), as for the NumPy modules.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _checks, _cuda_layer, _stack
from ..functional import CELLS, has_cell_state
from ._ops import call_layer, check_dtype, check_later_states

_CELLS = {cell.upper(): cell for cell in CELLS}  # torch.nn.RNNBase's mode -> the cell's name


class _FusedRNNBase(nn.RNNBase):
    """torch.nn.RNNBase with forward() on the fused kernels."""

    def __init__(self, mode: str, *args, **kwargs):
        super().__init__(mode, *args, **kwargs)
        self._check_supported()
        self._format_weight_names()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._format_weight_names()

    def _format_weight_names(self) -> None:
        # Formatted (and cached) before any torch.compile trace of forward: a trace that filled the cache
        # would guard on the entry being absent and compile again on the next call.
        _stack.weight_names(self.num_layers, True)

    def __prepare_scriptable__(self):
        # torch.jit.script asks every module first: say so here rather than fail inside its compiler.
        raise NotImplementedError(f"fusedrnn.torch.{type(self).__name__}: TorchScript (torch.jit.script) cannot "
                                  "compile the fused modules; use torch.compile, torch.export or torch.jit.trace("
                                  "..., check_trace=False), or frt.revert(model) for torch.nn's modules")

    def _check_supported(self) -> None:
        """NotImplementedError for what the fused kernels do not run (instead of running something else),
        TypeError for options and parameters of the wrong kind. Meta parameters pass: a module built on
        the meta device gets real ones (to_empty) before it runs, and forward refuses meta tensors."""
        name = type(self).__name__
        # torch.nn refuses these at its forward (its kernels take bools and ints); the fused layers
        # would read any value by its truth.
        _checks.flag("bidirectional", self.bidirectional)
        _checks.positive_int("num_layers", self.num_layers)
        for weight in self._flat_weights:
            (check_dtype if weight.is_meta else _check_placement)(f"fusedrnn.torch.{name} parameters", weight)

    @property
    def _cell(self) -> str:
        return _CELLS[self.mode]

    @property
    def _has_cell_state(self) -> bool:
        return has_cell_state(self._cell)

    def forward(self, input, hx=None):
        weights = _by_name(self, self._flat_weights_names)
        try:
            return self._forward(input, hx, weights)
        except (TypeError, ValueError, NotImplementedError):
            # The first parameter gives the dtype and device everything is checked against: one
            # converted or moved alone is named here rather than blamed on the input or a kernel slot.
            self._check_weights_agree(weights)
            raise

    def _forward(self, input, hx, weights: dict):
        names = self._flat_weights_names
        first = weights[names[0]]
        _check_placement(f"fusedrnn.torch.{type(self).__name__} parameters", first)
        dtype = first.dtype
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dtype != dtype:
                data = _out_of_autocast(data, dtype)
            _check_input(data, dtype, self.input_size, (2,), "PackedSequence data")
            # Padded, sequence-major and in the packing's (sorted) batch order: row b runs lengths[b] steps.
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            packed_rows = data.shape[0]
            unbatched = False
        else:
            if not isinstance(input, Tensor):
                if isinstance(input, torch.fx.Proxy):
                    raise TypeError(f"input: torch.fx.symbolic_trace cannot trace into fusedrnn.torch.{type(self).__name__}"
                                    "; make it a leaf module (Tracer.is_leaf_module), or trace with torch.export "
                                    "or make_fx, which see its operator")
                raise TypeError(f"input: expected a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dtype != dtype:
                input = _out_of_autocast(input, dtype)
            _check_input(input, dtype, self.input_size, (2, 3), "input")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            lengths = batch_sizes = sorted_indices = unsorted_indices = packed_rows = None
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0 or batch == 0:
            raise ValueError(f"input: empty sequence or batch (T={steps}, B={batch})")

        cell = self._cell
        cell_state = has_cell_state(cell)
        h0, c0 = self._initial_states(hx, batch, unbatched, dtype, cell_state)
        if sorted_indices is not None:  # hx is in the caller's batch order; the rows run sorted
            h0 = None if h0 is None else h0.index_select(1, sorted_indices)
            c0 = None if c0 is None else c0.index_select(1, sorted_indices)

        dirs = 2 if self.bidirectional else 1
        if self.num_layers > 1:
            check_later_states(h0, c0, first=dirs)
        grad_on = torch.is_grad_enabled()
        slot_names = _stack.weight_names(self.num_layers, True)  # both directions' slots, always

        def run_layer(layer, x, h0_l, c0_l):
            # rnn_layer's weight arguments: each direction's parameters in LayerWeights' order (the
            # operator's PARAMETERS), None where the layer has none (no bias, projection or reverse).
            w = [weights.get(name) for names in slot_names[layer] for name in names]
            record = grad_on and any(t is not None and t.requires_grad for t in (x, *w, h0_l, c0_l))
            y, h, c, _ = call_layer(x, *w, h0_l, c0_l, lengths, cell, record, layer == 0)
            return y, h, c

        def dropout(layer, y):
            return _dropout(y, self.dropout, batch_sizes, packed_rows)

        try:
            x, h_n, c_n = _stack.over_layers(run_layer, x, h0, c0, num_layers=self.num_layers, num_directions=dirs,
                                             between=dropout if self.training and self.dropout > 0 else None)
        except ValueError:
            self._check_weight_shapes(weights)  # names the parameter where the module's sizes are to blame
            raise
        # The kernels take the sizes from the weights: ones of another hidden or projection size, each
        # consistent with the others, would run a layer of that size (checked only then: per-call cost).
        hidden = self.hidden_size
        state = self.proj_size or hidden
        if (x.shape[-1] != dirs * state or not all([h.shape[-1] == state for h in h_n])
                or (cell_state and not all([c.shape[-1] == hidden for c in c_n]))):
            self._check_weight_shapes(weights)
        h_n = torch.cat(h_n) if self.num_layers > 1 else h_n[0]
        c_n = (torch.cat(c_n) if self.num_layers > 1 else c_n[0]) if cell_state else None

        if packed:
            output = PackedSequence(pack_padded_sequence(x, lengths).data, batch_sizes, sorted_indices,
                                    unsorted_indices)
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = None if c_n is None else c_n.index_select(1, unsorted_indices)
        elif unbatched:
            output, h_n = x.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        else:
            output = x.transpose(0, 1) if self.batch_first else x
        return output, ((h_n, c_n) if cell_state else h_n)

    def _check_weights_agree(self, weights: dict) -> None:
        """A TypeError (dtype) or ValueError (device) naming the parameters whose dtype or device differs
        from the most of the module's (one converted or moved alone, or substituted through
        torch.func.functional_call)."""
        for attribute, error in (("dtype", TypeError), ("device", ValueError)):
            counts = collections.Counter(getattr(t, attribute) for t in weights.values() if isinstance(t, Tensor))
            if len(counts) > 1:
                usual = counts.most_common(1)[0][0]
                odd = [name for name, t in weights.items() if isinstance(t, Tensor) and getattr(t, attribute) != usual]
                others = ", ".join(sorted({str(getattr(weights[name], attribute)) for name in odd}))
                raise error(f"{', '.join(odd)}: {attribute} {others}, where the module's other parameters have {usual}")

    def _check_weight_shapes(self, weights: dict) -> None:
        """A ValueError (a RuntimeError too, as torch.nn has it) naming the first weight whose shape is not
        the one this module's sizes give (one replaced through .data or substituted by
        torch.func.functional_call)."""
        for name, shape in _stack.weight_shapes(self._cell, self.input_size, self.hidden_size, self.num_layers,
                                                self.bidirectional, self.bias, self.proj_size):
            if weights[name].shape != shape:
                raise _WrongShape(f"{name}: expected shape {shape} for {type(self).__name__}(input_size="
                                  f"{self.input_size}, hidden_size={self.hidden_size}"
                                  f"{f', proj_size={self.proj_size}' if self.proj_size else ''}), got "
                                  f"{tuple(weights[name].shape)}")

    def _initial_states(self, hx, batch: int, unbatched: bool, dtype, has_cell_state: bool):
        """(h0, c0) as (L*D, B, R) and (L*D, B, H) tensors or None (R: proj_size with a projection,
        else hidden_size), checked against the input."""
        if hx is None:
            return None, None
        names = ("h_0", "c_0") if has_cell_state else ("hx",)
        if has_cell_state:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a tuple (h_0, c_0) of tensors for an LSTM, got {type(hx).__name__}")
            states = tuple(hx)
        else:
            states = (hx,)
        lead = self.num_layers * (2 if self.bidirectional else 1)
        widths = (self.proj_size or self.hidden_size, self.hidden_size)
        checked = []
        for name, s, width in zip(names, states, widths):
            want = (lead, width) if unbatched else (lead, batch, width)
            if not isinstance(s, Tensor):
                raise TypeError(f"{name}: expected a Tensor, got {type(s).__name__}")
            if s.dtype != dtype:
                s = _out_of_autocast(s, dtype)
            _check_placement(name, s)
            if s.dtype != dtype:
                raise _WrongDtype(f"{name}: expected dtype {dtype} (the parameters'), got {s.dtype}")
            if s.shape != want:
                raise _WrongShape(f"{name}: expected shape {want}, got {tuple(s.shape)}")
            checked.append(s)
        states = tuple(checked)
        if unbatched:
            states = tuple(s.unsqueeze(1) for s in states)
        return states if has_cell_state else (states[0], None)


def _by_name(module: nn.Module, names) -> dict:
    """{name: getattr(module, name)} for parameter names, mostly without nn.Module.__getattr__ (slow on
    a per-call path: bench/NOTES.md, "The per-call Python, and gradients written rather than added").
    By name rather than from the _flat_weights cache: torch.func.functional_call and
    torch.export substitute parameters, and refreshing the cache inside a trace assigns to it. As with
    getattr, what the instance's own attributes hold comes first; a name in neither place (a
    parametrization's property) is read by getattr itself."""
    own, registered = module.__dict__, module._parameters
    weights = {}
    for name in names:
        if name in own:
            weights[name] = own[name]
        elif name in registered:
            weights[name] = registered[name]
        else:
            weights[name] = getattr(module, name)
    return weights


class _WrongShape(ValueError, RuntimeError):
    """An input or state of the wrong shape: a ValueError, and the RuntimeError torch.nn's modules raise
    for it, so that code written against either catches it."""


class _WrongDtype(TypeError, ValueError, RuntimeError):
    """An input or state of another dtype than the parameters': a TypeError, and what torch.nn's modules
    raise for it (a ValueError for the input, a RuntimeError for a state)."""


def _check_placement(name: str, t: Tensor) -> None:
    if t.is_cuda:
        try:
            _cuda_layer.cuda_module()
        except ImportError as err:
            raise NotImplementedError(f"{name}: a CUDA tensor, and {err}") from err
    elif not t.is_cpu:
        raise NotImplementedError(f"{name}: fusedrnn runs on the CPU and on CUDA devices, got a tensor on {t.device}")
    check_dtype(name, t)


def _out_of_autocast(t: Tensor, dtype) -> Tensor:
    """A tensor an autocast region made in lower precision (a Linear's output before the layer), cast back
    to the parameters' dtype, which the layer runs in with or without autocast; anything else as it is."""
    if t.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(t.device.type):
        return t.to(dtype)
    return t


def _check_input(t: Tensor, dtype, input_size: int, ranks, name: str) -> None:
    _check_placement(name, t)
    if t.dtype != dtype:
        raise _WrongDtype(f"{name}: expected dtype {dtype} (the parameters'), got {t.dtype}")
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if t.shape[-1] != input_size:
        raise _WrongShape(f"{name}: expected input_size {input_size} in the last dimension, got {t.shape[-1]}")


def _dropout(y: Tensor, p: float, batch_sizes, packed_rows):
    """Inter-layer dropout drawing torch.nn's masks: over y (T, B, F) itself, or, for packed input,
    over the packed rows (`packed_rows`, the sum of lengths, F), scattered back into y's padded layout."""
    if batch_sizes is None:
        return F.dropout(y, p, training=True)
    mask = F.dropout(y.new_ones((packed_rows, y.shape[2])), p, training=True)
    # Row b of step t is packed row offsets[t] + b where b < batch_sizes[t], and a zero row past the
    # packed ones elsewhere: a gather, which torch.compile traces (pad_packed_sequence breaks its graph).
    sizes = batch_sizes.to(y.device)
    offsets = torch.cumsum(sizes, 0) - sizes
    rows = torch.arange(y.shape[1], device=y.device)
    index = torch.where(rows < sizes[:, None], offsets[:, None] + rows, packed_rows)
    return y * torch.cat([mask, mask.new_zeros((1, y.shape[2]))])[index]


class LSTM(_FusedRNNBase):
    """torch.nn.LSTM on fusedrnn's fused kernels (CPU, or CUDA with the CUDA module; float32/float64;
    proj_size too)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)


class GRU(_FusedRNNBase):
    """torch.nn.GRU on fusedrnn's fused kernels (CPU, or CUDA with the CUDA module; float32/float64)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


class RNN(_FusedRNNBase):
    """torch.nn.RNN (tanh or relu) on fusedrnn's fused kernels (CPU, or CUDA with the CUDA module;
    float32/float64); nonlinearity is the 4th positional argument, as in torch.nn.RNN."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"RNN_{nonlinearity.upper()}", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)


_FUSED = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}
_TORCH_NN = {fused: original for original, fused in _FUSED.items()}


def convert(model: nn.Module) -> nn.Module:
    """Replaces every torch.nn.LSTM, GRU and RNN inside `model` (exact types, not subclasses) by its
    fusedrnn.torch counterpart, in place, and returns the model (or the replacement, when `model`
    itself is one). The replacement takes over the module's state as it is: the same Parameter objects
    (so an optimizer built earlier still updates them), buffers, hooks, training mode, device and dtype.
    Raises NotImplementedError, changing nothing, if any of them is not supported."""
    return _swap_all(model, _FUSED)


def revert(model: nn.Module) -> nn.Module:
    """convert's inverse: replaces every fusedrnn.torch LSTM, GRU and RNN inside `model` (exact types) by
    its torch.nn counterpart, in place, taking over its state in the same way, and returns the model (or
    the replacement). For what needs torch's own operators: ONNX export, AOTInductor packages, a pickled
    model loadable where fusedrnn is not installed."""
    return _swap_all(model, _TORCH_NN)


def _refuse_parametrized(model: nn.Module, classes: dict) -> None:
    """NotImplementedError for a module of `classes` that torch.nn.utils.parametrize made a subclass of
    (weight_norm, spectral_norm, register_parametrization): its parametrizations live on that generated
    class, which a swap would drop, and convert would otherwise pass it over without a word."""
    for path, module in model.named_modules(remove_duplicate=False):
        if type(module) not in classes and type(module).__base__ in classes and parametrize.is_parametrized(module):
            where = f" at {path!r}" if path else ""
            raise NotImplementedError(
                f"model: the {type(module).__base__.__name__}{where} is parametrized "
                f"({', '.join(module.parametrizations)}): swap it before parametrizing (fusedrnn.torch's modules take parametrizations as torch.nn's do), "
                "or remove the parametrizations (torch.nn.utils.parametrize.remove_parametrizations) first")


def _swap_all(model: nn.Module, classes: dict) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _refuse_parametrized(model, classes)
    if type(model) in classes:
        return _copy_as(model, classes[type(model)])
    # Every slot holding one (named_children names a module held twice only once), and one replacement
    # per module, put in each of its slots: a module shared between slots stays shared.
    slots = [(parent, name, child) for parent in model.modules()
             for name, child in parent._modules.items() if type(child) in classes]
    replacements = {}
    for _, _, child in slots:  # all made, and so checked, before any is put in place
        if id(child) not in replacements:
            replacements[id(child)] = _copy_as(child, classes[type(child)])
    for parent, name, child in slots:
        setattr(parent, name, replacements[id(child)])
    return model


def _copy_as(module: nn.RNNBase, cls: type) -> nn.RNNBase:
    copied = cls.__new__(cls)
    # The module's own state with its containers copied (their contents shared), so the two objects
    # stay independent; RNNBase.__setstate__ rebuilds the weight references. The hook dictionaries are
    # taken over as they are (a hook's handle removes it from the dictionary it was registered in), so
    # the old module, if still used, shares its hooks with the new one.
    state = {k: copy.copy(v) if isinstance(v, (dict, list)) and "hooks" not in k else v
             for k, v in module.__getstate__().items()}
    copied.__setstate__(state)
    if isinstance(copied, _FusedRNNBase):  # what the fused kernels cannot run is refused here
        copied._check_supported()
    return copied

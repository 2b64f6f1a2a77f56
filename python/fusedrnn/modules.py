"""LSTM, GRU and RNN modules with torch.nn's constructor, parameter names and shapes, on NumPy arrays."""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np

from . import _checks, _core, _device, _stack
from .functional import CELLS, has_cell_state


class _Context:
    """What a training-mode forward keeps for backward."""

    def __init__(self, tapes, dropout_masks, batch_first, unbatched, input_shape, inputs_nbytes, device,
                 input_guard):
        self.device = device                  # where the forward ran: the module's device then
        self.input_guard = input_guard        # _InputGuard of the caller's x where the tapes read it in place
        self.tapes = tapes                    # tapes[layer][direction]
        self.dropout_masks = dropout_masks    # mask applied to layer l's output, l < num_layers-1 (or None)
        self.batch_first = batch_first
        self.unbatched = unbatched
        self.input_shape = input_shape        # (T, B, I), sequence-major
        # Bytes held only for backward: each tape's states and gate values, the layers' inputs the tapes
        # hold (inputs_nbytes: the inner layers' outputs, a copy of x) and the dropout masks. The weights,
        # and an x read in place, are referenced, not copied, so they do not count.
        self.saved_nbytes = (sum(t.nbytes for layer in tapes for t in layer) + inputs_nbytes
                             + sum(m.nbytes for m in dropout_masks if m is not None))


class _InputGuard:
    """The caller's input as a forward keeps it for backward: by reference where the backward reads the
    caller's memory (no copy, so nothing more is kept than torch.nn keeps), with a fingerprint of it
    (_core.fingerprint, one pass) so that a change made in place before backward is an error, not
    wrong gradients."""

    def __init__(self, x):
        self.x, self.fingerprint = x, _core.fingerprint(x)

    @staticmethod
    def of(x, device):
        """A guard of x where backward will read x's own memory: a C-contiguous, aligned host array. A
        device array, or one the core copies on the way in, gets None."""
        if device != "cpu" or not (x.flags.c_contiguous and x.flags.aligned):
            return None
        return _InputGuard(x)

    def check(self) -> None:
        if _core.fingerprint(self.x) != self.fingerprint:
            raise RuntimeError("backward: x was changed in place after the forward, which keeps it by "
                               "reference for backward; the gradients would be wrong. Run the forward again, "
                               "or change a copy of x")


def _seed(seed):
    """A module's `seed`: an int >= 0, or None for fresh entropy."""
    return None if seed is None else _checks.positive_int("seed", seed, minimum=0)


class _GradientsLock:
    """The lock under which a module's gradients change: other threads wait for it; the thread holding
    it, entering again (a signal handler that runs the module while the module runs), gets a
    RuntimeError instead of waiting for itself forever. `run` takes the lock by `with` on the RLock
    itself, whose acquire and release are C calls: an exception arriving between them in Python code
    (Ctrl-C, a thread-timeout library's) would leave the lock held and every other thread waiting. A
    forked child starts with every lock free (_renew_after_fork): a lock some parent thread held would
    never be released there."""

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0
        _gradient_locks.add(self)

    def run(self, work, *args):
        """work(*args) under the lock, its result returned."""
        with self._lock:
            if self._depth:
                raise RuntimeError("this module's gradients are being changed by this thread already: a signal "
                                   "handler called the module while it was running; call it outside the handler")
            try:
                self._depth = 1
                return work(*args)
            finally:
                self._depth = 0

    def _renew(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0


_gradient_locks: "weakref.WeakSet[_GradientsLock]" = weakref.WeakSet()


def _renew_after_fork() -> None:
    for lock in list(_gradient_locks):
        lock._renew()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


class IncompatibleKeys(NamedTuple):
    """What load_state_dict(strict=False) left out: the module's keys the mapping lacks, and the mapping's
    keys the module lacks."""
    missing_keys: list
    unexpected_keys: list


class _Module:
    """What every module here has: parameters in `_params` (name -> array), gradients in `grads` keyed
    alike, both on the module's device, and a training flag.

    A module starts on the host (NumPy arrays); `to("cuda")` moves its parameters and gradients to a
    CUDA device as CuPy arrays, where it then takes CUDA arrays (CuPy, or anything with
    __cuda_array_interface__ or a CUDA __dlpack_device__) on that device only: an input on another
    device is refused by name, never copied over silently.

    Several Python threads may share one module: each thread's training-mode forward is kept for that
    thread's own backward, and backward calls add into `grads` one at a time. Copies and pickles leave
    pending forwards behind."""

    _params: OrderedDict

    def _init_thread_state(self) -> None:
        self._per_thread = threading.local()   # .pending: this thread's forward, kept for its backward
        self._grads_lock = _GradientsLock()

    @property
    def _pending(self):
        return getattr(self._per_thread, "pending", None)

    @_pending.setter
    def _pending(self, value) -> None:
        self._per_thread.pending = value

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_per_thread"], state["_grads_lock"]
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._init_thread_state()

    def __getattr__(self, name):
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name, value) -> None:
        # An attribute of a parameter's name would shadow the array that the forward, the gradients,
        # state_dict() and the optimisers keep using.
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            raise TypeError(f"{name}: a parameter is not replaced by assignment; write into it "
                            f"(module.{name}[...] = value) or load it (module.load_state_dict({{{name!r}: "
                            f"value}}, strict=False))")
        super().__setattr__(name, value)

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for each parameter, keyed as torch.nn names them: the module's own arrays,
        which an optimizer changes in place."""
        return iter(self._params.items())

    def parameters(self) -> list[np.ndarray]:
        """The parameters' own arrays, in named_parameters' order."""
        return list(self._params.values())

    def state_dict(self) -> OrderedDict:
        """A copy of every parameter on the module's device, keyed exactly as torch.nn names them."""
        return OrderedDict((k, v.copy()) for k, v in self._params.items())

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Loads parameters in place from a mapping of name -> array-like on any device (a torch
        state_dict works as is), onto the module's device. Shapes must match; values are cast to the
        module's dtype and must be finite. With strict (the default), a key the mapping lacks or the
        module lacks is a ValueError naming them all (torch raises RuntimeError). Returns the keys the
        module has and the mapping lacks, and the mapping's keys the module lacks (as torch does), empty
        unless strict=False."""
        missing, unexpected = _checks.state_dict_keys(state_dict, self._params, strict)
        loaded = {}
        for name, current in self._params.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            if hasattr(value, "detach"):  # a torch tensor, possibly requiring grad
                try:
                    value = _device.torch_values(value)
                except (NotImplementedError, RuntimeError) as err:  # a meta tensor holds no values
                    raise TypeError(f"state_dict[{name!r}]: cannot be read as an array: {err}") from err
            arr = _checks.as_array(f"state_dict[{name!r}]", _device.to_host(value))
            arr = _checks.plain_numbers(arr)
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"state_dict[{name!r}]: expected a real numeric array, got dtype {arr.dtype}")
            _checks.shape(f"state_dict[{name!r}]", arr, current.shape)
            if arr.dtype.kind == "f":
                _checks.finite(f"state_dict[{name!r}]", arr)
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused next
                arr = arr.astype(self.dtype)
            if not np.isfinite(arr.min()) or not np.isfinite(arr.max()):
                raise ValueError(f"state_dict[{name!r}]: holds values past {self.dtype.name}'s range "
                                 f"(largest magnitude {np.finfo(self.dtype).max:.4g})")
            loaded[name] = arr
        for name, arr in loaded.items():  # all checked before any is written
            _device.copy_into(self._params[name], arr)
        return IncompatibleKeys(missing, unexpected)

    def zero_grad(self) -> None:
        """Resets the accumulated parameter gradients."""
        self._adopt_grads(OrderedDict((k, _device.zeros(v, v.shape)) for k, v in self._params.items()))

    def _adopt_grads(self, grads: OrderedDict) -> None:
        """`grads` as the module made them, which _check_grads then need not look into."""
        self.grads = grads
        self._grads_made = dict(grads)

    def _grads_are_own(self) -> bool:
        """`grads` holds the arrays the module made, each still of its shape and writeable."""
        grads, made = self.grads, self.__dict__.get("_grads_made", {})  # none in a module pickled before
        if type(grads) is not OrderedDict or len(grads) != len(made):
            return False
        for name, g in made.items():
            if grads.get(name) is not g or g.shape != self._params[name].shape or \
                    not getattr(g.flags, "writeable", True):
                return False
        return True

    @property
    def device(self) -> str:
        """Where the parameters and gradients live: "cpu", or "cuda:N" after `to("cuda:N")`."""
        return _device.device_of(next(iter(self._params.values())))

    def to(self, device):
        """Moves the parameters and their gradients to `device` ("cpu", "cuda" for CuPy's current device,
        "cuda:N", a torch.device or a CuPy Device) and returns the module, as torch.nn.Module.to does.
        Optimisers made before a move refuse to step: make them after. Not while other threads use the
        module."""
        target = _device.canonical_device(device)
        if target != self.device:
            self._grads_lock.run(self._move_arrays, target)
        return self

    def cuda(self, device: int | None = None):
        """`to("cuda")`, or `to(f"cuda:{device}")`."""
        return self.to("cuda" if device is None else f"cuda:{device}")

    def cpu(self):
        """`to("cpu")`."""
        return self.to("cpu")

    def _move_arrays(self, device: str) -> None:
        self._params = OrderedDict((k, _device.move(v, device)) for k, v in self._params.items())
        moved = OrderedDict((k, _device.move(v, device)) for k, v in self.grads.items())
        if self._grads_are_own():
            self._adopt_grads(moved)
        else:
            self.grads = moved  # still the caller's: checked at the next backward

    def _check_on_module_device(self, **arrays) -> None:
        """The given arrays (None skipped) are on one device, the module's: a ValueError naming the first
        one that is not."""
        if all(v is None for v in arrays.values()):
            return
        device = _device.common_device(**arrays)
        if not _device.same_device(device, self.device):
            name = next(k for k, v in arrays.items() if v is not None)
            hint = "module.to('cpu')" if device == "cpu" else f"module.to({device!r})"
            raise ValueError(f"{name}: on {device}, but the module's parameters are on {self.device}; move the "
                             f"input, or the module ({hint})")

    def _check_grads(self, native: bool = True) -> None:
        """Every parameter's entry in `grads` (which code may have replaced) fit to be added into, by the
        kernels (`native`: a C-contiguous array) or by NumPy: checked before a backward consumes its
        forward, so that a bad one changes nothing. The arrays the module made pass at once."""
        if self._grads_are_own():
            return
        grads = self.grads
        for name, param in self._params.items():
            key = f"grads[{name!r}]"
            g = grads.get(name) if isinstance(grads, dict) else None
            if g is None:
                raise ValueError(f"{key}: missing; zero_grad() makes every entry afresh")
            if not (isinstance(g, np.ndarray) or _device.is_cuda(g)) or not hasattr(g, "flags"):
                raise TypeError(f"{key}: expected an array like the parameter's, got {type(g).__name__}")
            if not _device.same_device(_device.device_of(g), self.device):
                raise ValueError(f"{key}: on {_device.device_of(g)}, but the module's parameters are on {self.device}")
            if g.dtype != param.dtype:
                raise TypeError(f"{key}: expected dtype {param.dtype} (the parameter's), got {g.dtype}")
            if g.shape != param.shape:
                raise ValueError(f"{key}: expected shape {param.shape} (the parameter's), got {g.shape}")
            flags = g.flags
            if not getattr(flags, "writeable", True):
                raise ValueError(f"{key}: array is read-only (gradients are added into it)")
            if native and not (flags.c_contiguous and getattr(flags, "aligned", True)):
                raise ValueError(f"{key}: must be C-contiguous, its data aligned to its element size (the "
                                 "kernels add gradients into it)")
        # Nor may one share memory with another or with a parameter: a sum would land in both, or in a weight.
        _checks.apart({f"grads[{k!r}]": grads[k] for k in self._params}, dict(self._params))

    def train(self, mode: bool = True):
        """Sets training mode (True: forwards record for backward and apply dropout); returns the module."""
        self.training = _checks.flag("mode", mode)
        return self

    def eval(self):
        """train(False): forwards record nothing and apply no dropout; returns the module."""
        return self.train(False)


class RNNBase(_Module):
    """Shared machinery of LSTM, GRU and RNN: parameters, state dicts, forward over layers and
    directions (through the layer-stack driver, _stack), backward, gradient accumulation. Subclasses
    fix the cell."""

    proj_size = 0  # modules pickled before projections existed have none

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, dtype=np.float32, seed: int | None = None,
                 cell_clip: float | None = None, proj_size: int = 0):
        self.cell = _checks.cell(cell)
        self.input_size = _checks.positive_int("input_size", input_size)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.proj_size = _checks.proj_size(proj_size, self.hidden_size, cell)
        self.num_layers = _checks.positive_int("num_layers", num_layers)
        self.bias = _checks.flag("bias", bias)
        self.batch_first = _checks.flag("batch_first", batch_first)
        self.bidirectional = _checks.flag("bidirectional", bidirectional)
        self.dropout = _checks.probability("dropout", dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(f"dropout={self.dropout} with num_layers=1 does nothing: dropout goes between stacked "
                          "layers, after all but the last (as torch.nn's)", UserWarning, stacklevel=3)
        self.dtype = _checks.float_dtype("dtype", dtype)
        self.cell_clip = _checks.cell_clip(cell_clip, cell)
        # ||dL/dh_t|| of each layer direction (L*D, T), in time order, from the last backward.
        self.hidden_grad_norms: np.ndarray | None = None
        self.training = True
        init_seq, dropout_seq = np.random.SeedSequence(_seed(seed)).spawn(2)
        self._dropout_rng = np.random.default_rng(dropout_seq)
        self._params: OrderedDict[str, np.ndarray] = OrderedDict()
        init_rng = np.random.default_rng(init_seq)
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, shape in self._parameter_shapes():
            self._params[name] = init_rng.uniform(-bound, bound, shape).astype(self.dtype)
        self.grads: OrderedDict[str, np.ndarray] = OrderedDict()
        self.input_grads: dict[str, np.ndarray] = {}
        self.zero_grad()
        self._init_thread_state()

    # ---- parameters -------------------------------------------------------------------------------

    @property
    def _has_cell_state(self) -> bool:
        return has_cell_state(self.cell)

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional module, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def _state_size(self) -> int:
        """The width of h (and of each direction's output): proj_size with a projection, else hidden_size."""
        return self.proj_size or self.hidden_size

    def _parameter_shapes(self):
        return _stack.weight_shapes(self.cell, self.input_size, self.hidden_size, self.num_layers,
                                    self.bidirectional, self.bias, self.proj_size)

    def _stack_weights(self, source) -> list:
        """`source`'s arrays (the parameters or their gradients) as the driver takes them:
        [layer][direction] -> _stack.LayerWeights, None for the biases without bias and for weight_hr
        without a projection."""
        return [[_stack.LayerWeights(*map(source.get, names)) for names in layer]
                for layer in _stack.weight_names(self.num_layers, self.bidirectional)]

    def zero_grad(self) -> None:
        """Resets the accumulated gradients of the parameters, the input and the initial states, and
        drops the last per-sample gradients."""
        super().zero_grad()
        self.input_grads = {}
        self.per_sample_grads = OrderedDict()

    def _move_arrays(self, device: str) -> None:
        super()._move_arrays(device)
        self.input_grads = {k: _device.move(v, device) for k, v in self.input_grads.items()}
        self.per_sample_grads = OrderedDict((k, _device.move(v, device)) for k, v in self.per_sample_grads.items())

    def __repr__(self) -> str:
        extra = ""
        if self.num_layers != 1:
            extra += f", num_layers={self.num_layers}"
        if not self.bias:
            extra += ", bias=False"
        if self.batch_first:
            extra += ", batch_first=True"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.bidirectional:
            extra += ", bidirectional=True"
        if self.proj_size:
            extra += f", proj_size={self.proj_size}"
        if self.cell_clip is not None:
            extra += f", cell_clip={self.cell_clip}"
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra})"

    # ---- forward / backward -----------------------------------------------------------------------

    def __call__(self, x, hx=None, lengths=None):
        """forward(x, hx, lengths=lengths)."""
        return self.forward(x, hx, lengths=lengths)

    def _state_shape(self, batch: int | None, width: int) -> tuple[int, ...]:
        lead = self.num_layers * self.num_directions
        return (lead, width) if batch is None else (lead, batch, width)

    def _split_hx(self, hx, name: str = "hx", parts: str = "(h0, c0)"):
        """(h, c) from a user's state argument: a pair for LSTM, one array otherwise."""
        if not self._has_cell_state:
            return hx, None
        if hx is None:
            return None, None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{name}: expected a tuple {parts} for an LSTM")
        return hx[0], hx[1]

    def _checked_state(self, name, value, batch, unbatched, width):
        """A hidden state (width: self._state_size) or cell state (self.hidden_size) argument."""
        if value is None:
            return None
        arr = _checks.array(name, value, self.dtype, 2 if unbatched else 3)
        _checks.shape(name, arr, self._state_shape(None if unbatched else batch, width))
        _checks.finite(name, arr)
        return arr if not unbatched else arr[:, None, :]

    def forward(self, x, hx=None, *, lengths=None):
        """x: (T, B, input_size), (B, T, input_size) with batch_first, or unbatched (T, input_size).
        Returns (y, h_n) or, for LSTM, (y, (h_n, c_n)); y and h_n have num_directions*hidden_size and
        hidden_size features (proj_size for an LSTM with a projection), c_n hidden_size.

        After `to("cuda")`, x and hx are CUDA device arrays on the module's device (CuPy, or anything
        with __cuda_array_interface__ or a CUDA __dlpack_device__); the call runs there on CuPy's current
        stream, and the results are CuPy arrays.

        In training mode x is kept for backward by reference: changing it in place before backward makes
        backward raise RuntimeError (on the host; on a device, do not). The parameters are not checked:
        change them after backward."""
        h0_in, c0_in = self._split_hx(hx)
        self._check_on_module_device(x=x, **{"h0" if self._has_cell_state else "hx": h0_in}, c0=c0_in)
        x = x_given = _checks.array("x", x, self.dtype, (2, 3))
        unbatched = x.ndim == 2
        if unbatched:
            x = x[:, None, :]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        steps, batch, features = x.shape
        if steps == 0 or batch == 0:
            raise ValueError(f"x: empty input (no time steps or an empty batch), got shape {x_given.shape}")
        if features != self.input_size:
            raise ValueError(f"x: expected input_size {self.input_size} in the last dimension, got {features}")
        _checks.finite("x", x_given)  # before any transpose: the native scan needs contiguous memory
        h0 = self._checked_state("h0" if self._has_cell_state else "hx", h0_in, batch, unbatched,
                                 self._state_size)
        c0 = self._checked_state("c0", c0_in, batch, unbatched, self.hidden_size)
        if unbatched and lengths is not None:
            raise ValueError("lengths: not meaningful for an unbatched (T, input_size) input")
        lens = _checks.lengths(lengths, steps, batch)

        training = self.training
        dropout = self._dropout_mask if training and self.dropout > 0 else None
        weights = self._stack_weights(self._params)
        device = self.device
        if dropout is not None and device != "cpu":
            # Drawn on the host, from the module's own generator wherever it runs.
            dropout = lambda shape: _device.move(self._dropout_mask(shape), device)  # noqa: E731
        y, h_n, c_n, tapes, masks = _stack.forward(self.cell, x, weights, h0, c0, lengths=lens, training=training,
                                                   cell_clip=self.cell_clip, dropout=dropout)
        if training:  # replaces an earlier training forward's pending backward; eval forwards leave it
            # The layers' inputs held only for backward: the inner layers' outputs, and the first layer's
            # contiguous copy of x where it made one (batch_first, other strides).
            copied_x = device == "cpu" and not x.flags.c_contiguous
            inputs_nbytes = (self.num_layers - 1) * y.nbytes + (x.nbytes if copied_x else 0)
            self._pending = _Context(tapes, masks, self.batch_first, unbatched, (steps, batch, features),
                                     inputs_nbytes, device, _InputGuard.of(x, device))
        if unbatched:
            y, h_n = y[:, 0, :], h_n[:, 0, :]
            c_n = None if c_n is None else c_n[:, 0, :]
        elif self.batch_first:
            y = y.transpose(1, 0, 2)
        return (y, (h_n, c_n)) if self._has_cell_state else (y, h_n)

    @property
    def saved_nbytes(self) -> int:
        """Bytes this thread's last training-mode forward keeps for backward (0 when there is none
        pending): recorded states and gate values, inner layers' outputs and dropout masks."""
        ctx = self._pending
        return 0 if ctx is None else int(ctx.saved_nbytes)

    def _dropout_mask(self, shape) -> np.ndarray:
        keep = self._dropout_rng.random(shape) >= self.dropout
        scale = 0.0 if self.dropout >= 1.0 else 1.0 / (1.0 - self.dropout)
        return (keep * scale).astype(self.dtype)

    def backward(self, dy=None, dhx=None, *, per_sample: bool = False):
        """Backpropagates through the last training-mode forward on this thread (each one replaces the
        one before; eval-mode forwards leave it pending), once. dy has y's shape; dhx is dh_n, or
        (dh_n, dc_n) for LSTM, in h_n's shape (None: zero), on the module's device. Accumulates
        parameter gradients into
        `grads` and input/initial-state gradients into `input_grads`; returns this call's
        (dx, dh0) or, for LSTM, (dx, (dh0, dc0)).

        per_sample=True: each batch row's parameter gradients apart, in `per_sample_grads` (name ->
        (B, *shape), new arrays each call, on the module's device), `grads` left as it is; for
        per-example clipping (gradients.sum_clipped_per_sample), as differentially private training
        needs. One backward computes them all."""
        dx, dh0, dc0 = self._gradients(dy, dhx, per_sample)
        self._grads_lock.run(lambda: self._accumulate_input_grads(x=dx, h0=dh0, c0=dc0))
        return (dx, (dh0, dc0)) if self._has_cell_state else (dx, dh0)

    def _gradients(self, dy, dhx, per_sample: bool = False) -> tuple:
        """backward's work but the adding into `input_grads`: (dx, dh0, dc0), dc0 None without a cell state."""
        ctx = self._pending
        if ctx is None:
            raise RuntimeError("backward: no training-mode forward to backpropagate through; each backward "
                               "needs a forward of its own in train() mode, on the same thread")
        if ctx.device != self.device:
            raise RuntimeError(f"backward: the module moved to {self.device} after its forward on {ctx.device}; "
                               "run the forward again where the module is")
        steps, batch, features = ctx.input_shape
        hidden, dirs = self._state_size, self.num_directions
        unbatched = ctx.unbatched

        dh_in, dc_in = self._split_hx(dhx, "dhx", "(dh_n, dc_n)")
        self._check_on_module_device(dy=dy, dh_n=dh_in, dc_n=dc_in)
        if dy is not None:
            dy = _checks.array("dy", dy, self.dtype, 2 if unbatched else 3)
            want = (steps, dirs * hidden) if unbatched else (
                (batch, steps, dirs * hidden) if ctx.batch_first else (steps, batch, dirs * hidden))
            _checks.shape("dy", dy, want)
            _checks.finite("dy", dy)
            dy = dy[:, None, :] if unbatched else (dy.transpose(1, 0, 2) if ctx.batch_first else dy)
        dh_n = self._checked_state("dh_n", dh_in, batch, unbatched, self._state_size)
        dc_n = self._checked_state("dc_n", dc_in, batch, unbatched, self.hidden_size)
        per_sample = _checks.flag("per_sample", per_sample)
        if not per_sample:
            self._check_grads()
        self._pending = None  # the tapes are consumed, as torch frees its graph
        if ctx.input_guard is not None:
            ctx.input_guard.check()
        return self._grads_lock.run(self._backward, ctx, dy, dh_n, dc_n, per_sample)

    def _backward(self, ctx: _Context, dy, dh_n, dc_n, per_sample: bool = False):
        batch = ctx.input_shape[1]
        # Per sample, the gradients are written into new arrays (not added into zeroed ones: on fresh
        # pages that costs each page two faults, a read and a write).
        dx, dh0, dc0, dh_norms, made = _stack.backward(ctx.tapes, dy, dh_n, dc_n, dropout_masks=ctx.dropout_masks,
                                                       grads=None if per_sample else self._stack_weights(self.grads),
                                                       grad_groups=batch if per_sample else 1)
        if per_sample:
            self.per_sample_grads = OrderedDict(
                (name, g if batch > 1 else g[None])
                for layer_names, layer_grads in zip(_stack.weight_names(self.num_layers, self.bidirectional), made)
                for names, grads in zip(layer_names, layer_grads)
                for name, g in zip(names, map(grads._asdict().get, _stack.LayerWeights._fields))
                if name in self._params)
        unbatched = ctx.unbatched
        self.hidden_grad_norms = _device.to_host(dh_norms)
        if unbatched:
            dx, dh0 = dx[:, 0, :], dh0[:, 0, :]
            dc0 = None if dc0 is None else dc0[:, 0, :]
        elif ctx.batch_first:
            dx = dx.transpose(1, 0, 2)
        return dx, dh0, dc0

    def _accumulate_input_grads(self, **grads) -> None:
        # Accumulated in place like the parameters' while the shapes stay the same (a new array each
        # call costs well over an in-place add: bench/NOTES.md, "Versions", item 9); a new shape starts afresh.
        for name, g in grads.items():
            if g is None:
                continue
            prev = self.input_grads.get(name)
            if prev is None or prev.shape != g.shape or _device.is_cuda(prev) != _device.is_cuda(g):
                self.input_grads[name] = g.copy()
            elif _device.is_cuda(g):
                prev += g
            elif g.flags.c_contiguous and g.flags.aligned:
                _core.add_into(prev, g)  # shared by the team when large
            else:  # batch_first's transposed view
                np.add(prev, g, out=prev)


class LSTM(RNNBase):
    """Long short-term memory layers, as torch.nn.LSTM. `proj_size` (0 < proj_size < hidden_size; 0:
    none) projects the hidden state as torch's does: h = W_hr (o * tanh(c)), parameters weight_hr_l{k}
    (proj_size, hidden_size), and y, h0, h_n have proj_size features per direction. `cell_clip` bounds
    the cell state to [-cell_clip, cell_clip] after every update (no gradient flows through an entry
    whose update reached the bound)."""

    cells = ("lstm",)

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, *, dtype=np.float32, seed=None, cell_clip=None):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype=dtype, seed=seed, cell_clip=cell_clip, proj_size=proj_size)


class GRU(RNNBase):
    """Gated recurrent unit layers, as torch.nn.GRU."""

    cells = ("gru",)

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, *, dtype=np.float32, seed=None):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype=dtype, seed=seed)


class RNN(RNNBase):
    """Elman RNN layers with tanh or relu, as torch.nn.RNN (same positional order: nonlinearity 4th)."""

    cells = tuple(c for c in CELLS if c.startswith("rnn_"))  # "rnn_" + nonlinearity

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, *, dtype=np.float32, seed=None):
        if f"rnn_{nonlinearity}" not in self.cells:
            expected = " or ".join(repr(c[len("rnn_"):]) for c in self.cells)
            raise ValueError(f"nonlinearity: expected {expected}, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, dtype=dtype, seed=seed)


def make_module(cell: str, input_size: int, hidden_size: int, **kwargs) -> RNNBase:
    """The module for a functional cell name (one of functional.CELLS): its class (LSTM, GRU, RNN with
    the nonlinearity the name gives), or RNNBase itself for a cell no class claims."""
    _checks.cell(cell)
    if cell in RNN.cells:
        return RNN(input_size, hidden_size, nonlinearity=cell[len("rnn_"):], **kwargs)
    for cls in (LSTM, GRU):
        if cell in cls.cells:
            return cls(input_size, hidden_size, **kwargs)
    return RNNBase(cell, input_size, hidden_size, **kwargs)


class Linear(_Module):
    """A dense layer y = x W^T + b over the last axis (any leading axes), as torch.nn.Linear: the readout
    on top of a recurrent module. Same interface as the recurrent modules: `named_parameters()`,
    `grads` (accumulated until `zero_grad()`), `backward(dy)` returning dx, `state_dict()`,
    `load_state_dict()` (torch.nn.Linear's state dict loads as is)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=np.float32,
                 seed: int | None = None):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        bias = _checks.flag("bias", bias)
        self.dtype = _checks.float_dtype("dtype", dtype)
        rng = np.random.default_rng(_seed(seed))
        bound = 1.0 / math.sqrt(self.in_features)   # torch.nn.Linear's default initialisation range
        self._params: OrderedDict[str, np.ndarray] = OrderedDict(
            weight=rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(self.dtype))
        if bias:
            self._params["bias"] = rng.uniform(-bound, bound, self.out_features).astype(self.dtype)
        self.training = True
        self._init_thread_state()
        self.zero_grad()

    def __repr__(self) -> str:
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self._params})"

    def __call__(self, x):
        """forward(x)."""
        return self.forward(x)

    def forward(self, x) -> np.ndarray:
        """y = x W^T + b over x's last axis (in_features wide; any leading axes); in training mode
        x is kept for backward."""
        self._check_on_module_device(x=x)
        x = _checks.array("x", x, self.dtype, tuple(range(1, 33)))
        if x.size == 0:
            raise ValueError(f"x: empty input, got shape {x.shape}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected {self.in_features} features in the last dimension, got {x.shape[-1]}")
        _checks.finite("x", x)
        if self.training:  # x as backward reads it: the caller's memory, guarded, or a copy of it
            guard = _InputGuard.of(x, self.device)
            self._pending = (x, guard) if guard is not None or self.device != "cpu" else (x.copy(), None)
        y = x @ self._params["weight"].T
        return y + self._params["bias"] if "bias" in self._params else y

    def backward(self, dy) -> np.ndarray:
        """Adds the parameter gradients to `grads` and returns dL/dx."""
        if self._pending is None:
            raise RuntimeError("backward: no training-mode forward to backpropagate through; each backward "
                               "needs a forward of its own in train() mode, on the same thread")
        x, guard = self._pending
        self._check_on_module_device(dy=dy)
        dy = _checks.array("dy", dy, self.dtype, x.ndim)
        _checks.shape("dy", dy, x.shape[:-1] + (self.out_features,))
        _checks.finite("dy", dy)
        self._check_grads(native=False)
        self._pending = None  # consumed only once every argument is good, as the recurrent modules do
        if guard is not None:
            guard.check()
        flat_dy, flat_x = dy.reshape(-1, self.out_features), x.reshape(-1, self.in_features)
        weight_grad = flat_dy.T @ flat_x
        bias_grad = flat_dy.sum(axis=0) if "bias" in self.grads else None
        self._grads_lock.run(self._add_grads, weight_grad, bias_grad)
        return dy @ self._params["weight"]

    def _add_grads(self, weight_grad, bias_grad) -> None:
        self.grads["weight"] += weight_grad
        if bias_grad is not None:
            self.grads["bias"] += bias_grad

"""Optimisers that update parameters in place with torch.optim's update rules: NumPy arrays, or CuPy
arrays on a CUDA device (a module moved there with `to("cuda")`), updated where they are.

An optimiser takes a module (anything with `named_parameters()` and a `grads` mapping, like
`fusedrnn.LSTM` or `fusedrnn.Linear`), a list of modules, a mapping name -> array, or a list of arrays.
`step()` reads the modules' `grads`; for arrays, `step(grads)` takes gradients in the same order (a
list) or with the same names (a mapping).
The state (momentum, moments) is kept in float64 beside each parameter and the result cast to its dtype.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _checks, _device


def _hyper(name: str, value, *, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not (low < value if low_open else low <= value) or not value < high:
        interval = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
    return value


def _is_module(value) -> bool:
    return hasattr(value, "named_parameters") and hasattr(value, "grads")


def _modules(params) -> list | None:
    """The modules whose parameters these are, or None for plain arrays."""
    if _is_module(params):
        return [params]
    if isinstance(params, (list, tuple)) and params and all(_is_module(p) for p in params):
        return list(params)
    return None


def _module_items(modules: list, items) -> list:
    """(name, value) of `items(module)` for every module, a name prefixed by its module's index where there
    are several: the names a list of modules' parameters and gradients go by."""
    several = len(modules) > 1
    return [(f"{i}.{n}" if several else n, v) for i, m in enumerate(modules) for n, v in items(m)]


class Optimizer:
    """The shared part: parameter bookkeeping and gradient lookup. Subclasses define
    `_update(p, g, state, xp)`: the new value of p (float64) from its gradient g and its state, with xp
    the arrays' module (numpy or cupy)."""

    def __init__(self, params, lr: float):
        self._modules = _modules(params)
        if self._modules is not None:
            named = _module_items(self._modules, lambda m: m.named_parameters())
        else:
            named = _checks.named_arrays("params", params)
        if not named:
            raise ValueError("params: expected at least one parameter, got none")
        for name, p in named:
            _checks.refuse_masked(f"params[{name!r}]", p)
            if not (isinstance(p, np.ndarray) or _device.is_cuda(p)) or p.dtype.kind != "f":
                raise TypeError(f"params[{name!r}]: expected a float array, got {_checks.described(p)} "
                                f"({_checks.IN_PLACE})")
            if not getattr(p.flags, "writeable", True):
                raise ValueError(f"params[{name!r}]: the array is read-only and cannot be updated in place")
            if hasattr(p, "strides"):  # NumPy's and CuPy's, in bytes
                _checks.elements_apart(f"params[{name!r}]", p)
        for i, (name, p) in enumerate(named):  # a parameter listed twice would take every step twice
            for other, q in named[:i]:
                if p is q or _checks.overlap(p, q):
                    raise ValueError(f"params[{name!r}]: the same memory as params[{other!r}]; list each "
                                     f"parameter once")
        self._named = named
        self.lr = _hyper("lr", lr)
        self.state: list[dict] = [{} for _ in named]
        self.steps = 0

    def _check_modules_unmoved(self) -> None:
        current = [p for m in self._modules for _, p in m.named_parameters()]
        if len(current) != len(self._named) or any(p is not q for p, (_, q) in zip(current, self._named)):
            raise RuntimeError("params: the module's parameters were replaced (moved with to(), or the module "
                               "rebuilt) after this optimiser was made; make the optimiser after moving the module")

    def _gradients(self, grads) -> list[np.ndarray]:
        if grads is None:
            if self._modules is None:
                raise TypeError("grads: expected the gradients (these parameters are not a module's)")
            # By name, as the parameters were listed: never by the order of a grads dict.
            grads = dict(_module_items(self._modules, lambda m: m.grads.items()))
        if hasattr(grads, "keys"):
            missing = [n for n, _ in self._named if n not in grads]
            if missing:
                raise ValueError(f"grads: no gradient for {missing}")
            listed = [(n, grads[n]) for n, _ in self._named]
        else:
            listed = _checks.named_arrays("grads", grads)
            if len(listed) != len(self._named):
                raise ValueError(f"grads: expected {len(self._named)} gradients (one per parameter), got "
                                 f"{len(listed)}")
            listed = [(pn, g) for (pn, _), (_, g) in zip(self._named, listed)]
        out = []
        for (name, p), (_, g) in zip(self._named, listed):
            if g is None:
                raise TypeError(f"grads[{name!r}]: expected a gradient array, got None")
            on = _device.device_of(g)
            if on != _device.device_of(p):
                raise ValueError(f"grads[{name!r}]: on {on}, but its parameter is on {_device.device_of(p)}")
            g = g if _device.is_cuda(g) else _checks.as_array(f"grads[{name!r}]", g)
            _checks.shape(f"grads[{name!r}]", g, p.shape)
            if g.dtype.kind != "f":  # every gradient checked before any parameter changes
                raise TypeError(f"grads[{name!r}]: expected a float array, got dtype {g.dtype}")
            out.append(g)
        return out

    def step(self, grads=None) -> None:
        """Updates every parameter in place from its gradient."""
        if self._modules is not None:
            self._check_modules_unmoved()
        gradients = self._gradients(grads)
        self.steps += 1
        for (_, p), g, state in zip(self._named, gradients, self.state):
            p = _checks.plain_view(p)
            p[...] = self._update(p.astype(np.float64), g.astype(np.float64), state, _device.array_module(p))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and L2 weight
    decay, as torch.optim.SGD:

        g = grad + weight_decay * p
        b = g (first step), else momentum * b + (1 - dampening) * g
        g = g + momentum * b (nesterov) or b (momentum > 0)
        p = p - lr * g
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        self.momentum = _hyper("momentum", momentum)
        self.dampening = _hyper("dampening", dampening)
        self.weight_decay = _hyper("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")

    def _update(self, p, g, state, xp):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = state.get("momentum_buffer")
            buf = g.copy() if buf is None else self.momentum * buf + (1.0 - self.dampening) * g
            state["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return p - self.lr * g


class Adam(Optimizer):
    """Adam (optionally AMSGrad, with L2 weight decay added to the gradient), as torch.optim.Adam:

        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2   (v_max = max(v_max, v))
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.betas = (_hyper("betas[0]", betas[0], high=1.0), _hyper("betas[1]", betas[1], high=1.0))
        self.eps = _hyper("eps", eps)
        self.weight_decay = _hyper("weight_decay", weight_decay)
        self.amsgrad = bool(amsgrad)

    def _update(self, p, g, state, xp):
        beta1, beta2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * p
        m = beta1 * state.get("exp_avg", 0.0) + (1.0 - beta1) * g
        v = beta2 * state.get("exp_avg_sq", 0.0) + (1.0 - beta2) * g * g
        state["exp_avg"], state["exp_avg_sq"] = m, v
        if self.amsgrad:
            v = state["max_exp_avg_sq"] = xp.maximum(state.get("max_exp_avg_sq", 0.0), v)
        t = self.steps
        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2**t) + self.eps
        return p - self.lr / (1.0 - beta1**t) * m / denom

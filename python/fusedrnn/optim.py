"""Optimisers that update parameters in place with torch.optim's update rules: NumPy arrays, or CuPy
arrays on a CUDA device (a module moved there with `to("cuda")`), updated where they are.

An optimiser takes a module (anything with `named_parameters()` and a `grads` mapping, like
`fusedrnn.LSTM` or `fusedrnn.Linear`), a list of modules, a mapping name -> array, or a list of arrays.
`step()` reads the modules' `grads`; for arrays, `step(grads)` takes gradients in the same order (a
list) or with the same names (a mapping).
The state (momentum, moments) is kept in float64 beside each parameter and the result cast to its dtype.
`state_dict()` and `load_state_dict()` save and restore it (with the steps taken and the
hyperparameters), so training resumes where it stopped.
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
    """The shared part: parameter bookkeeping, gradient lookup, saving and restoring. Subclasses define
    `_update(p, g, state, xp)`: the new value of p (float64) from its gradient g and its state (a dict
    of arrays of p's shape), with xp the arrays' module (numpy or cupy). To have more hyperparameters
    than lr checked and saved, they define `_checked_hyperparameters(**given)`; to have the state's
    names checked when loaded, `_STATE_NAMES` and `_required_state`."""

    # The names of a parameter's state (momentum, moments: arrays of its shape) this optimiser may keep;
    # None: any (a subclass that does not say).
    _STATE_NAMES: tuple[str, ...] | None = None

    def __init__(self, params, lr: float, **hyperparameters):
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
        self._set_hyperparameters(self._checked_hyperparameters(lr=lr, **hyperparameters))
        self.state: list[dict] = [{} for _ in named]
        self.steps = 0

    @staticmethod
    def _checked_hyperparameters(lr) -> dict:
        """The hyperparameters by name, each checked (ValueError/TypeError naming it)."""
        return dict(lr=_hyper("lr", lr))

    @staticmethod
    def _required_state(hyperparameters: dict) -> tuple[str, ...]:
        """The state names every parameter has after a step with these hyperparameters."""
        return ()

    def _set_hyperparameters(self, hyperparameters: dict) -> None:
        self._hyperparameter_names = tuple(hyperparameters)
        for name, value in hyperparameters.items():
            setattr(self, name, value)

    def state_dict(self) -> dict:
        """What load_state_dict needs to resume: the optimiser's kind, the steps taken, the
        hyperparameters and each parameter's state by the parameter's name (copies, on its device). As
        torch.optim's state_dict, keyed by name rather than by position."""
        return {"optimizer": type(self).__name__, "steps": self.steps,
                "hyperparameters": {name: getattr(self, name) for name in self._hyperparameter_names},
                "state": {name: {key: value.copy() if hasattr(value, "copy") else value for key, value in state.items()}
                          for (name, _), state in zip(self._named, self.state)}}

    def load_state_dict(self, state_dict) -> None:
        """Restores what state_dict() gave (saved from an optimiser of this kind over parameters of the
        same names and shapes), its arrays on any device copied onto each parameter's. Everything is
        checked before anything changes."""
        where = "state_dict"
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"{where}: expected a mapping (an optimiser's state_dict()), got "
                            f"{type(state_dict).__name__}")
        _exact_keys(where, state_dict, ("optimizer", "steps", "hyperparameters", "state"))
        if state_dict["optimizer"] != type(self).__name__:
            raise ValueError(f"{where}['optimizer']: the state of a {state_dict['optimizer']}, but this optimiser "
                             f"is a {type(self).__name__}")
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"{where}['steps']: expected a whole number >= 0, got {steps!r}")
        given = state_dict["hyperparameters"]
        if not hasattr(given, "keys"):
            raise TypeError(f"{where}['hyperparameters']: expected a mapping, got {type(given).__name__}")
        _exact_keys(f"{where}['hyperparameters']", given, self._hyperparameter_names)
        hyperparameters = self._checked_hyperparameters(**given)
        saved = state_dict["state"]
        if not hasattr(saved, "keys"):
            raise TypeError(f"{where}['state']: expected a mapping, got {type(saved).__name__}")
        _exact_keys(f"{where}['state']", saved, [name for name, _ in self._named])
        required = self._required_state(hyperparameters) if steps else ()
        state = [{key: _loaded_state(f"{where}['state'][{name!r}][{key!r}]", value, p, self._STATE_NAMES is None)
                  for key, value in _state_entries(f"{where}['state'][{name!r}]", saved[name], self._STATE_NAMES,
                                                   required)}
                 for name, p in self._named]
        self._set_hyperparameters(hyperparameters)
        self.steps = int(steps)
        self.state = state

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


def _exact_keys(where: str, mapping, want) -> None:
    missing = [k for k in want if k not in mapping]
    unexpected = [k for k in mapping.keys() if k not in want]
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")


def _state_entries(where: str, entries, names, required) -> list:
    """The (name, value) pairs of one parameter's saved state: each name one this optimiser keeps, and
    those it has after a step all there once steps were taken."""
    if not hasattr(entries, "keys"):
        raise TypeError(f"{where}: expected a mapping of state name -> array, got {type(entries).__name__}")
    unknown = [k for k in entries.keys() if names is not None and k not in names]
    if unknown:
        raise ValueError(f"{where}: unexpected keys {unknown} (this optimiser keeps {list(names)})")
    missing = [k for k in required if k not in entries]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}, which every parameter has after a step")
    return list(entries.items())


def _loaded_state(where: str, value, param, scalars: bool):
    """A saved state array (any device, a torch tensor too) as a float64 copy on `param`'s device; a
    number too, where `scalars` (an optimiser that does not name its state may keep counts)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    host = _checks.as_array(where, _device.to_host(value))
    if host.dtype.kind not in "fiu":
        raise TypeError(f"{where}: expected a real numeric array, got dtype {host.dtype}")
    if scalars and host.ndim == 0:
        if not np.isfinite(host):
            raise ValueError(f"{where}: contains NaN or infinite values")
        return host.item()
    _checks.shape(where, host, param.shape)
    host = np.array(host, dtype=np.float64)  # a copy: the caller's array stays theirs
    if not np.isfinite(host).all():
        raise ValueError(f"{where}: contains NaN or infinite values")
    return _device.move(host, _device.device_of(param))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and L2 weight
    decay, as torch.optim.SGD:

        g = grad + weight_decay * p
        b = g (first step), else momentum * b + (1 - dampening) * g
        g = g + momentum * b (nesterov) or b (momentum > 0)
        p = p - lr * g
    """

    _STATE_NAMES = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)

    @staticmethod
    def _checked_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> dict:
        checked = dict(lr=_hyper("lr", lr), momentum=_hyper("momentum", momentum),
                       dampening=_hyper("dampening", dampening), weight_decay=_hyper("weight_decay", weight_decay),
                       nesterov=_checks.flag("nesterov", nesterov))
        if checked["nesterov"] and (checked["momentum"] == 0 or checked["dampening"] != 0):
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")
        return checked

    @staticmethod
    def _required_state(hyperparameters: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if hyperparameters["momentum"] else ()

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

    _STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    @staticmethod
    def _checked_hyperparameters(lr, betas, eps, weight_decay, amsgrad) -> dict:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        return dict(lr=_hyper("lr", lr), betas=(_hyper("betas[0]", betas[0], high=1.0),
                                                _hyper("betas[1]", betas[1], high=1.0)),
                    eps=_hyper("eps", eps), weight_decay=_hyper("weight_decay", weight_decay),
                    amsgrad=_checks.flag("amsgrad", amsgrad))

    @staticmethod
    def _required_state(hyperparameters: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyperparameters["amsgrad"] else ())

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

"""Gradient clipping with torch.nn.utils' semantics, per-example clipping of per-sample gradients, a
report of non-finite gradients (to skip a step rather than write NaN into the weights), and a diagnosis
of how the gradient flows back through time.

`grads` everywhere is a module's `grads` mapping, any mapping name -> array, a list of arrays or one
array: NumPy arrays, or CuPy arrays on a CUDA device (a module moved there), worked on where they are.
The clipping functions change them in place; the functions that only read them (grad_norm,
nonfinite_grads, sum_clipped_per_sample) also take what NumPy reads (CPU torch tensors, JAX arrays).
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, NamedTuple

import numpy as np

from . import _checks, _device
from ._optional import require

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm


def _grad_arrays(grads, *, changed: bool = False, name: str = "grads") -> list:
    """The gradients as (key, array) pairs, each checked; with `changed`, also that every one can be
    written, before any is (a failed clip leaves them all as they were). `name`: the argument's."""
    named = _checks.named_arrays(name, grads)
    if not changed:  # read only: whatever NumPy reads (a CPU torch tensor, a JAX array) will do
        named = [(key, g if isinstance(g, np.ndarray) or _device.is_cuda(g) else
                  _checks.as_array(f"{name}[{key!r}]", g)) for key, g in named]
    for key, g in named:
        _checks.refuse_masked(f"{name}[{key!r}]", g)
        if not (isinstance(g, np.ndarray) or _device.is_cuda(g)) or g.dtype.kind != "f":
            raise TypeError(f"{name}[{key!r}]: expected a float array, got {_checks.described(g)}"
                            + (f" ({_checks.IN_PLACE})" if changed else ""))
        if changed and isinstance(g, np.ndarray) and not g.flags.writeable:
            raise ValueError(f"{name}[{key!r}]: array is read-only (clipping changes it in place)")
    return [(key, _checks.plain_view(g)) for key, g in named]


def nonfinite_grads(grads) -> list:
    """The keys (names, or positions in a list) of the gradients holding NaN or infinity; [] if none."""
    return _nonfinite(_grad_arrays(grads))


def _nonfinite(named) -> list:
    return [key for key, g in named if g.size and not _device.array_module(g).isfinite(g).all()]


def _norm_type(norm_type) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real) or not norm_type > 0:
        raise ValueError(f"norm_type: expected a positive number or inf, got {norm_type!r}")
    return float(norm_type)


def _vector_norm(values, p: float) -> float:
    xp = _device.array_module(values)
    a = xp.abs(values.astype(np.float64, copy=False)).ravel()
    if a.size == 0:
        return 0.0
    if p == math.inf:
        return float(a.max())
    with np.errstate(over="ignore", under="ignore"):
        total = _sum_norm(xp, a, p)
        if math.isinf(total) or total == 0.0:  # the powers of finite values past float64's range, either way
            largest = float(a.max())
            if 0.0 < largest < math.inf:
                return largest * _sum_norm(xp, a / largest, p)
    return total


def _sum_norm(xp, a, p: float) -> float:
    if p == 2.0:
        # Not np.dot: a BLAS call here wakes NumPy's BLAS threads, which then fight the kernels' for cores.
        return float(xp.sqrt(xp.sum(xp.square(a))))
    return float(xp.sum(a**p) ** (1.0 / p))


def _row_norms(xp, rows):
    """The L2 norm of each row of a float64 (N, M) array, rescaled by the row's largest value where the
    squares pass float64's range either way (as _vector_norm does)."""
    with np.errstate(over="ignore", under="ignore"):
        norms = xp.sqrt(xp.sum(xp.square(rows), axis=1))
        suspect = (norms == 0) | xp.isinf(norms)
        if rows.shape[1] and bool(suspect.any()):
            largest = xp.abs(rows[suspect]).max(axis=1)
            finite = (largest > 0) & xp.isfinite(largest)
            redo = xp.flatnonzero(suspect)[finite]
            scaled = rows[redo] / largest[finite][:, None]
            norms[redo] = largest[finite] * xp.sqrt(xp.sum(xp.square(scaled), axis=1))
    return norms


def _total_norm(named: list, p: float) -> float:
    return _vector_norm(np.array([_vector_norm(g, p) for _, g in named]), p)


def grad_norm(grads, norm_type: float = 2.0) -> float:
    """The norm of all gradients taken together as one vector (the norm of the per-array norms)."""
    return _total_norm(_grad_arrays(grads), _norm_type(norm_type))


def clip_grad_norm(grads, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scales all gradients in place so their total norm is at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_: the total norm is that of all gradients as one vector
    (norm_type 2 by default, or any p > 0, or inf for the largest magnitude); each is multiplied by
    min(1, max_norm / (total + 1e-6)). Returns the total norm before clipping.

    A NaN or infinite total raises RuntimeError naming the gradients at fault when error_if_nonfinite;
    otherwise the gradients are scaled as torch scales them (NaN spreads, an infinite total zeroes the
    finite entries): check `math.isfinite(total)` or `nonfinite_grads` and skip that step."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm >= 0:
        raise ValueError(f"max_norm: expected a number >= 0, got {max_norm!r}")
    named = _grad_arrays(grads, changed=True)
    total = _total_norm(named, _norm_type(norm_type))
    if not math.isfinite(total) and error_if_nonfinite:
        culprits = _nonfinite(named)
        raise RuntimeError(f"grads: the total {norm_type}-norm is {total}; " +
                           (f"non-finite gradients in {culprits}" if culprits else
                            "every gradient is finite, but their norm exceeds float64's range"))
    with np.errstate(invalid="ignore", divide="ignore"):
        coef = min(float(max_norm) / (total + CLIP_EPS), 1.0) if not math.isnan(total) else math.nan
        if coef < 1.0 or math.isnan(coef):
            for _, g in named:
                g *= g.dtype.type(coef)
    return total


def clip_grad_value(grads, clip_value: float) -> None:
    """Clamps every gradient entry into [-clip_value, clip_value] in place (NaN stays NaN), as
    torch.nn.utils.clip_grad_value_."""
    if isinstance(clip_value, bool) or not isinstance(clip_value, numbers.Real) or not clip_value >= 0:
        raise ValueError(f"clip_value: expected a number >= 0, got {clip_value!r}")
    for _, g in _grad_arrays(grads, changed=True):
        _device.array_module(g).clip(g, -clip_value, clip_value, out=g)


def sum_clipped_per_sample(per_sample_grads, max_norm: float) -> tuple:
    """Per-example clipping, as differentially private SGD does it: each sample's gradients (a module's
    `per_sample_grads` after `backward(..., per_sample=True)`, or any mapping name -> array whose first
    dimension is the sample) scaled so that the sample's total L2 norm over all arrays is at most
    `max_norm` (by min(1, max_norm / (norm + 1e-6)), clip_grad_norm's rule), then summed over the
    samples. Returns (sums, norms): name -> the sum (the array without its sample dimension, on the
    arrays' device), and each sample's norm before clipping ((N,) float64, on the host). The inputs are
    not changed; noise, if any, is the caller's to add."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm >= 0:
        raise ValueError(f"max_norm: expected a number >= 0, got {max_norm!r}")
    if not isinstance(per_sample_grads, Mapping) or not per_sample_grads:
        raise TypeError("per_sample_grads: expected a non-empty mapping name -> array with a leading sample "
                        f"dimension, got {type(per_sample_grads).__name__}")
    named = _grad_arrays(per_sample_grads, name="per_sample_grads")
    samples = None
    for key, g in named:
        if g.ndim == 0 or (samples is not None and g.shape[0] != samples):
            raise ValueError(f"per_sample_grads[{key!r}]: expected a leading sample dimension of "
                             f"{samples if samples is not None else 'the same size in every array'}, got shape "
                             f"{g.shape}")
        samples = g.shape[0]
    _device.common_device(**{f"per_sample_grads[{key!r}]": g for key, g in named})
    xp = _device.array_module(named[0][1])
    per_array = [_row_norms(xp, g.reshape(samples, math.prod(g.shape[1:])).astype(np.float64)) for _, g in named]
    norms = _row_norms(xp, xp.stack(per_array, axis=1))  # no samples: an empty (0,)
    with np.errstate(invalid="ignore", divide="ignore"):
        coef = xp.minimum(float(max_norm) / (norms + CLIP_EPS), 1.0)
    sums = {key: xp.tensordot(coef.astype(g.dtype), g, axes=1) for key, g in named}
    return sums, _device.to_host(norms)


# ---- gradient flow through time ------------------------------------------------------------------------


class GradientFlow(NamedTuple):
    """What diagnose_gradient_flow returns."""

    verdict: str             # "vanishing", "exploding" or "healthy"
    factor_per_step: float   # fitted |dL/dh| ratio for one step back along the recurrence (< 1: decays)
    span: float              # fitted ratio between the far end's norm and the near end's
    norms: np.ndarray        # the profile diagnosed, (T,)


def _norm_profile(name: str, norms) -> np.ndarray:
    arr = _checks.as_array(name, norms)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def diagnose_gradient_flow(norms, *, reverse: bool = False, vanishing_below: float = 1e-3,
                           exploding_above: float = 1e3) -> GradientFlow:
    """Reads a profile of ||dL/dh_t|| (a module's `hidden_grad_norms[k]` after backward) whose gradient
    enters at the end of the recurrence, e.g. a loss on the last step only (the first step for a
    reverse direction, `reverse=True`).

    A least-squares line through log ||dL/dh_t|| gives the factor by which the norm changes per step
    back in time, and `span` = factor ** (T - 1) what reaches the far end. span below
    `vanishing_below` is "vanishing", above `exploding_above` "exploding", else "healthy". A norm that
    is exactly zero before the far end (underflow, dead units) counts as vanishing."""
    arr = _norm_profile("norms", norms)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"norms: expected a 1-D profile of at least 2 steps, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("norms: expected finite norms >= 0 (an overflow already means exploding "
                         "gradients; lower the scale to measure it)")
    for name, value in (("vanishing_below", vanishing_below), ("exploding_above", exploding_above)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not 0 < vanishing_below < 1 < exploding_above:
        raise ValueError(f"vanishing_below, exploding_above: expected 0 < vanishing_below < 1 < "
                         f"exploding_above, got {vanishing_below}, {exploding_above}")
    back = arr if reverse else arr[::-1]    # back[j]: j steps back from where the gradient enters
    if back[0] == 0:
        raise ValueError("norms: the gradient where it enters is zero; nothing flows to diagnose")
    zeros = np.flatnonzero(back == 0)
    reach = back[:zeros[0]] if zeros.size else back   # the fit stops where the gradient hit zero
    factor = float(np.exp(np.polyfit(np.arange(reach.size), np.log(reach), 1)[0])) if reach.size >= 2 else 0.0
    with np.errstate(over="ignore"):
        span = float(np.power(factor, arr.size - 1))  # inf past float range: exploding all the same
    if zeros.size or span < vanishing_below:
        verdict = "vanishing"
    else:
        verdict = "exploding" if span > exploding_above else "healthy"
    return GradientFlow(verdict, factor, span, arr)


def plot_gradient_flow(profiles: Mapping[str, np.ndarray], path=None, *, title: str | None = None):
    """A figure of ||dL/dh_t|| against t on a log scale, one line per labelled profile; saved to `path`
    when given. Needs matplotlib (the `plot` extra)."""
    fig = require("matplotlib.figure", "plot").Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, norms in profiles.items():
        arr = _norm_profile(f"profiles[{label!r}]", norms)
        ax.semilogy(np.arange(arr.size), np.where(arr > 0, arr, np.nan), label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(title or "Gradient reaching each step's hidden state")
    ax.legend()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


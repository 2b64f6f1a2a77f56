"""Losses over sequences, each returning (loss, gradient of the loss with respect to its input), with
an optional mask that leaves padded steps out of both.

`mask` is boolean with the leading shape of the prediction, e.g. (T, B) for a (T, B, F) prediction
(`fusedrnn.sequences.length_mask(lengths)` makes one). With reduction="mean" the loss is averaged over
the elements the mask keeps (as torch's losses average over all elements); "sum" adds them up.

The arrays of one call are NumPy arrays, or CuPy arrays on one CUDA device (the output of a module
moved there), and the gradient is on their device; mixing devices is refused by name.
"""

from __future__ import annotations

import numpy as np

from . import _checks, _device

REDUCTIONS = ("mean", "sum")


def _array_module(**arrays):
    """The module (numpy or cupy) of the call's arrays, all on one device (a ValueError naming the first
    on another)."""
    _device.common_device(**arrays)
    return _device.array_module(next(iter(arrays.values())))


def _float_array(name: str, value, xp) -> np.ndarray:
    arr = _checks.as_array(name, value, xp)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {arr.dtype}")
    if not bool(xp.isfinite(arr).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _mask(mask, lead_shape: tuple[int, ...], xp) -> np.ndarray | None:
    if mask is None:
        return None
    m = _checks.as_array("mask", mask, xp)
    if m.dtype != bool:
        raise TypeError(f"mask: expected a boolean array, got dtype {m.dtype}")
    if m.ndim == 0:
        raise ValueError(f"mask: expected an array of at least one dimension, the leading ones of {lead_shape}, "
                         f"got a scalar")
    if m.shape != lead_shape[:m.ndim]:
        raise ValueError(f"mask: expected a shape that leads {lead_shape}, got {m.shape}")
    return m


def _reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _weights(mask: np.ndarray | None, shape: tuple[int, ...], reduction: str, xp,
             name: str) -> tuple[np.ndarray, float]:
    """Per-element weights broadcastable to `shape` (1 where kept, 0 where masked) and the divisor.
    `name`: the argument whose elements these are."""
    if mask is None:
        keep = xp.ones((1,) * len(shape))
        count = float(np.prod(shape))
    else:
        keep = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim)).astype(np.float64)
        count = float(mask.sum()) * float(np.prod(shape[mask.ndim:]))
    if reduction == "sum":
        return keep, 1.0
    if count == 0:
        if mask is None or np.prod(shape) == 0:
            raise ValueError(f"{name}: no elements; the mean of nothing is undefined")
        raise ValueError("mask: masks out every element; the mean of nothing is undefined")
    return keep, count


def mse_loss(prediction, target, mask=None, reduction: str = "mean") -> tuple[float, np.ndarray]:
    """Mean squared error: (loss, d loss / d prediction), the gradient in the prediction's dtype."""
    xp = _array_module(prediction=prediction, target=target, mask=mask)
    pred = _float_array("prediction", prediction, xp)
    tgt = _float_array("target", target, xp)
    if tgt.shape != pred.shape:
        raise ValueError(f"target: expected the prediction's shape {pred.shape}, got {tgt.shape}")
    keep, count = _weights(_mask(mask, pred.shape, xp), pred.shape, _reduction(reduction), xp, "prediction")
    # Selected, not multiplied: a masked position's overflow (inf * 0) must not reach the loss.
    diff = xp.where(keep != 0, pred.astype(np.float64) - tgt, 0.0)
    loss = float(xp.sum(diff * diff)) / count
    return loss, (2.0 / count * diff).astype(pred.dtype)


def cross_entropy(logits, targets, mask=None, reduction: str = "mean") -> tuple[float, np.ndarray]:
    """Softmax cross-entropy over the last axis: logits (..., C), targets (...) class indices in
    [0, C). Returns (loss, d loss / d logits) with the gradient in the logits' dtype. A masked-out
    position's target is not looked at (padding may hold any value there)."""
    xp = _array_module(logits=logits, targets=targets, mask=mask)
    z = _float_array("logits", logits, xp)
    if z.ndim < 1 or z.shape[-1] == 0:
        raise ValueError(f"logits: expected shape (..., classes) with classes >= 1, got {z.shape}")
    t = _checks.as_array("targets", targets, xp)
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets: expected integer class indices, got dtype {t.dtype}")
    if t.shape != z.shape[:-1]:
        raise ValueError(f"targets: expected shape {z.shape[:-1]} (logits without the class axis), got {t.shape}")
    m = _mask(mask, t.shape, xp)
    keep, count = _weights(m, t.shape, _reduction(reduction), xp, "logits")
    kept = xp.ones(t.shape, bool) if m is None else xp.broadcast_to(keep != 0, t.shape)
    classes = z.shape[-1]
    bad = kept & ((t < 0) | (t >= classes))
    if bool(bad.any()):
        where = tuple(int(i) for i in xp.argwhere(bad)[0])
        raise ValueError(f"targets: class index {int(t[where])} at {where} is outside [0, {classes})")
    t = xp.where(kept, t, 0)
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(axis=-1, keepdims=True)          # log-sum-exp without overflow
    log_prob = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    picked = xp.take_along_axis(log_prob, t[..., None], axis=-1)[..., 0]
    loss = float(-xp.sum(xp.where(kept, picked, 0.0))) / count  # selected, as in mse_loss
    grad = xp.exp(log_prob)
    xp.put_along_axis(grad, t[..., None], xp.take_along_axis(grad, t[..., None], axis=-1) - 1.0, axis=-1)
    grad = xp.where(kept[..., None], grad / count, 0.0)
    return loss, grad.astype(z.dtype)

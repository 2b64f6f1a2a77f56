"""The XLA FFI calls of fusedrnn.jax: one layer (all its directions) forward and backward as a
jax.custom_vjp whose backward is the fused backward kernel, with the forward's tape as residuals.

Buffers and their layout are described in csrc/bindings/jax_ffi.cpp. Optional arrays (h0, c0, lengths,
and c_n/dc0/cs for a cell without a cell state) travel as empty (0,) arrays. Under jax.vmap the calls
use vmap_method="expand_dims": an unmapped argument keeps a leading dimension of 1 and the handler
shares it across the mapped elements, so weights are never copied per element.
"""

from __future__ import annotations

import math
import threading
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _core
from ..functional import has_cell_state

_FORWARD = "fusedrnn_layer_forward"
_BACKWARD = "fusedrnn_layer_backward"
_registered = False
_register_lock = threading.Lock()


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def register() -> None:
    """Registers the handlers with XLA (once per process). Raises ImportError, saying what to do, when
    this build of fusedrnn has no handlers or when the running jaxlib is older than the one whose FFI
    headers they were built against (XLA would refuse them at call time)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        targets = getattr(_core, "jax_ffi_targets", None)
        if targets is None:
            raise ImportError("fusedrnn was built without its XLA FFI handlers (jaxlib was not installed at "
                              "build time): reinstall it with pip install 'fusedrnn[jax]'")
        import jaxlib.version

        built, running = _core.jax_ffi_built_with_jaxlib, jaxlib.version.__version__
        if _version(running) < _version(built):
            raise ImportError(f"fusedrnn's XLA FFI handlers were built against jaxlib {built}, newer than the "
                              f"installed jaxlib {running}, which would refuse them: upgrade jaxlib to "
                              f">= {built} or rebuild fusedrnn against this one")
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _registered = True


class LayerSpec(NamedTuple):
    """The static options of a layer call (hashable: a custom_vjp non-differentiable argument)."""
    cell: str
    directions: int
    check_finite: bool        # NaN/inf in x, h0, c0 (and dy, dh_n, dc_n in backward) raise at run time
    cell_clip: float | None   # checked by _checks.cell_clip


def _none(dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((0,), dtype)


def _attrs(spec: LayerSpec) -> dict:
    return dict(cell=spec.cell, directions=np.int64(spec.directions), check_inputs=bool(spec.check_finite),
                cell_clip=np.float64(math.inf if spec.cell_clip is None else spec.cell_clip))


def _forward_call(spec: LayerSpec, training: bool, x, h0, c0, lengths, weights):
    steps, batch, _ = x.shape
    hidden = weights[1].shape[1]
    dirs, dtype = spec.directions, x.dtype
    has_c = has_cell_state(spec.cell)
    state = jax.ShapeDtypeStruct((dirs, batch, hidden), dtype)
    hs = cs = saved = _none(dtype)
    if training:
        _, state_values, saved_values = _core.tape_layout(spec.cell, steps, batch, hidden, True)
        hs = jax.ShapeDtypeStruct((dirs, state_values), dtype)
        cs = hs if has_c else cs
        saved = jax.ShapeDtypeStruct((dirs, saved_values), dtype) if saved_values else saved
    results = (jax.ShapeDtypeStruct((steps, batch, dirs * hidden), dtype), state,
               state if has_c else _none(dtype), hs, cs, saved)
    call = jax.ffi.ffi_call(_FORWARD, results, vmap_method="expand_dims")
    return call(x, h0, c0, lengths, *weights, training=bool(training), **_attrs(spec))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def layer(spec: LayerSpec, x, h0, c0, lengths, weights):
    """One layer, every direction: x (T, B, I); h0, c0 (D, B, H) or empty; lengths int (B,) or empty;
    weights a tuple of (weight_ih, weight_hh[, bias_ih, bias_hh]) per direction, flattened. Returns
    y (T, B, D*H), h_n (D, B, H) and c_n (D, B, H), or empty for a cell without a cell state."""
    y, h_n, c_n, _, _, _ = _forward_call(spec, False, x, h0, c0, lengths, weights)
    return y, h_n, c_n


_SECOND_DERIVATIVES = ("fusedrnn.jax: second derivatives (the gradient of a gradient, hessian, jacfwd of a "
                       "gradient) are not supported: the fused backward kernel has no derivative of its own")


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _training_forward(spec, x, h0, c0, lengths, weights):
    """The forward that writes the tape, as the first half of `layer`'s derivative."""
    return _forward_call(spec, True, x, h0, c0, lengths, weights)


@_training_forward.defjvp
def _training_forward_jvp(spec, primals, tangents):
    raise NotImplementedError(_SECOND_DERIVATIVES)


def _layer_fwd(spec, x, h0, c0, lengths, weights):
    y, h_n, c_n, hs, cs, saved = _training_forward(spec, x, h0, c0, lengths, weights)
    return (y, h_n, c_n), (x, h0, c0, lengths, weights, hs, cs, saved)


def _layer_bwd(spec, residuals, cotangents):
    x, h0, c0, lengths, weights, hs, cs, saved = residuals
    dy, dh_n, dc_n = cotangents
    dx, dh0, dc0, weight_grads = layer_backward(spec, x, lengths, hs, cs, saved, dy, dh_n, dc_n, weights)
    # An absent initial state (an empty array) gets an empty gradient.
    dh0 = dh0 if h0.size else jnp.zeros_like(h0)
    dc0 = dc0 if c0.size else jnp.zeros_like(c0)
    return dx, dh0, dc0, None, weight_grads


layer.defvjp(_layer_fwd, _layer_bwd)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def layer_backward(spec: LayerSpec, x, lengths, hs, cs, saved, dy, dh_n, dc_n, weights):
    """The fused backward kernel on one layer's tape: returns (dx, dh0, dc0, weight gradients)."""
    batch = x.shape[1]
    hidden = weights[1].shape[1]
    state = jax.ShapeDtypeStruct((spec.directions, batch, hidden), x.dtype)
    results = (jax.ShapeDtypeStruct(x.shape, x.dtype), state,
               state if has_cell_state(spec.cell) else _none(x.dtype),
               *(jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights))
    call = jax.ffi.ffi_call(_BACKWARD, results, vmap_method="expand_dims")
    dx, dh0, dc0, *grads = call(x, lengths, hs, cs, saved, dy, dh_n, dc_n, *weights, **_attrs(spec))
    return dx, dh0, dc0, tuple(grads)


@layer_backward.defjvp
def _layer_backward_jvp(spec, primals, tangents):
    raise NotImplementedError(_SECOND_DERIVATIVES)

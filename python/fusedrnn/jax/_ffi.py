"""The XLA FFI calls of fusedrnn.jax: one layer (all its directions) forward and backward as a
jax.custom_vjp whose backward is the fused backward kernel, with the forward's tape as residuals.

Buffers and their layout are described in csrc/bindings/jax_ffi_layer.h. Optional arrays (h0, c0,
lengths, c_n/dc0/cs for a cell without a cell state, rs without a projection) travel as empty (0,)
arrays. Under jax.vmap the calls
use vmap_method="expand_dims": an unmapped argument keeps a leading dimension of 1 and the handler
shares it across the mapped elements, so weights are never copied per element; with the weights
shared, the handler may run the elements as one call of all their rows (Fold in jax_ffi_layer.h).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

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
    """Registers the handlers with XLA (once per process): the CPU's, and the CUDA platform's from the
    CUDA module (fusedrnn._cuda) when it loads and has them. Without them, a call on a GPU fails with an
    error saying why and what to install. Raises ImportError, saying what to do, when this build of
    fusedrnn has no CPU handlers or when the running jaxlib is older than the one whose FFI headers they
    were built against (XLA would refuse them at call time)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        targets = getattr(_core, "jax_ffi_targets", None)
        if targets is None:
            raise ImportError("fusedrnn was built without its XLA FFI handlers (jaxlib was not installed at "
                              "build time): reinstall it with pip install 'fusedrnn[jax]'")
        problem = _too_new(_core.jax_ffi_built_with_jaxlib)
        if problem:
            raise ImportError(f"fusedrnn's XLA FFI handlers {problem}")
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        cuda_targets, why_not = cuda_handlers()
        if cuda_targets is None:
            _core.set_jax_ffi_unavailable_reason(unavailable_message(why_not))
            cuda_targets = _core.jax_ffi_unavailable_targets
        for name, capsule in cuda_targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


def export_disabled_checks() -> list:
    """What `jax.export.export(fn, disabled_checks=...)` takes to export a program that runs fusedrnn's
    layers. jax.export refuses custom calls it does not know to keep a stable interface across releases,
    and fusedrnn's handlers keep theirs within one fusedrnn version: run such an export where the same
    fusedrnn version is installed and `fusedrnn.jax` imported (which registers the handlers)."""
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(name) for name in (_FORWARD, _BACKWARD)]


def unavailable_message(why_not: str) -> str:
    """The error of a call on a GPU when the CUDA handlers cannot be used, `why_not` saying why."""
    from .._cuda_layer import HOW_TO_GET

    return (f"fusedrnn.jax: arrays on a GPU need the XLA FFI handlers of fusedrnn's CUDA module, and {why_not}. "
            f"To get them: {HOW_TO_GET}, with a jaxlib at least as new as the one they were built against "
            "(fusedrnn.cuda_info()); or run on the CPU")


def _too_new(built: str) -> str | None:
    """Why handlers built against jaxlib `built` cannot run on this one, or None when they can."""
    import jaxlib.version

    running = jaxlib.version.__version__
    if _version(running) < _version(built):
        return (f"were built against jaxlib {built}, newer than the installed jaxlib {running}, which would "
                f"refuse them: upgrade jaxlib to >= {built} or rebuild fusedrnn against this one")
    return None


def cuda_handlers() -> tuple[dict | None, str | None]:
    """(name -> handler, None) of the CUDA module's handlers, or (None, why they cannot be used)."""
    from .._cuda_layer import cuda_module

    try:
        module = cuda_module()
    except ImportError as err:
        return None, f"it cannot be used ({err})"
    targets = getattr(module, "jax_ffi_targets", None)
    if targets is None:
        return None, "it was built without them (no jaxlib at build time)"
    problem = _too_new(module.jax_ffi_built_with_jaxlib)
    if problem:
        return None, f"they {problem}"
    return dict(targets), None


class LayerSpec(NamedTuple):
    """The static options of a layer call (hashable: a custom_vjp non-differentiable argument)."""
    cell: str
    directions: int
    cell_clip: float | None   # checked by _checks.cell_clip
    # NaN or infinity raise at run time in: x (forward), dy (backward): the caller's, not those between
    # layers; h0, c0 (forward), dh_n, dc_n (backward).
    check_x: bool = True
    check_dy: bool = True
    check_states: bool = True


# Inside shard_map (with its varying-manual-axes check) an FFI call needs every operand to vary over
# the same mesh axes and declares that its results do too. An operand that is the same on every
# device (replicated weights) is cast to varying before the call, as JAX's own operations do, so
# its gradient is summed over the devices by that cast's transpose.

def _varying_axes(array) -> frozenset:
    aval = jax.typeof(array)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _cast_varying(array, axes: frozenset):
    missing = tuple(sorted(axes - _varying_axes(array)))
    if not missing:
        return array
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(array, missing, to="varying")
    return jax.lax.pvary(array, missing)


def vary_alike(*arrays):
    """The arrays, each varying over every mesh axis any of them varies over (pytrees allowed)."""
    leaves, tree = jax.tree.flatten(arrays)
    axes = frozenset().union(*(_varying_axes(a) for a in leaves))
    if not axes:
        return arrays
    return jax.tree.unflatten(tree, [_cast_varying(a, axes) for a in leaves])


def _result(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A result of an FFI call whose operands vary as `like` does."""
    axes = _varying_axes(like)
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(like)
    if hasattr(aval, "mat"):  # the axes are those of the manual mesh `like` lives on
        replicated = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated, manual_axis_type=aval.mat)
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def _none(dtype, like) -> jax.ShapeDtypeStruct:
    return _result((0,), dtype, like)


def _attrs(spec: LayerSpec, backward: bool) -> dict:
    return dict(cell=spec.cell, directions=np.int64(spec.directions),
                check_sequence=bool(spec.check_dy if backward else spec.check_x), check_states=bool(spec.check_states),
                cell_clip=np.float64(math.inf if spec.cell_clip is None else spec.cell_clip))


def sizes(spec: LayerSpec, weights) -> tuple[int, int]:
    """(H, R) of a layer's weights: its hidden size and the width of h, P when the weights end each
    direction with weight_hr (P, H) (an odd count per direction), else H."""
    per = len(weights) // spec.directions
    state = weights[1].shape[1]
    return (weights[per - 1].shape[1] if per % 2 else state), state


TAPE_ARRAYS = ("hs", "cs", "saved", "rs")


def tape_shapes(cell: str, steps, batch, hidden: int, proj: int) -> dict:
    """The shapes (leading, batch, width) of a direction's training tape arrays (the native
    tape_layout()), for the arrays the layer has. Only the leading size depends on the steps (steps, or
    steps + 1 for the state slots), so symbolic sizes (jax.export's shape polymorphism) get theirs
    from the rule at one step and one row."""
    if isinstance(steps, int) and isinstance(batch, int):
        return _core.tape_layout(cell, steps, batch, hidden, True, proj_size=proj)
    at_one = _core.tape_layout(cell, 1, 1, hidden, True, proj_size=proj)
    return {name: (steps + leading - 1, batch, width) for name, (leading, _, width) in at_one.items()}


def _forward_call(spec: LayerSpec, training: bool, x, h0, c0, lengths, *weights):
    steps, batch, _ = x.shape
    hidden, width = sizes(spec, weights)
    dirs, dtype = spec.directions, x.dtype
    has_c = has_cell_state(spec.cell)
    state = _result((dirs, batch, width), dtype, x)
    cell_state = _result((dirs, batch, hidden), dtype, x) if has_c else _none(dtype, x)
    tape = [_none(dtype, x)] * len(TAPE_ARRAYS)
    if training:
        shapes = tape_shapes(spec.cell, steps, batch, hidden, 0 if width == hidden else width)
        tape = [_result((dirs, *shapes[name]), dtype, x) if name in shapes else _none(dtype, x)
                for name in TAPE_ARRAYS]
    results = (_result((steps, batch, dirs * width), dtype, x), state, cell_state, *tape)
    call = jax.ffi.ffi_call(_FORWARD, results, vmap_method="expand_dims")
    return tuple(call(x, h0, c0, lengths, *weights, training=bool(training), **_attrs(spec, False)))


def _backward_call(spec: LayerSpec, _options, x, lengths, hs, cs, saved, rs, dy, dh_n, dc_n, *weights):
    batch = x.shape[1]
    hidden, width = sizes(spec, weights)
    results = (_result(x.shape, x.dtype, x), _result((spec.directions, batch, width), x.dtype, x),
               _result((spec.directions, batch, hidden), x.dtype, x) if has_cell_state(spec.cell)
               else _none(x.dtype, x),
               *(_result(w.shape, w.dtype, x) for w in weights))
    call = jax.ffi.ffi_call(_BACKWARD, results, vmap_method="expand_dims")
    return tuple(call(x, lengths, hs, cs, saved, rs, dy, dh_n, dc_n, *weights, **_attrs(spec, True)))


# Under jit the FFI calls are operations that jit partitions by the batch: where jit's shardings split
# the batch's rows across devices, each device runs the kernels on its own rows, the weights whole and
# the weight gradients summed over the devices, instead of XLA gathering every operand onto each
# device. Each array's batch is a dimension of its own (the tape's too: tape_layout() puts it in the
# middle), so the per-device calls' outputs side by side are one call's on the whole batch.
# custom_partitioning has no vmap rule, so it sits inside a custom_vmap whose rule is the plain FFI
# call's (vmap_method="expand_dims").

def _row_axis(array) -> int | None:
    """Where an operand or result keeps the batch's rows: (T or D, B, ...) arrays in dimension 1, the
    tape's (D, leading, B, width) in 2; weights, their gradients and empty placeholders have none."""
    return {3: 1, 4: 2}.get(len(array.shape))


def _batch_split(arg_shapes, in_axes):
    """The mesh axes the rows of the first batched operand are split over, or None where they are not
    split, or not evenly (each device must get whole rows of every batched operand)."""
    axis, first = next((a, shape) for shape, a in zip(arg_shapes, in_axes) if a is not None)
    spec = getattr(first.sharding, "spec", None)
    if spec is None or axis >= len(spec) or spec[axis] is None:
        return None
    split = spec[axis]
    devices = math.prod(first.sharding.mesh.shape[name] for name in (split if isinstance(split, tuple) else (split,)))
    if any(a is not None and shape.shape[a] % devices for shape, a in zip(arg_shapes, in_axes)):
        return None
    return split


@functools.lru_cache(maxsize=None)
def _partitioned(call):
    """call(spec, options, *arrays) -> tuple of arrays, as one operation that jit partitions by rows."""

    def run(spec, options, axes, *arrays):
        return call(spec, options, *arrays)

    def partition(spec, options, axes, mesh, arg_shapes, result_shapes):
        in_axes, summed_from, checks = axes
        split = _batch_split(arg_shapes, in_axes)

        def sharding(shape, axis):
            parts = [None] * len(shape.shape)
            if axis is not None:
                parts[axis] = split
            return NamedSharding(mesh, PartitionSpec(*parts))

        def per_device(*arrays):
            if split is not None:
                arrays = _fail_together(arrays, checks, split)
            outputs = call(spec, options, *arrays)
            if split is None or summed_from is None:
                return outputs
            return outputs[:summed_from] + tuple(jax.lax.psum(o, split) for o in outputs[summed_from:])

        return (mesh, per_device, tuple(sharding(s, _row_axis(s)) for s in result_shapes),
                tuple(sharding(s, a) for s, a in zip(arg_shapes, in_axes)))

    def sharding_rule(spec, options, axes, mesh, operand_types, result_types):
        in_axes, _, _ = axes
        factors = itertools.count()

        def dims(t, axis):
            return " ".join("b" if i == axis else f"d{next(factors)}" for i in range(len(t.shape)))

        return (", ".join(dims(t, a) for t, a in zip(operand_types, in_axes)) + " -> "
                + ", ".join(dims(t, _row_axis(t)) for t in result_types))

    partitioned = custom_partitioning(run, static_argnums=(0, 1, 2))
    partitioned.def_partition(partition=partition, sharding_rule=sharding_rule)
    return partitioned


class _Checks(NamedTuple):
    """What the handler of a call refuses at run time: NaN or infinity in the arrays at `finite`, a length
    outside [1, T] in the array at `lengths` (an empty placeholder where there are none); x is first."""
    finite: tuple
    lengths: int


def _fail_together(arrays, checks: _Checks, axes):
    """The arrays of one device's call where several devices run it side by side (mesh `axes`): where
    any device's call would fail a run-time check, every device's fails it, its own operand made to
    fail the same check. A device whose call failed alone would leave the others waiting at the next
    collective (the weight gradients' sum, the loss's mean), and XLA's CPU collectives end such a wait
    by aborting the process."""
    flags = [jnp.logical_not(jnp.all(jnp.isfinite(arrays[i]))) for i in checks.finite]
    lengths = arrays[checks.lengths]
    if lengths.shape != (0,):
        outside = (lengths < 1) | (lengths > arrays[0].shape[0])
        flags.append(jnp.any(outside))
        # A device failing for another's length names that length.
        offending = jax.lax.pmax(jnp.max(jnp.where(outside, lengths, jnp.iinfo(lengths.dtype).min)), axes)
    if not flags:
        return arrays
    local = jnp.stack(flags)
    anywhere = jax.lax.pmax(local.astype(jnp.int32), axes) > 0
    fail = anywhere & jnp.logical_not(local)
    out = list(arrays)
    for k, i in enumerate(checks.finite):
        out[i] = jnp.where(fail[k], jnp.asarray(jnp.nan, arrays[i].dtype), arrays[i])
    if lengths.shape != (0,):
        out[checks.lengths] = jnp.where(fail[-1], offending, lengths)
    return tuple(out)


def _by_rows(call, spec, options, arrays, checks: _Checks, summed_from: int | None = None):
    """call(spec, options, *arrays), the FFI call itself where nothing traces it or where it already
    runs per device (inside shard_map), and under jit the operation partitioned by rows; wherever
    devices run it side by side, they fail its run-time checks together (_fail_together). The results
    from `summed_from` on (the weight gradients) are summed over the devices that split the rows."""
    if not any(isinstance(a, jax.core.Tracer) for a in arrays):
        return call(spec, options, *arrays)
    varying = frozenset().union(*(_varying_axes(a) for a in arrays))
    if varying:
        return call(spec, options, *_fail_together(arrays, checks, tuple(sorted(varying))))
    in_axes = [_row_axis(a) for a in arrays]
    in_axes[checks.lengths] = None if arrays[checks.lengths].shape == (0,) else 0
    axes = (tuple(in_axes), summed_from, checks)
    partitioned = _partitioned(call)

    @custom_vmap
    def by_rows(*arrays):
        return partitioned(spec, options, axes, *arrays)

    @by_rows.def_vmap
    def _(axis_size, in_batched, *arrays):
        mapped = tuple(0 if b else None for b in in_batched)
        outputs = jax.vmap(functools.partial(call, spec, options), in_axes=mapped, axis_size=axis_size)(*arrays)
        return outputs, (True,) * len(outputs)

    return by_rows(*arrays)


def _forward(spec: LayerSpec, training: bool, x, h0, c0, lengths, weights):
    """y, h_n, c_n and the tape's arrays (empty unless training)."""
    checked = [(0, spec.check_x), (1, spec.check_states), (2, spec.check_states)]
    return _by_rows(_forward_call, spec, training, (x, h0, c0, lengths, *weights),
                    _Checks(tuple(i for i, on in checked if on), lengths=3))


def layer(spec: LayerSpec, x, h0, c0, lengths, weights):
    """One layer, every direction: x (T, B, I); h0 (D, B, R), c0 (D, B, H) or empty; lengths int (B,) or
    empty; weights a tuple of (weight_ih, weight_hh[, bias_ih, bias_hh][, weight_hr]) per direction,
    flattened. Returns y (T, B, D*R), h_n (D, B, R) and c_n (D, B, H), or empty for a cell without a
    cell state; R is H, or P with a projection (weight_hr (P, H))."""
    return _layer(spec, *vary_alike(x, h0, c0, lengths, weights))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer(spec: LayerSpec, x, h0, c0, lengths, weights):
    y, h_n, c_n, *_ = _forward(spec, False, x, h0, c0, lengths, weights)
    return y, h_n, c_n


_SECOND_DERIVATIVES = ("fusedrnn.jax: second derivatives (the gradient of a gradient) are not supported: the "
                       "fused backward kernel has no derivative of its own")


def _values(primals):
    """The values of a symbolic_zeros custom_vjp's primals (each leaf a CustomVJPPrimal: value, perturbed)."""
    primal = jax.custom_derivatives.CustomVJPPrimal
    return jax.tree.map(lambda p: p.value, tuple(primals), is_leaf=lambda p: isinstance(p, primal))


def _is_zero(cotangent) -> bool:
    return isinstance(cotangent, jax.custom_derivatives.SymbolicZero)


def _refuse_second_derivatives(cotangents) -> None:
    """Zero cotangents (symbolic) are all a derivative of `layer`'s own derivative may send the calls
    that make it up: what they computed does not count there (cut by stop_gradient, as adversarial
    examples and sharpness-aware steps do, or unused beside a value_and_grad's value). Others ask for
    a second derivative."""
    if not all(_is_zero(c) for c in jax.tree.leaves(cotangents, is_leaf=_is_zero)):
        raise NotImplementedError(_SECOND_DERIVATIVES)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _training_forward(spec, x, h0, c0, lengths, weights):
    """The forward that writes the tape, as the first half of `layer`'s derivative. Its own derivative
    is `layer`'s, where nothing asks for the tape's."""
    return _forward(spec, True, x, h0, c0, lengths, weights)


def _training_forward_fwd(spec, *primals):
    x, h0, c0, lengths, weights = _values(primals)
    y, h_n, c_n, *tape = _forward(spec, True, x, h0, c0, lengths, weights)
    return (y, h_n, c_n, *tape), (x, h0, c0, lengths, weights, tuple(tape))


def _training_forward_bwd(spec, residuals, cotangents):
    dy, dh_n, dc_n, *d_tape = cotangents
    _refuse_second_derivatives(d_tape)
    dense = tuple(jnp.zeros(c.aval.shape, c.aval.dtype) if _is_zero(c) else c for c in (dy, dh_n, dc_n))
    return _layer_bwd(spec, residuals, dense)


_training_forward.defvjp(_training_forward_fwd, _training_forward_bwd, symbolic_zeros=True)


def _layer_fwd(spec, x, h0, c0, lengths, weights):
    y, h_n, c_n, *tape = _training_forward(spec, x, h0, c0, lengths, weights)
    return (y, h_n, c_n), (x, h0, c0, lengths, weights, tuple(tape))


def _sharded_like(grad, primal):
    """grad with its primal's sharding in its type where the two differ: under a mesh with explicit
    axes (jax.set_mesh) a primal's type names its sharding, the FFI call's results name none, and a
    custom_vjp's gradients must have their primals' types."""
    want = getattr(jax.typeof(primal), "sharding", None)
    have = getattr(jax.typeof(grad), "sharding", None)
    explicit = getattr(jax.sharding, "AxisType", None)
    axis_types = getattr(getattr(want, "mesh", None), "axis_types", ())
    if explicit is None or explicit.Explicit not in axis_types or want.spec == getattr(have, "spec", None):
        return grad
    return jax.sharding.reshard(grad, want)


def _layer_bwd(spec, residuals, cotangents):
    x, h0, c0, lengths, weights, tape = residuals
    dy, dh_n, dc_n = cotangents
    dx, dh0, dc0, weight_grads = layer_backward(spec, x, lengths, tape, dy, dh_n, dc_n, weights)
    # An absent initial state (an empty array) gets an empty gradient.
    dh0 = dh0 if h0.size else jnp.zeros_like(h0)
    dc0 = dc0 if c0.size else jnp.zeros_like(c0)
    return (_sharded_like(dx, x), _sharded_like(dh0, h0), _sharded_like(dc0, c0), None,
            jax.tree.map(_sharded_like, weight_grads, weights))


_layer.defvjp(_layer_fwd, _layer_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def layer_backward(spec: LayerSpec, x, lengths, tape, dy, dh_n, dc_n, weights):
    """The fused backward kernel on one layer's tape (hs, cs, saved, rs as the training forward wrote
    them): returns (dx, dh0, dc0, weight gradients)."""
    x, lengths, tape, dy, dh_n, dc_n, weights = vary_alike(x, lengths, tape, dy, dh_n, dc_n, weights)
    at_dy = 2 + len(tape)
    checked = [(at_dy, spec.check_dy), (at_dy + 1, spec.check_states), (at_dy + 2, spec.check_states)]
    dx, dh0, dc0, *grads = _by_rows(_backward_call, spec, None, (x, lengths, *tape, dy, dh_n, dc_n, *weights),
                                    _Checks(tuple(i for i, on in checked if on), lengths=1), summed_from=3)
    return dx, dh0, dc0, tuple(grads)


def _layer_backward_fwd(spec, *primals):
    values = _values(primals)
    return layer_backward(spec, *values), jax.tree.map(lambda _: None, values)


def _layer_backward_bwd(spec, zeros, cotangents):
    _refuse_second_derivatives(cotangents)
    return zeros


layer_backward.defvjp(_layer_backward_fwd, _layer_backward_bwd, symbolic_zeros=True)

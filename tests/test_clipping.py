"""Gradient clipping against torch.nn.utils, the non-finite report, and the gradient-flow verdicts on
profiles whose answer is known."""

import math

import numpy as np
import pytest

from fusedrnn import gradients as G


def _grads(rng, dtype=np.float64, scale=1.0):
    return {"a": (scale * rng.standard_normal((4, 3))).astype(dtype),
            "b": (scale * rng.standard_normal(5)).astype(dtype)}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf], ids=["l2", "l1", "l3", "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "untouched"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_matches_torch(rng, norm_type, max_norm, dtype):
    torch = pytest.importorskip("torch")
    grads = _grads(rng, dtype)
    tparams = []
    for g in grads.values():
        t = torch.zeros(g.shape, dtype=torch.float64 if dtype == np.float64 else torch.float32, requires_grad=True)
        t.grad = torch.from_numpy(g.copy())
        tparams.append(t)
    before = {k: v.copy() for k, v in grads.items()}
    total = G.clip_grad_norm(grads, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    assert total == pytest.approx(want.item(), rel=rtol)
    for g, t in zip(grads.values(), tparams):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=rtol, atol=0)
    if max_norm > total:
        for k in grads:
            np.testing.assert_array_equal(grads[k], before[k])
    else:
        assert G.grad_norm(grads, norm_type) == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_by_hand():
    g = [np.array([3.0, 4.0]), np.array([[0.0]])]
    assert G.clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g[0], [3.0 / (5 + 1e-6), 4.0 / (5 + 1e-6)], rtol=1e-15)
    single = np.array([-2.0, 1.0])
    assert G.clip_grad_norm(single, 1.0, norm_type=math.inf) == 2.0
    np.testing.assert_allclose(single, [-1.0, 0.5], rtol=1e-6)


def test_nonfinite_gradients_are_reported_and_can_raise(rng):
    grads = _grads(rng)
    assert G.nonfinite_grads(grads) == []
    grads["b"][2] = np.nan
    assert G.nonfinite_grads(grads) == ["b"]
    assert G.nonfinite_grads(list(grads.values())) == [1]
    with pytest.raises(RuntimeError, match=r"non-finite gradients in \[1\]"):  # a generator is read once
        G.clip_grad_norm(iter(list(grads.values())), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"grads: the total 2.0-norm is nan; non-finite gradients in \['b'\]"):
        G.clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
    # Without the error torch's arithmetic runs on (NaN spreads); the returned norm says to skip.
    assert math.isnan(G.clip_grad_norm(grads, 1.0))
    assert np.all(np.isnan(grads["a"]))
    inf_grads = {"a": np.array([np.inf, 1.0])}
    assert G.clip_grad_norm(inf_grads, 1.0) == math.inf
    assert np.isnan(inf_grads["a"][0]) and inf_grads["a"][1] == 0.0  # as torch: multiplied by 0


def test_per_sample_norms_hold_squares_past_float64s_range():
    # Each sample is clipped as clip_grad_norm clips it alone, even where its squares overflow or
    # underflow float64; an infinite sample still spreads NaN.
    g = {"w": np.array([[1e160, 1e160], [3.0, 4.0], [3e-170, 4e-170], [0.0, 0.0]]),
         "b": np.array([[1e160], [0.0], [0.0], [0.0]])}
    sums, norms = G.sum_clipped_per_sample(g, 1.0)
    np.testing.assert_allclose(norms, [math.sqrt(3) * 1e160, 5.0, 5e-170, 0.0], rtol=1e-15)
    clipped = [{k: v[i].copy() for k, v in g.items()} for i in range(4)]
    for sample in clipped:
        G.clip_grad_norm(sample, 1.0)
    for k in g:
        np.testing.assert_allclose(sums[k], sum(sample[k] for sample in clipped), rtol=1e-12)
    assert sums["b"][0] > 0.5  # the overflowing sample is kept, at norm 1
    g["w"][1, 0] = np.inf
    with np.errstate(invalid="ignore"):
        sums, norms = G.sum_clipped_per_sample(g, 1.0)
    assert norms[1] == math.inf and np.isnan(sums["w"][0])  # inf * 0, as clip_grad_norm gives that sample


@pytest.mark.filterwarnings("ignore:the matrix subclass is not the recommended way:PendingDeprecationWarning")
def test_matrix_gradients_are_clipped_as_plain_arrays(rng):
    """np.matrix gradients (whose ** is a matrix power) give the norms and clipping of plain arrays."""
    g = rng.standard_normal((2, 3))
    for norm_type in (1.0, 2.0, 3.0, math.inf):
        assert G.grad_norm([np.asmatrix(g)], norm_type) == G.grad_norm([g], norm_type)
        plain, matrix = g.copy(), np.asmatrix(g.copy())
        G.clip_grad_norm([plain], 0.5, norm_type)
        G.clip_grad_norm([matrix], 0.5, norm_type)
        np.testing.assert_array_equal(np.asarray(matrix), plain)
    for samples in (1, 2):
        sums, norms = G.sum_clipped_per_sample({"w": np.asmatrix(g[:samples])}, 1.0)
        want_sums, want_norms = G.sum_clipped_per_sample({"w": g[:samples]}, 1.0)
        assert sums["w"].shape == (3,) and type(norms) is np.ndarray
        np.testing.assert_array_equal(sums["w"], want_sums["w"])
        np.testing.assert_array_equal(norms, want_norms)
    masked = np.ma.masked_array(g, mask=g > 0)
    with pytest.raises(TypeError, match=r"^grads\[0\]: a masked array"):
        G.clip_grad_norm([masked], 1.0)


def test_clip_grad_value(rng):
    torch = pytest.importorskip("torch")
    grads = _grads(rng, scale=3.0)
    t = torch.tensor(grads["a"].copy())
    G.clip_grad_value(grads, 0.7)
    assert np.abs(grads["a"]).max() == 0.7 and np.abs(grads["b"]).max() <= 0.7
    np.testing.assert_array_equal(grads["a"], torch.clamp(t, -0.7, 0.7).numpy())


def test_clipping_errors():
    with pytest.raises(ValueError, match="max_norm: expected a number >= 0"):
        G.clip_grad_norm([np.zeros(2)], -1.0)
    with pytest.raises(ValueError, match="norm_type: expected a positive number or inf"):
        G.clip_grad_norm([np.zeros(2)], 1.0, norm_type=0)
    with pytest.raises(ValueError, match="clip_value: expected a number >= 0"):
        G.clip_grad_value([np.zeros(2)], float("nan"))
    with pytest.raises(TypeError, match=r"grads\[0\]: expected a float array, got list \(NumPy or CUDA float"):
        G.clip_grad_norm([[1.0, 2.0]], 1.0)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"grads\[0\]: expected a float array, got torch.Tensor of torch.float32 "
                                        r"\(.*a CPU torch tensor as t.numpy\(\)\)"):
        G.clip_grad_value([torch.zeros(2)], 1.0)
    grad = torch.full((2,), 4.0)
    G.clip_grad_value([grad.numpy()], 1.0)  # the tensor's memory, changed in place
    assert grad.tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match="grads: expected an array, a list of arrays or a mapping"):
        G.clip_grad_norm(3.0, 1.0)


def test_functions_that_only_read_take_cpu_torch_tensors_and_jax_arrays():
    """grad_norm, nonfinite_grads and sum_clipped_per_sample change nothing, so they read what NumPy
    reads, as every other reading argument does: torch.func's per-sample gradients as they come."""
    torch = pytest.importorskip("torch")
    values = np.arange(12.0).reshape(4, 3)
    per_sample = {"w": torch.tensor(values), "b": torch.ones(4, dtype=torch.float64)}
    sums, norms = G.sum_clipped_per_sample(per_sample, 5.0)
    want_sums, want_norms = G.sum_clipped_per_sample({k: v.numpy() for k, v in per_sample.items()}, 5.0)
    np.testing.assert_array_equal(norms, want_norms)
    for key in per_sample:
        assert isinstance(sums[key], np.ndarray)
        np.testing.assert_array_equal(sums[key], want_sums[key])
    assert G.grad_norm([torch.tensor(values)]) == G.grad_norm([values]) == pytest.approx(np.sqrt((values**2).sum()))
    assert G.nonfinite_grads({"a": torch.ones(2), "b": torch.tensor([1.0, math.nan])}) == ["b"]
    with pytest.raises(TypeError, match=r"^grads\[0\]: cannot be read as an array: .*requires grad"):
        G.grad_norm([torch.ones(2, requires_grad=True)])
    with pytest.raises(TypeError, match=r"^grads\[0\]: expected a float array, got ndarray of int32"):
        G.nonfinite_grads([torch.ones(2, dtype=torch.int32)])
    jnp = pytest.importorskip("jax.numpy")
    assert G.grad_norm({"w": jnp.asarray(values)}) == pytest.approx(G.grad_norm([values]))


def test_norms_of_finite_gradients_past_float64s_squares_stay_finite():
    """The squares of 1e200 overflow float64 and those of 1e-200 vanish; the norms of such gradients are
    finite and nonzero, and a total past float64's range is told apart from a NaN."""
    for values in ([1e200], [3e200, -4e200], [1e-200, 2e-200]):
        largest = max(abs(v) for v in values)
        for p in (2.0, 3.0):
            want = largest * sum((abs(v) / largest) ** p for v in values) ** (1 / p)
            assert G.grad_norm([np.array(values)], p) == pytest.approx(want, rel=1e-12)
    grad = np.array([1e200])
    assert G.clip_grad_norm([grad], 1.0, error_if_nonfinite=True) == 1e200 and grad[0] == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match=r"every gradient is finite, but their norm exceeds float64's range"):
        G.clip_grad_norm([np.full(4, 1.7e308)], 1.0, error_if_nonfinite=True)


def test_clipping_a_read_only_gradient_raises_before_changing_any():
    big, read_only = np.full(3, 10.0), np.ones(3)
    read_only.flags.writeable = False
    for clip in (lambda g: G.clip_grad_norm(g, 1.0), lambda g: G.clip_grad_value(g, 0.5)):
        with pytest.raises(ValueError, match=r"^grads\['b'\]: array is read-only"):
            clip({"a": big, "b": read_only})
        np.testing.assert_array_equal(big, 10.0)


# ---- gradient-flow verdicts on synthetic profiles ---------------------------------------------------


@pytest.mark.parametrize("factor, verdict", [(0.7, "vanishing"), (1.0, "healthy"), (0.98, "healthy"),
                                             (1.3, "exploding")])
def test_gradient_flow_reads_the_decay_rate(rng, factor, verdict):
    steps = 40
    back = factor ** np.arange(steps) * np.exp(0.05 * rng.standard_normal(steps))  # noisy geometric decay
    flow = G.diagnose_gradient_flow(back[::-1])  # time order: the gradient enters at the last step
    assert flow.verdict == verdict
    assert flow.factor_per_step == pytest.approx(factor, rel=0.01)
    assert flow.span == pytest.approx(flow.factor_per_step ** (steps - 1))
    assert G.diagnose_gradient_flow(back, reverse=True).factor_per_step == flow.factor_per_step


def test_gradient_flow_zeros_mean_vanishing_and_errors():
    flow = G.diagnose_gradient_flow([0.0, 0.0, 1e-2, 0.1, 1.0])
    assert flow.verdict == "vanishing" and flow.factor_per_step == pytest.approx(0.1)
    with pytest.raises(ValueError, match="norms: the gradient where it enters is zero"):
        G.diagnose_gradient_flow([1.0, 0.0])
    with pytest.raises(ValueError, match="norms: expected finite norms"):
        G.diagnose_gradient_flow([np.inf, 1.0])
    with pytest.raises(ValueError, match="norms: expected a 1-D profile of at least 2 steps"):
        G.diagnose_gradient_flow([1.0])
    with pytest.raises(ValueError, match="vanishing_below, exploding_above"):
        G.diagnose_gradient_flow([1.0, 1.0], vanishing_below=2.0)
    with pytest.raises(TypeError, match="vanishing_below: expected a number, got str"):
        G.diagnose_gradient_flow([1.0, 1.0], vanishing_below="0.001")
    # A growth past float range over the profile is exploding, not an OverflowError.
    flow = G.diagnose_gradient_flow(np.logspace(300, -300, 1000))
    assert flow.verdict == "exploding" and flow.span == math.inf


def test_plot_gradient_flow_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "flow.png"
    fig = G.plot_gradient_flow({"a": 0.5 ** np.arange(10.0)[::-1], "b": np.ones(10)}, path)
    assert path.stat().st_size > 1000
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["a", "b"]

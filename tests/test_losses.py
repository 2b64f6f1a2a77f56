"""Losses over sequences: values against torch's, gradients by finite differences, masks, errors."""

import numpy as np
import pytest

from fusedrnn import losses
from fusedrnn.sequences import length_mask
from helpers import numerical_gradient

# Rounding in the two loss evaluations: ~1e-16 * |loss| (<= 100 here) / eps (1e-6) = 1e-8.
FD_TOL = dict(rtol=1e-7, atol=2e-8)


def _fd_check(loss_fn, arr, analytic):
    indices = list(np.ndindex(arr.shape))
    numeric = numerical_gradient(lambda: loss_fn()[0], arr, indices)
    np.testing.assert_allclose(analytic[tuple(np.array(indices).T)], numeric, **FD_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_mse_value_and_finite_differences(rng, reduction, masked):
    pred, target = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2))
    mask = length_mask([5, 2, 4]) if masked else None
    loss, grad = losses.mse_loss(pred, target, mask, reduction)
    keep = np.ones((5, 3), bool) if mask is None else mask
    sq = ((pred - target) ** 2)[keep]
    assert loss == pytest.approx(sq.sum() if reduction == "sum" else sq.mean(), rel=1e-14)
    _fd_check(lambda: losses.mse_loss(pred, target, mask, reduction), pred, grad)
    if masked:
        assert not np.any(grad[~mask])   # padded steps get no gradient


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_cross_entropy_value_and_finite_differences(rng, reduction, masked):
    logits = 3 * rng.standard_normal((4, 3, 5))
    targets = rng.integers(0, 5, (4, 3))
    mask = length_mask([4, 1, 3]) if masked else None
    if masked:
        targets[~mask] = -100   # whatever padding holds is not looked at
    loss, grad = losses.cross_entropy(logits, targets, mask, reduction)
    keep = np.ones((4, 3), bool) if mask is None else mask
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, np.where(keep, targets, 0)[..., None], -1)[..., 0][keep]
    assert loss == pytest.approx(nll.sum() if reduction == "sum" else nll.mean(), rel=1e-13)
    _fd_check(lambda: losses.cross_entropy(logits, targets, mask, reduction), logits, grad)
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-15)  # softmax minus one-hot sums to zero


def test_losses_match_torch(rng):
    torch = pytest.importorskip("torch")
    logits = rng.standard_normal((6, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (6, 4))
    loss, grad = losses.cross_entropy(logits, targets)
    z = torch.from_numpy(logits).requires_grad_()
    want = torch.nn.functional.cross_entropy(z.reshape(-1, 7), torch.from_numpy(targets).reshape(-1))
    want.backward()
    assert grad.dtype == np.float32
    assert loss == pytest.approx(want.item(), rel=1e-6)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-5, atol=1e-8)

    pred, target = rng.standard_normal((6, 4, 2)).astype(np.float32), rng.standard_normal((6, 4, 2)).astype(np.float32)
    loss, grad = losses.mse_loss(pred, target)
    p = torch.from_numpy(pred).requires_grad_()
    want = torch.nn.functional.mse_loss(p, torch.from_numpy(target))
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-6)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_cross_entropy_is_stable_for_huge_logits():
    loss, grad = losses.cross_entropy(np.array([[1000.0, 0.0, -1000.0]]), np.array([0]))
    assert loss == 0.0 and np.all(np.isfinite(grad))
    loss, _ = losses.cross_entropy(np.array([[1000.0, 0.0]]), np.array([1]))
    assert loss == pytest.approx(1000.0)


def test_loss_errors_name_the_argument():
    p = np.zeros((3, 2, 1))
    with pytest.raises(ValueError, match=r"target: expected the prediction's shape \(3, 2, 1\)"):
        losses.mse_loss(p, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="prediction: contains NaN"):
        losses.mse_loss(np.full((2,), np.nan), np.zeros(2))
    with pytest.raises(TypeError, match="target: expected a float array"):
        losses.mse_loss(p, np.zeros((3, 2, 1), int))
    with pytest.raises(ValueError, match="mask: expected a shape that leads"):
        losses.mse_loss(p, p, np.ones((2, 3), bool))
    with pytest.raises(TypeError, match="mask: expected a boolean array"):
        losses.mse_loss(p, p, np.ones((3, 2)))
    with pytest.raises(ValueError, match="mask: masks out every element"):
        losses.mse_loss(p, p, np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        losses.mse_loss(p, p, reduction="none")
    with pytest.raises(ValueError, match=r"targets: class index 3 at \(1, 0\) is outside \[0, 3\)"):
        losses.cross_entropy(np.zeros((2, 2, 3)), np.array([[0, 1], [3, 2]]))
    with pytest.raises(TypeError, match="targets: expected integer class indices"):
        losses.cross_entropy(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2,\)"):
        losses.cross_entropy(np.zeros((2, 3)), np.zeros(3, int))


def test_masked_positions_never_reach_the_loss_even_when_they_overflow():
    with np.errstate(over="ignore", invalid="ignore"):
        loss, grad = losses.mse_loss(np.array([1.0, 1e308]), np.array([0.0, -1e308]), mask=np.array([True, False]))
        assert loss == 1.0 and np.array_equal(grad, [2.0, 0.0])
        logits = np.array([[5.0, 1.0], [-1e308, 1e308]])
        loss, grad = losses.cross_entropy(logits, np.array([0, 0]), mask=np.array([True, False]))
    want_loss, want_grad = losses.cross_entropy(logits[:1], np.array([0]))
    assert loss == want_loss and np.array_equal(grad[0], want_grad[0]) and not grad[1].any()


def test_empty_inputs_name_themselves_not_a_mask():
    with pytest.raises(ValueError, match=r"^prediction: no elements"):
        losses.mse_loss(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"^logits: no elements"):
        losses.cross_entropy(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(ValueError, match=r"^prediction: no elements"):  # a mask that keeps every (empty) row
        losses.mse_loss(np.zeros((3, 0)), np.zeros((3, 0)), mask=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"^mask: expected an array of at least one dimension"):
        losses.cross_entropy(np.zeros(4), 2, mask=True)

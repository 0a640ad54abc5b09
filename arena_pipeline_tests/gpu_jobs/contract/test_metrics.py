"""gpu_jobs.contract.metrics: log loss for hard and soft targets, with hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from gpu_jobs.contract import accuracy, clip_probs, log_loss, per_class_loss, row_losses


def test_hard_targets_hand_computed():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    y = np.array([0, 1, 2])
    expected = -(math.log(0.5) + math.log(0.8) + math.log(0.6)) / 3  # 0.4757...
    assert log_loss(y, p) == pytest.approx(expected, abs=1e-15)
    assert log_loss(y, p) == pytest.approx(0.47570545188, abs=1e-11)
    np.testing.assert_allclose(row_losses(y, p), [math.log(2), -math.log(0.8), -math.log(0.6)], rtol=0, atol=1e-15)


def test_uniform_prediction_is_ln3_for_any_target():
    p = np.full((4, 3), 1 / 3)
    assert log_loss([0, 1, 2, 2], p) == pytest.approx(math.log(3), abs=1e-15)
    assert log_loss(np.array([[0.2, 0.3, 0.5]] * 4), p) == pytest.approx(math.log(3), abs=1e-15)


def test_soft_targets_hand_computed_and_one_hot_equals_hard():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    t = np.array([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    expected = (-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)) - (0.25 * math.log(0.8) + 0.75 * math.log(0.1))) / 2
    assert log_loss(t, p) == pytest.approx(expected, abs=1e-15)
    y = np.array([2, 0])
    assert log_loss(np.eye(3)[y], p) == pytest.approx(log_loss(y, p), abs=1e-15)


def test_equals_sklearn_log_loss():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1.0, 1.0, 0.5], size=200)
    y = rng.integers(0, 3, size=200)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p, labels=[0, 1, 2]), abs=1e-12)
    # soft targets: sklearn's weighted log loss on each row repeated once per class, weighted by its target
    t = rng.dirichlet([2.0, 2.0, 1.0], size=200)
    expanded = sk_log_loss(np.repeat([[0, 1, 2]], 200, axis=0).ravel(), np.repeat(p, 3, axis=0),
                           sample_weight=t.ravel(), labels=[0, 1, 2])
    assert log_loss(t, p) == pytest.approx(expanded, abs=1e-12)


def test_clipping_at_1e15_then_renormalised():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    q = clip_probs(p)
    assert q[0, 1] == pytest.approx(1e-15 / (1 + 2e-15), rel=1e-12) and np.allclose(q.sum(1), 1, atol=1e-15)
    y = np.array([1, 2])
    expected = (-math.log(1e-15 / (1 + 2e-15)) - math.log(1e-15 / (1 + 1e-15))) / 2
    assert log_loss(y, p) == pytest.approx(expected, abs=1e-12)
    assert log_loss([0], [[7.0, 7.0, 7.0]]) == pytest.approx(math.log(3), abs=1e-15)  # unnormalised rows


def test_per_class_loss_and_accuracy():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    y = np.array([0, 1, 0])
    loss = per_class_loss(y, p)
    assert loss["a"] == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2, abs=1e-15)
    assert loss["b"] == pytest.approx(-math.log(0.8), abs=1e-15) and math.isnan(loss["tie"])
    assert accuracy(y, p) == pytest.approx(1.0)
    assert accuracy(np.array([1, 1, 2]), p) == pytest.approx(1 / 3)


def test_errors_and_empty_input():
    with pytest.raises(ValueError, match="shape"):
        log_loss(np.array([0]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="0 \\(A wins\\)"):
        log_loss(np.array([3]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="row 1 is not finite"):
        log_loss(np.array([0, 1]), np.array([[1, 1, 1], [np.nan, 1, 1]]))
    assert math.isnan(log_loss(np.zeros(0, int), np.zeros((0, 3))))

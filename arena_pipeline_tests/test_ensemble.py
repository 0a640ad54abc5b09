"""Blending math with numbers: weights, temperature, cross-validation."""

import numpy as np
import pytest

from arena_pipeline import ensemble as ens


def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.dirichlet([2, 2, 1], size=n)
    y = np.array([rng.choice(3, p=p) for p in truth])
    noise = rng.dirichlet([1, 1, 1], size=n)
    return truth, y, noise


def test_uniform_loss_is_ln3():
    y = np.array([0, 1, 2, 0])
    assert ens.log_loss3(y, np.full((4, 3), 1 / 3)) == pytest.approx(np.log(3))


def test_powell_prefers_the_good_member_and_beats_members_in_sample():
    truth, y, noise = _data()
    members = {"good": truth, "noise": noise}
    weights = ens.fit_weights(members, y)
    assert weights["good"] > 0.8 and all(w >= 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0)
    blended = ens.blend(members, weights)
    assert ens.log_loss3(y, blended) <= min(ens.log_loss3(y, p) for p in members.values()) + 1e-12


def test_optuna_path():
    truth, y, noise = _data(800)
    weights = ens.fit_weights({"good": truth, "noise": noise}, y, method="optuna", n_trials=60)
    assert weights["good"] > weights["noise"]


def test_temperature_direction():
    truth, y, _ = _data()
    over = ens.apply_temperature(truth, 0.4)  # sharpened = over-confident
    under = ens.apply_temperature(truth, 3.0)  # softened = under-confident
    assert ens.fit_temperature(over, y) > 1.5
    assert ens.fit_temperature(under, y) < 0.7
    assert ens.fit_temperature(truth, y) == pytest.approx(1.0, abs=0.15)


def test_cross_validated_loss_is_not_better_than_in_sample():
    truth, y, noise = _data(600, seed=3)
    members = {"good": truth, "noise": noise, "mix": (truth + noise) / 2}
    report = ens.cross_validated_blend(members, y, n_splits=5)
    assert report["cv_log_loss"] >= report["in_sample_log_loss"] - 1e-9
    assert report["oof_probs"].shape == (600, 3)
    np.testing.assert_allclose(report["oof_probs"].sum(axis=1), 1.0)


def test_tie_bias_and_tta():
    truth, y, _ = _data()
    no_ties = ens.apply_tie_bias(truth, -2.0)
    assert ens.fit_tie_bias(no_ties, y) > 1.5
    swapped_back = truth[:, [0, 1, 2]]
    np.testing.assert_allclose(ens.tta_average(truth, swapped_back), truth)
    assert ens.per_class_loss(y, truth)["tie"] > ens.per_class_loss(y, truth)["a"] - 1  # finite, defined

"""Calibration maps: exact swap consistency, EM recovers a shifted tie rate, guards hold, Davidson fit, shrinkage."""

import numpy as np
import pytest

from arena_pipeline import calibration as cal
from arena_pipeline import blending as ens

SWAP = [1, 0, 2]


def davidson_data(n, a=1.5, c=-0.8, tie_rate=None, seed=0):
    """Labels drawn from a known Davidson model; the 'model' probabilities are the true ones."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 1.2, n)
    p = cal.DavidsonTieModel(a=(1.0,), g=(0.0,), c=c).apply(np.column_stack([np.exp(s), np.exp(-s), np.ones(n)]))
    y = np.array([rng.choice(3, p=row) for row in p])
    return p, y


def test_every_map_keeps_swap_consistency_exact():
    p, y = davidson_data(400)
    swapped = p[:, SWAP]
    model = cal.DavidsonTieModel(a=(1.3,), g=(0.7,), c=-0.2, d=-0.4)
    np.testing.assert_allclose(model.apply(swapped), model.apply(p)[:, SWAP], atol=1e-12)
    np.testing.assert_allclose(cal.shrink(swapped, 0.3, 0.2), cal.shrink(p, 0.3, 0.2)[:, SWAP], atol=1e-12)
    q, _ = cal.em_tie_prior(p, 0.25)
    q_swapped, _ = cal.em_tie_prior(swapped, 0.25)
    np.testing.assert_allclose(q_swapped, q[:, SWAP], atol=1e-9)


def test_em_recovers_a_shifted_tie_rate_from_calibrated_probabilities():
    p, y = davidson_data(6000, seed=1)
    train_tie = float(p[:, 2].mean())
    # a new population: the same pairs, but only a third of the ties kept (label shift)
    rng = np.random.default_rng(2)
    keep = (y != 2) | (rng.random(len(y)) < 1 / 3)
    true_tie = float(np.mean(y[keep] == 2))
    q, report = cal.em_tie_prior(p[keep], train_tie, strength=0.0)
    assert report["adapted"] and report["converged"]
    assert abs(report["tie_prior_estimated"] - true_tie) < 0.03, (report, true_tie)
    assert ens.log_loss3(y[keep], q) < ens.log_loss3(y[keep], p[keep]) - 0.01
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    # on the population it was trained on, EM leaves the rate (almost) where it is
    _, same = cal.em_tie_prior(p, train_tie, strength=0.0)
    assert abs(same["tie_prior_estimated"] - train_tie) < 0.01


def test_em_guards_small_files_bounds_and_bad_input():
    p, _ = davidson_data(50)
    q, report = cal.em_tie_prior(p, 0.2)
    assert not report["adapted"] and "too few" in report["reason"]
    np.testing.assert_allclose(q, ens.clip_probs(p))
    # every pair an obvious tie: the estimate stops at the upper bound instead of running to 1
    ties = np.tile([0.02, 0.02, 0.96], (500, 1))
    _, report = cal.em_tie_prior(ties, 0.2, strength=0.0)
    assert report["tie_prior_estimated"] == cal.EM_BOUNDS[1] and report["reason"] == "at a bound"
    with pytest.raises(ValueError, match="train_tie"):
        cal.em_tie_prior(ties, 0.0)


def test_davidson_fit_recovers_scale_and_never_loses_in_sample():
    p_true, y = davidson_data(5000, a=1.0, c=-0.8, seed=3)
    # an over-confident model: log-probabilities doubled
    over = ens.apply_temperature(p_true, 0.5)
    fitted = cal.DavidsonTieModel.fit(over, y)
    assert 0.4 < fitted.a[0] < 0.6, fitted  # undoes the doubling of the A/B score
    assert ens.log_loss3(y, fitted.apply(over)) < ens.log_loss3(y, over) - 0.02
    assert abs(ens.log_loss3(y, fitted.apply(over)) - ens.log_loss3(y, p_true)) < 0.01
    identity = cal.DavidsonTieModel()
    np.testing.assert_allclose(identity.apply(p_true), p_true, atol=1e-9)


def test_choose_shrinkage_picks_the_weight_the_held_out_sources_want():
    p, y = davidson_data(3000, seed=4)
    over = ens.apply_temperature(p, 0.3)  # far too sure: shrinking pays
    weight, curve = cal.choose_shrinkage({"s1": (y[:1500], over[:1500]), "s2": (y[1500:], over[1500:])}, 0.25)
    assert weight > 0 and curve[weight] < curve[0.0]
    weight, _ = cal.choose_shrinkage({"s1": (y, p)}, float(p[:, 2].mean()))
    assert weight <= 0.05  # already calibrated: (almost) no shrinkage
    with pytest.raises(ValueError, match="weight"):
        cal.shrink(p, 1.5, 0.2)


def test_davidson_stacker_weights_members_and_keeps_swap_consistency():
    p_true, y = davidson_data(4000, seed=5)
    rng = np.random.default_rng(6)
    noise = cal.DavidsonTieModel(a=(1.0,), g=(0.0,), c=-0.5).apply(np.exp(rng.normal(0, 1, (4000, 3))))
    stacker = cal.DavidsonTieModel.fit([p_true, noise], y)
    assert stacker.a[0] > 0.8 and abs(stacker.a[1]) < 0.1, stacker  # the informative member carries the score
    assert ens.log_loss3(y, stacker.apply([p_true, noise])) < ens.log_loss3(y, (p_true + noise) / 2)
    swapped = stacker.apply([p_true[:, SWAP], noise[:, SWAP]])
    np.testing.assert_allclose(swapped, stacker.apply([p_true, noise])[:, SWAP], atol=1e-12)
    with pytest.raises(ValueError, match="2 input"):
        stacker.apply(p_true)

"""Numbers for the blending math on synthetic members with a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from arena_pipeline import blending as ens

LN3 = float(np.log(3))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def make_members(n: int = 2000, seed: int = 0):
    """truth: the distribution the labels are drawn from; noise: unrelated random probabilities."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.2, size=(n, 3))
    truth = _softmax(logits)
    y = (rng.random(n)[:, None] > np.cumsum(truth, axis=1)[:, :2]).sum(axis=1)  # one draw per row
    members = {
        "truth": truth,
        "noise": _softmax(rng.normal(0, 1.5, size=(n, 3))),
        "blurred": _softmax(logits + rng.normal(0, 1.0, size=(n, 3))),  # a weaker but informative member
    }
    return members, y, logits


# ------------------------------------------------------------------------------------------ metrics


def test_log_loss_of_uniform_is_ln3_and_metrics():
    y = np.array([0, 1, 2, 2, 0])
    assert ens.log_loss3(y, np.full((5, 3), 1 / 3)) == pytest.approx(LN3, abs=1e-12)
    # unnormalised rows are renormalised; zeros are clipped at 1e-15
    assert ens.log_loss3(y, np.full((5, 3), 7.0)) == pytest.approx(LN3, abs=1e-12)
    p = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0.5, 0.5, 0]])
    assert ens.log_loss3(y, p) == pytest.approx((-np.log(1e-15) + np.log(2)) / 5, rel=1e-6)
    assert ens.accuracy(y, p) == pytest.approx(4 / 5)
    pcl = ens.per_class_loss(y, np.tile([0.5, 0.25, 0.25], (5, 1)))
    assert pcl == pytest.approx({"a": np.log(2), "b": np.log(4), "tie": np.log(4)})
    # soft targets: cross-entropy; one-hot targets give the same number as indices
    assert ens.log_loss3(np.eye(3)[y], p + 0.1) == pytest.approx(ens.log_loss3(y, p + 0.1))
    assert np.isnan(ens.per_class_loss(np.array([0, 1]), np.full((2, 3), 1 / 3))["tie"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        ens.log_loss3(np.array([0]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="labels"):
        ens.log_loss3(np.array([3]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="rows"):
        ens.fit_weights({"a": np.ones((3, 3)), "b": np.ones((4, 3))}, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="method"):
        ens.fit_weights({"a": np.ones((3, 3)) / 3, "b": np.ones((3, 3)) / 3}, np.array([0, 1, 2]), method="adam")
    with pytest.raises(ValueError, match="positive weight"):
        ens.blend({"a": np.ones((3, 3)) / 3}, {"a": 0.0})


# ----------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("method", ["powell", "optuna"])
def test_fit_weights_prefers_the_truth(method):
    members, y, _ = make_members()
    w = ens.fit_weights(members, y, method=method, n_trials=60)
    assert set(w) == set(members)
    assert all(v >= 0 for v in w.values())
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert w["truth"] > 0.75
    assert w["noise"] < 0.1
    fitted = ens.log_loss3(y, ens.blend(members, w))
    best = min(ens.log_loss3(y, p) for p in members.values())
    assert fitted <= best + 1e-12  # never worse than the best member in sample
    assert fitted < ens.log_loss3(y, ens.blend(members, {n: 1.0 for n in members}))


def test_fit_weights_single_member_and_deterministic():
    members, y, _ = make_members(300)
    assert ens.fit_weights({"truth": members["truth"]}, y) == {"truth": 1.0}
    assert ens.fit_weights(members, y) == ens.fit_weights(members, y)
    a = ens.fit_weights(members, y, method="optuna", n_trials=20, seed=3)
    assert a == ens.fit_weights(members, y, method="optuna", n_trials=20, seed=3)


def test_blend_is_weighted_average():
    p1 = np.tile([0.6, 0.3, 0.1], (4, 1))
    p2 = np.tile([0.2, 0.2, 0.6], (4, 1))
    out = ens.blend({"x": p1, "y": p2}, {"x": 3.0, "y": 1.0})  # weights are normalised
    np.testing.assert_allclose(out, np.tile([0.5, 0.275, 0.225], (4, 1)))
    np.testing.assert_allclose(ens.blend({"x": p1, "y": p2}, {"x": 1.0}), p1)  # missing weight = 0


# ------------------------------------------------------------------------------------- calibration


def test_temperature_over_and_under_confident():
    _, y, logits = make_members(3000, seed=1)
    over = _softmax(logits * 2.0)
    under = _softmax(logits * 0.5)
    t_over = ens.fit_temperature(over, y)
    t_under = ens.fit_temperature(under, y)
    assert t_over == pytest.approx(2.0, rel=0.12)
    assert t_under == pytest.approx(0.5, rel=0.12)
    assert ens.log_loss3(y, ens.apply_temperature(over, t_over)) < ens.log_loss3(y, over) - 0.05
    np.testing.assert_allclose(ens.apply_temperature(over, 1.0), over, atol=1e-12)
    truth = _softmax(logits)
    assert ens.fit_temperature(truth, y) == pytest.approx(1.0, abs=0.1)
    # a floor of 1 (the profile's min_temperature): softening still fitted, sharpening refused
    assert ens.fit_temperature(over, y, lower=1.0) == pytest.approx(t_over, rel=1e-3)
    assert ens.fit_temperature(under, y, lower=1.0) == pytest.approx(1.0, abs=1e-3)
    cv = ens.cross_validated_blend({"m": under}, y, min_temperature=1.0)
    assert cv["temperature"] == pytest.approx(1.0, abs=1e-3)


def test_tie_bias_recovers_a_shifted_tie_prior():
    _, y, logits = make_members(3000, seed=2)
    shifted = logits.copy()
    shifted[:, 2] -= 1.0  # the member under-predicts ties by e^-1
    b = ens.fit_tie_bias(_softmax(shifted), y)
    assert b == pytest.approx(1.0, abs=0.15)
    np.testing.assert_allclose(ens.apply_tie_bias(_softmax(shifted), 1.0), _softmax(logits), atol=1e-12)


def test_tta_average():
    p = np.array([[0.7, 0.2, 0.1]])
    p_swapped = np.array([[0.1, 0.7, 0.2]])[:, ens.SWAP]  # model saw B first; permute back
    np.testing.assert_allclose(ens.tta_average(p, p_swapped), [[0.7, 0.15, 0.15]])


# ---------------------------------------------------------------------------------- cross-validation


def test_cross_validated_blend_is_honest():
    gaps = []
    for seed in range(4):
        members, y, _ = make_members(600, seed=10 + seed)
        # a few near-duplicate weak members give the optimiser something to over-fit
        rng = np.random.default_rng(seed)
        for k in range(3):
            members[f"weak{k}"] = _softmax(np.log(members["blurred"]) + rng.normal(0, 0.7, size=(600, 3)))
        cv = ens.cross_validated_blend(members, y, n_splits=5, seed=seed)
        assert cv["oof_probs"].shape == (600, 3)
        np.testing.assert_allclose(cv["oof_probs"].sum(1), 1, atol=1e-9)
        assert cv["cv_log_loss"] == pytest.approx(ens.log_loss3(y, cv["oof_probs"]))
        assert cv["n_splits"] == 5 and len(cv["cv_fold_log_loss"]) == 5
        assert cv["in_sample_log_loss"] <= min(cv["member_log_loss"].values()) + 1e-9
        assert cv["best_member"] == "truth"
        assert cv["weights"]["truth"] > 0.6
        assert cv["uniform_log_loss"] > cv["in_sample_log_loss"]
        gaps.append(cv["cv_log_loss"] - cv["in_sample_log_loss"])
    assert np.mean(gaps) > 0  # held-out loss is above the in-sample loss on average
    assert max(gaps) < 0.05  # ...but not by much with 600 rows and 6 weights


def test_cross_validated_blend_with_groups_and_soft_targets():
    members, y, _ = make_members(400, seed=5)
    groups = np.arange(400) // 4  # four rows per prompt
    cv = ens.cross_validated_blend(members, y, n_splits=4, groups=groups, method="optuna", n_trials=20)
    assert cv["n_splits"] == 4 and cv["weights"]["truth"] > 0.6
    soft = ens.cross_validated_blend(members, members["truth"], n_splits=3, temperature=False)
    # with the truth's own probabilities as targets, the truth member is the best cross-entropy fit
    assert soft["best_member"] == "truth" and soft["temperature"] == 1.0


# ------------------------------------------------------- Dirichlet members (checks of the first version)


def _dirichlet_data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.dirichlet([2, 2, 1], size=n)
    y = (rng.random(n)[:, None] > np.cumsum(truth, axis=1)[:, :2]).sum(axis=1)
    return truth, y, rng.dirichlet([1, 1, 1], size=n)


def test_temperature_direction_on_dirichlet_truth():
    truth, y, _ = _dirichlet_data()
    assert ens.fit_temperature(ens.apply_temperature(truth, 0.4), y) > 1.5  # sharpened = over-confident
    assert ens.fit_temperature(ens.apply_temperature(truth, 3.0), y) < 0.7  # softened = under-confident
    assert ens.fit_temperature(truth, y) == pytest.approx(1.0, abs=0.15)


def test_tie_bias_on_dirichlet_truth_and_identity_tta():
    truth, y, noise = _dirichlet_data()
    assert ens.fit_tie_bias(ens.apply_tie_bias(truth, -2.0), y) > 1.5
    np.testing.assert_allclose(ens.tta_average(truth, truth), truth)
    w = ens.fit_weights({"good": truth, "noise": noise}, y)
    assert w["good"] > 0.8


@pytest.mark.parametrize("seed", range(6))
def test_powell_weights_reach_the_constrained_optimum(seed):
    """The blend's log loss is convex in the weights, so the constrained optimum (SLSQP on the simplex) is the
    answer; unbounded raw weights let Powell stall at a corner on some CPUs (seeds 0, 1, 4 on a Xeon)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=600)
    members = {k: 0.5 * np.eye(3)[y] + 0.5 * rng.dirichlet(np.ones(3) * 2, size=600) for k in ("a", "b")}
    members["noise"] = rng.dirichlet(np.ones(3) * 0.5, size=600)
    stack = np.stack(list(members.values()))
    blend_loss = lambda w: ens.log_loss(y, np.tensordot(w, stack, axes=1))  # noqa: E731
    best = minimize(blend_loss, np.full(3, 1 / 3), method="SLSQP", bounds=[(0, 1)] * 3,
                    constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-12})
    weights = ens.fit_weights(members, y)
    assert blend_loss(np.array(list(weights.values()))) <= best.fun + 1e-5
    np.testing.assert_allclose(list(weights.values()), best.x, atol=0.01)


def test_fit_weights_drops_negligible_members_to_exactly_zero():
    """A useless member gets weight 0, not Powell's ~1e-16 (seed 1 here, without the pruning): every weight > 0
    makes that member run downstream (pseudo labels, bundle)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=600)
    a = 0.5 * np.eye(3)[y] + 0.5 * rng.dirichlet(np.ones(3) * 2, size=600)
    b = 0.5 * np.eye(3)[y] + 0.5 * rng.dirichlet(np.ones(3) * 2, size=600)
    noise = rng.dirichlet(np.ones(3) * 0.5, size=600)
    weights = ens.fit_weights({"a": a, "b": b, "noise": noise}, y)
    assert weights["noise"] == 0.0 and weights["a"] > 0.5 and weights["b"] > 0.1
    assert abs(sum(weights.values()) - 1) < 1e-12

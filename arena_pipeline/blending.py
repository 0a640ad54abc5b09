"""Blending math on (n, 3) probability arrays, columns [A wins, B wins, tie].

Pure numpy / scipy / optuna, no Dagster: the ensemble and pseudo-label assets, the bundle and the CLI call
these functions.

- ``log_loss3`` / ``per_class_loss`` / ``accuracy``: the competition metric and its parts (imported from
  ``gpu_jobs.contract.metrics``, the one implementation both packages use).
- ``fit_weights``: non-negative weights, summing to 1, minimising the log loss of the weighted average of
  the members' probabilities. ``method="powell"`` is the reference recipe (scipy Powell on the weights,
  each bounded to [0, 1], normalised); ``method="optuna"`` a TPE search over the same simplex. Either way the
  result is never worse in sample than the uniform blend or any single member (they are candidates too).
- ``fit_temperature`` / ``apply_temperature``: one temperature on the log-probabilities (T > 1 softens).
- ``fit_tie_bias`` / ``apply_tie_bias``: an additive log-odds bias on the tie class (a tie prior shift).
- ``cross_validated_blend``: weights (+ temperature) fitted on K-1 parts and scored on the held-out part,
  the honest estimate of what the fitted blend is worth next to its in-sample figure.
- ``tta_average``: average a prediction with the permuted-back prediction on the A/B-swapped input.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.optimize import minimize, minimize_scalar

MIN_WEIGHT = 1e-4  # a fitted weight below this is set to 0 (its member then never runs downstream)
from gpu_jobs.contract.metrics import EPS, accuracy, clip_probs, log_loss, per_class_loss  # noqa: F401
from gpu_jobs.contract.metrics import check_probs as _probs
from gpu_jobs.contract.metrics import target_probs as _targets
from gpu_jobs.contract.swap import SWAP_PERMUTATION as SWAP  # noqa: F401  (ens.SWAP)

_TEMPERATURE_BOUNDS = (0.05, 20.0)
_TIE_BIAS_BOUNDS = (-8.0, 8.0)


# ------------------------------------------------------------------------------------------- checks


def _normalise(p: np.ndarray) -> np.ndarray:
    return clip_probs(p)


def _members(member_probs: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = list(member_probs)
    if not names:
        raise ValueError("no ensemble members given")
    arrays = [_probs(member_probs[n], f"member '{n}'") for n in names]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise ValueError(f"members disagree on the number of rows: { {n: a.shape[0] for n, a in zip(names, arrays)} }")
    return names, np.stack(arrays)  # (m, n, 3)


# ------------------------------------------------------------------------------------------ metrics


log_loss3 = log_loss  # the competition metric (gpu_jobs.contract.metrics), under its historical name


# --------------------------------------------------------------------------------------- blending


def blend(member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted average of the members' probabilities; weights are normalised over the members given
    (a member missing from ``weights`` has weight 0)."""
    names, stack = _members(member_probs)
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite and non-negative, got {dict(zip(names, w.tolist()))}")
    if w.sum() <= 0:
        raise ValueError(f"no member has a positive weight (members {names}, weights {dict(weights)})")
    return _normalise(np.tensordot(w / w.sum(), stack, axes=1))


def _simplex(raw: np.ndarray) -> np.ndarray:
    w = np.abs(np.asarray(raw, dtype=np.float64))
    s = w.sum()
    return w / s if s > 0 else np.full(len(w), 1.0 / len(w))


def fit_weights(
    member_probs: Mapping[str, np.ndarray],
    y,
    method: str = "powell",
    seed: int = 42,
    n_trials: int = 200,
) -> dict[str, float]:
    """Non-negative weights summing to 1 that minimise the log loss of the weighted average.

    ``powell``: scipy ``minimize(method="Powell")`` from the uniform start on the raw weights, mapped to the
    simplex by normalisation (the reference recipe), each raw weight bounded to [0, 1]: the loss does not change
    along the raw weights' scale, and unbounded they ran off along it (to ~1e14) until Powell stalled at a
    corner — on an AVX-512 Xeon it returned one of two equally good members alone on 3 of 6 seeds.
    ``optuna``: TPE over [0, 1] per member (normalised), seeded, with the uniform blend as the first trial.
    The uniform blend and each single member are candidates too, so the result is never worse in sample than any of them. Weights
    below ``MIN_WEIGHT`` are set to exactly 0 when that changes the in-sample loss by at most 1e-6.
    """
    names, stack = _members(member_probs)
    t = _targets(y, stack.shape[1])
    m = len(names)
    if m == 1:
        return {names[0]: 1.0}
    stack = stack / np.clip(stack.sum(axis=2, keepdims=True), EPS, None)

    def loss(raw: np.ndarray) -> float:
        # the blend of normalised members sums to 1: clipped, not renormalised (as fitted so far)
        return log_loss(t, np.tensordot(_simplex(raw), stack, axes=1), renormalise=False)

    candidates = [np.full(m, 1.0 / m)] + [np.eye(m)[i] for i in range(m)]
    if method == "powell":
        res = minimize(loss, np.full(m, 1.0 / m), method="Powell", bounds=[(0.0, 1.0)] * m,
                       options={"xtol": 1e-6, "ftol": 1e-10, "maxiter": 200 * m, "maxfev": 4000 * m})
        candidates.append(_simplex(res.x))
    elif method == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({f"w{i}": 1.0 for i in range(m)})
        study.optimize(lambda t: loss(np.array([t.suggest_float(f"w{i}", 0.0, 1.0) for i in range(m)])),
                       n_trials=n_trials)
        candidates.append(_simplex(np.array([study.best_params[f"w{i}"] for i in range(m)])))
    else:
        raise ValueError(f"unknown ensemble method {method!r}: use 'powell' or 'optuna'")
    best = min(candidates, key=loss)
    # Powell leaves weights like 1e-12 where a member is useless; every weight > 0 makes pseudo labelling and the
    # bundle run that member (for `full`: an 8B model over every fold of the pool and the test file), so drop
    # them when that costs nothing measurable in sample
    pruned = _simplex(np.where(best < MIN_WEIGHT, 0.0, best))
    if best.max() >= MIN_WEIGHT and loss(pruned) <= loss(best) + 1e-6:
        best = pruned
    return {n: float(w) for n, w in zip(names, best)}


# ----------------------------------------------------------------------------------- calibration


def apply_temperature(p, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident probabilities, T < 1 sharpens them."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = np.log(_normalise(_probs(p))) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(p, y, lower: float = _TEMPERATURE_BOUNDS[0]) -> float:
    """The temperature in [max(lower, 0.05), 20] minimising log loss (bounded scalar search on log T);
    ``lower`` = 1 allows softening only."""
    p = _probs(p)
    yi = _targets(y, len(p))
    lo, hi = np.log(max(lower, _TEMPERATURE_BOUNDS[0])), np.log(_TEMPERATURE_BOUNDS[1])
    res = minimize_scalar(lambda lt: log_loss3(yi, apply_temperature(p, np.exp(lt))), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    # the identity is a candidate: never return something worse than T = 1
    return t if log_loss3(yi, apply_temperature(p, t)) <= log_loss3(yi, p) else 1.0


def apply_tie_bias(p, bias: float) -> np.ndarray:
    """Add ``bias`` to the tie log-odds (shifts the tie prior; A/B symmetric)."""
    logits = np.log(_normalise(_probs(p)))
    logits[:, 2] += float(bias)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_tie_bias(p, y) -> float:
    """The additive tie log-odds bias in [-8, 8] minimising log loss."""
    p = _probs(p)
    yi = _targets(y, len(p))
    res = minimize_scalar(lambda b: log_loss3(yi, apply_tie_bias(p, b)), bounds=_TIE_BIAS_BOUNDS,
                          method="bounded", options={"xatol": 1e-6})
    b = float(res.x)
    return b if log_loss3(yi, apply_tie_bias(p, b)) <= log_loss3(yi, p) else 0.0


def tta_average(p, p_swapped_permuted_back) -> np.ndarray:
    """Mean of a prediction and the prediction on the A/B-swapped input, already permuted back [1, 0, 2]."""
    a = _probs(p)
    b = _probs(p_swapped_permuted_back, "swapped probabilities")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return _normalise((a + b) / 2.0)


# ------------------------------------------------------------------------------ cross-validation


def _splits(y: np.ndarray, n_splits: int, seed: int, groups) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n = len(y)
    if n < 2 * 2:
        raise ValueError(f"cross_validated_blend needs at least 4 rows, got {n}")
    k = max(2, min(n_splits, n // 2))
    counts = np.bincount(y, minlength=3)
    stratify = counts[counts > 0].min() >= k
    if groups is not None:
        groups = np.asarray(groups)
        k = min(k, len(np.unique(groups)))
        if k < 2:
            raise ValueError("cross_validated_blend: fewer than 2 distinct groups")
        if stratify:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        else:
            splitter = GroupKFold(n_splits=k)
        return list(splitter.split(np.zeros(n), y, groups))
    if stratify:
        return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), y))
    return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n)))


def cross_validated_blend(
    member_probs: Mapping[str, np.ndarray],
    y,
    n_splits: int = 5,
    seed: int = 42,
    method: str = "powell",
    temperature: bool = True,
    groups=None,
    n_trials: int = 200,
    min_temperature: float = _TEMPERATURE_BOUNDS[0],
) -> dict:
    """Fit weights (+ temperature, at least ``min_temperature``) on K-1 parts of the rows, score on the held-out part.

    Splits are stratified on the label (grouped when ``groups``, e.g. the prompt, is given). Returns:
    ``weights`` / ``temperature`` (fitted on all rows), ``in_sample_log_loss`` (that blend on all rows),
    ``cv_log_loss`` (the out-of-fold blended probabilities ``oof_probs`` scored), ``cv_fold_log_loss``,
    ``fold_weights``, ``uniform_log_loss``, ``member_log_loss``, ``best_member``, ``n_splits``.
    """
    names, stack = _members(member_probs)
    tgt = _targets(y, stack.shape[1])
    yi = tgt.argmax(axis=1)  # class index, for stratified splits
    members = {n: stack[i] for i, n in enumerate(names)}

    def fit_on(idx: np.ndarray) -> tuple[dict[str, float], float]:
        part = {n: members[n][idx] for n in names}
        w = fit_weights(part, tgt[idx], method=method, seed=seed, n_trials=n_trials)
        t = fit_temperature(blend(part, w), tgt[idx], lower=min_temperature) if temperature else 1.0
        return w, t

    oof = np.zeros((len(yi), 3))
    fold_losses, fold_weights = [], []
    for train_idx, test_idx in _splits(yi, n_splits, seed, groups):
        w, t = fit_on(train_idx)
        oof[test_idx] = apply_temperature(blend({n: members[n][test_idx] for n in names}, w), t)
        fold_losses.append(log_loss3(tgt[test_idx], oof[test_idx]))
        fold_weights.append(w)
    weights, temp = fit_on(np.arange(len(yi)))
    in_sample = apply_temperature(blend(members, weights), temp)
    member_loss = {n: log_loss3(tgt, members[n]) for n in names}
    return {
        "weights": weights,
        "temperature": temp,
        "in_sample_log_loss": log_loss3(tgt, in_sample),
        "cv_log_loss": log_loss3(tgt, oof),
        "cv_fold_log_loss": fold_losses,
        "fold_weights": fold_weights,
        "uniform_log_loss": log_loss3(tgt, blend(members, {n: 1.0 for n in names})),
        "member_log_loss": member_loss,
        "best_member": min(member_loss, key=member_loss.get),
        "oof_probs": oof,
        "n_splits": len(fold_losses),
    }

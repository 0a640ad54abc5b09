"""Blending math on (n, 3) probability arrays [A wins, B wins, tie]: losses, weights, temperature.

Pure numpy/scipy/optuna, no Dagster: the ensemble and pseudo-label assets and the bundle call it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.model_selection import StratifiedKFold

EPS = 1e-15
SWAP = [1, 0, 2]


def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def log_loss3(y: np.ndarray, p: np.ndarray) -> float:
    """Multiclass log loss (the competition metric); probabilities clipped at 1e-15 and renormalised."""
    p = _normalise(p)
    return float(-np.mean(np.log(p[np.arange(len(y)), np.asarray(y, dtype=int)])))


def per_class_loss(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Log loss over the rows of each true class (nan where a class has no rows)."""
    p = _normalise(p)
    y = np.asarray(y, dtype=int)
    out = {}
    for k, name in enumerate(("a", "b", "tie")):
        mask = y == k
        out[name] = float(-np.mean(np.log(p[mask, k]))) if mask.any() else float("nan")
    return out


def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.asarray(p).argmax(axis=1) == np.asarray(y)))


def blend(member_probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted average of member probabilities (weights normalised over the members given)."""
    names = [n for n in member_probs if weights.get(n, 0.0) > 0]
    if not names:
        raise ValueError("no member has a positive weight")
    total = sum(weights[n] for n in names)
    return sum(weights[n] / total * np.asarray(member_probs[n], dtype=np.float64) for n in names)


def _weights_from(raw: np.ndarray) -> np.ndarray:
    w = np.abs(raw)
    s = w.sum()
    return w / s if s > 0 else np.full(len(w), 1.0 / len(w))


def fit_weights(member_probs: dict[str, np.ndarray], y: np.ndarray, method: str = "powell", seed: int = 42,
                n_trials: int = 200) -> dict[str, float]:
    """Non-negative weights (sum 1) minimising the log loss of the weighted average (recipe: scipy Powell)."""
    names = list(member_probs)
    stack = np.stack([np.asarray(member_probs[n], dtype=np.float64) for n in names])  # (m, n, 3)
    if len(names) == 1:
        return {names[0]: 1.0}

    def loss(raw: np.ndarray) -> float:
        return log_loss3(y, np.tensordot(_weights_from(raw), stack, axes=1))

    if method == "powell":
        start = np.full(len(names), 1.0 / len(names))
        result = minimize(loss, start, method="Powell", options={"xtol": 1e-4, "ftol": 1e-7, "maxiter": 20000})
        best = _weights_from(result.x)
    elif method == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({n: 1.0 for n in names})
        study.optimize(lambda t: loss(np.array([t.suggest_float(n, 0.0, 1.0) for n in names])), n_trials=n_trials)
        best = _weights_from(np.array([study.best_params[n] for n in names]))
    else:
        raise ValueError(f"unknown ensemble method '{method}': use 'powell' or 'optuna'")
    # never return something worse than the uniform blend or any single member
    candidates = [best, np.full(len(names), 1.0 / len(names)), *np.eye(len(names))]
    best = min(candidates, key=loss)
    return {n: float(w) for n, w in zip(names, best)}


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log p / T): T > 1 softens over-confident predictions, T < 1 sharpens."""
    logits = np.log(_normalise(p)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    result = minimize_scalar(lambda t: log_loss3(y, apply_temperature(p, t)), bounds=(0.05, 20.0), method="bounded")
    return float(result.x)


def apply_tie_bias(p: np.ndarray, bias: float) -> np.ndarray:
    """Add ``bias`` to the tie log-odds (a tie prior that differs by source)."""
    logits = np.log(_normalise(p))
    logits[:, 2] += bias
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_tie_bias(p: np.ndarray, y: np.ndarray) -> float:
    result = minimize_scalar(lambda b: log_loss3(y, apply_tie_bias(p, b)), bounds=(-5.0, 5.0), method="bounded")
    return float(result.x)


def tta_average(p: np.ndarray, p_swapped_back: np.ndarray) -> np.ndarray:
    """Average a prediction with its A/B-swapped prediction (already permuted back to [A, B, tie])."""
    return (np.asarray(p) + np.asarray(p_swapped_back)) / 2.0


def cross_validated_blend(member_probs: dict[str, np.ndarray], y: np.ndarray, n_splits: int = 5, seed: int = 42,
                          method: str = "powell") -> dict:
    """Weights + temperature fitted on K-1 parts of the rows, scored on the held-out part (the honest figure)."""
    y = np.asarray(y, dtype=int)
    names = list(member_probs)
    counts = np.bincount(y, minlength=3)
    splits = min(n_splits, int(counts[counts > 0].min())) if len(y) else 0
    oof = np.zeros((len(y), 3))
    if splits < 2:
        raise ValueError(f"cross_validated_blend needs at least 2 rows of every present class, got counts {counts}")
    for train, test in StratifiedKFold(splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        part = {n: np.asarray(member_probs[n])[train] for n in names}
        weights = fit_weights(part, y[train], method=method, seed=seed)
        temperature = fit_temperature(blend(part, weights), y[train])
        oof[test] = apply_temperature(blend({n: np.asarray(member_probs[n])[test] for n in names}, weights), temperature)
    weights = fit_weights(member_probs, y, method=method, seed=seed)
    in_sample = blend(member_probs, weights)
    in_sample = apply_temperature(in_sample, fit_temperature(in_sample, y))
    return {
        "cv_log_loss": log_loss3(y, oof),
        "in_sample_log_loss": log_loss3(y, in_sample),
        "uniform_log_loss": log_loss3(y, blend(member_probs, {n: 1.0 for n in names})),
        "member_log_loss": {n: log_loss3(y, member_probs[n]) for n in names},
        "oof_probs": oof,
        "n_splits": splits,
    }

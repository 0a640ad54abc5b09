"""The competition metric: multiclass log loss on (n, 3) probabilities [A wins, B wins, tie].

One family of functions for hard targets (class indices 0/1/2) and soft targets ((n, 3) probabilities,
the cross-entropy with probability targets). Probabilities are clipped to [1e-15, 1] and renormalised,
everywhere the project scores a prediction (the competition's rule). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from gpu_jobs.contract.schema import CLASS_NAMES

EPS = 1e-15


def check_probs(p, name: str = "probabilities") -> np.ndarray:
    """``p`` as a float64 (n, 3) array; a ValueError names the first row that is not finite."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3) [A wins, B wins, tie], got {p.shape}")
    if not np.all(np.isfinite(p)):
        bad = int(np.argwhere(~np.isfinite(p))[0, 0])
        raise ValueError(f"{name}: row {bad} is not finite ({p[bad].tolist()})")
    return p


def check_labels(y, n: int | None = None) -> np.ndarray:
    """Class indices 0/1/2 as ints; (n, 3) one-hot / probability targets become their argmax."""
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-d array of 0/1/2 (A, B, tie), got shape {y.shape}")
    if n is not None and len(y) != n:
        raise ValueError(f"labels have {len(y)} rows but the probabilities have {n}")
    yi = y.astype(int)
    if len(yi) and (np.any(yi != y) or yi.min() < 0 or yi.max() > 2):
        raise ValueError("labels must be 0 (A wins), 1 (B wins) or 2 (tie)")
    return yi


def target_probs(y, n: int) -> np.ndarray:
    """(n, 3) target probabilities from class indices or from (n, 3) soft / one-hot targets."""
    y = np.asarray(y)
    if y.ndim == 2:
        t = y.astype(np.float64)
        if t.shape != (n, 3) or not np.all(np.isfinite(t)) or (t < 0).any():
            raise ValueError(f"targets must be (n={n}, 3) non-negative probabilities, got shape {t.shape}")
        return t
    return np.eye(3)[check_labels(y, n)]


def clip_probs(p, renormalise: bool = True) -> np.ndarray:
    """Probabilities clipped to [EPS, 1] and renormalised per row (what every score below sees)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0)
    return p / p.sum(axis=1, keepdims=True) if renormalise else p


def row_losses(y, p, renormalise: bool = True) -> np.ndarray:
    """Per-row negative log-likelihood: ``-log p[y]`` for class indices, ``-sum(t * log p)`` for (n, 3)
    targets ``t``. ``renormalise=False`` skips the renormalisation after clipping, for rows that already sum
    to 1 (the ensemble's weight search, whose optimiser path must not see the extra rounding)."""
    p = clip_probs(check_probs(p), renormalise)
    y = np.asarray(y)
    if y.ndim == 2:
        t = np.asarray(y, dtype=np.float64)
        if t.shape != p.shape:
            raise ValueError(f"targets shape {t.shape} differs from probabilities shape {p.shape}")
        return -np.sum(t * np.log(p), axis=1)
    yi = check_labels(y, len(p))
    return -np.log(p[np.arange(len(yi)), yi])


def log_loss(y, p, renormalise: bool = True) -> float:
    """Multiclass log loss (mean of ``row_losses``); nan for no rows.

    ``y`` is a vector of class indices (0 A, 1 B, 2 tie) or an (n, 3) array of target probabilities."""
    losses = row_losses(y, p, renormalise)
    return float(losses.mean()) if len(losses) else float("nan")


def per_class_loss(y, p) -> dict[str, float]:
    """Log loss over the rows of each true class: {"a", "b", "tie"} (nan where a class has no rows)."""
    p = check_probs(p)
    yi = check_labels(y, len(p))
    losses = row_losses(yi, p)
    return {name: float(losses[yi == k].mean()) if (yi == k).any() else float("nan")
            for k, name in enumerate(CLASS_NAMES)}


def accuracy(y, p) -> float:
    """Share of rows whose most probable class is the true one (argmax of soft targets); nan for no rows."""
    p = check_probs(p)
    yi = check_labels(y, len(p))
    return float(np.mean(p.argmax(axis=1) == yi)) if len(yi) else float("nan")

"""Rows whose labelling could not record a tie (the ``ties_possible`` column).

Some human sets have no tie label by construction: LLMBar's authors kept only pairs with one correct answer
and removed MT-Bench's ties; other annotation forms have no tie button. Such a row says which answer won
*given that the pair was not a tie*; it says nothing about how often people call a tie. Read as an ordinary
one-hot label it teaches the model that pairs like it are never ties, and the bundle's tie rate drops on every
file that looks like that source (the demo's training mix: 22% ties on arena-bench, 0% on LLMBar's 751 rows).

So a row with ``ties_possible = False``
- trains on the conditional likelihood P(y | not tie) = p_y / (p_A + p_B) (the tie logit gets no gradient
  from it): ``conditional_targets`` for learners that take (soft) targets and weights, a masked tie logit for
  the torch loss;
- is scored with its tie probability removed (``without_tie``: P(tie) = 0, A : B kept), because its label
  cannot be a tie.

A missing column or an empty cell means ties were possible (the default for every file).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TIES_COLUMN = "ties_possible"

_TRUE = {"true", "1", "1.0", "yes", "t", "y", ""}
_FALSE = {"false", "0", "0.0", "no", "f", "n"}


def ties_possible(frame: pd.DataFrame, source: str = "<frame>") -> np.ndarray:
    """Boolean (n,) array: could each row's label have been a tie? (missing column / empty cell: True).

    Accepts booleans, 0/1 and the words true/false/yes/no; anything else is a ValueError naming the source,
    the row id and the column.
    """
    n = len(frame)
    if TIES_COLUMN not in frame.columns:
        return np.ones(n, dtype=bool)
    out = np.ones(n, dtype=bool)
    for i, value in enumerate(frame[TIES_COLUMN].tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if isinstance(value, (bool, np.bool_)):
            out[i] = bool(value)
            continue
        text = str(value).strip().lower()
        if text in _TRUE:
            continue
        if text in _FALSE:
            out[i] = False
            continue
        row_id = frame["id"].iloc[i] if "id" in frame.columns else i
        raise ValueError(f"{source}: row id {row_id!r}: column '{TIES_COLUMN}' must be true or false, got {value!r}")
    return out


def without_tie(probs, mask) -> np.ndarray:
    """``probs`` (n, 3) with P(tie) set to 0 on the rows where ``mask`` is True and A : B renormalised."""
    p = np.array(probs, dtype=np.float64, copy=True)
    mask = np.asarray(mask, dtype=bool)
    if mask.any():
        ab = p[mask, :2]
        total = ab.sum(axis=1, keepdims=True)
        p[mask, :2] = np.where(total > 0, ab / np.where(total > 0, total, 1.0), 0.5)  # no A/B mass: even
        p[mask, 2] = 0.0
    return p


def conditional_targets(targets, p_tie, mask) -> tuple[np.ndarray, np.ndarray]:
    """One EM step toward the conditional likelihood for learners that take soft targets and row weights.

    For a tie-free row with model tie probability tau, the conditional log likelihood log p_y - log(1 - tau)
    has, at the current model, the gradient of (1 - tau)^-1 [(1 - tau) log p_y + tau log p_tie]: the row's
    A/B target with a tau share moved to tie, weighted 1 / (1 - tau). Refitting with these targets and
    re-reading tau from the refitted model converges to the conditional maximum likelihood (an EM / MM
    iteration: the removed ties are imputed where the model expects them). Returns (targets, weight factor);
    rows outside ``mask`` are unchanged (factor 1).
    """
    t = np.array(targets, dtype=np.float64, copy=True)
    mask = np.asarray(mask, dtype=bool)
    factor = np.ones(len(t))
    if mask.any():
        tau = np.clip(np.asarray(p_tie, dtype=np.float64)[mask], 0.0, 0.95)
        ab = t[mask, :2]
        ab = ab / np.clip(ab.sum(axis=1, keepdims=True), 1e-12, None)
        t[mask, :2] = ab * (1.0 - tau)[:, None]
        t[mask, 2] = tau
        factor[mask] = 1.0 / (1.0 - tau)
    return t, factor

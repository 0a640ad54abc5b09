"""Calibration after the blend that keeps A/B swap consistency exact: how much tie, how sure.

Every map here treats A and B alike, so swapping the two answers still permutes the probabilities:

- ``em_tie_prior``: re-estimate the tie rate of the file being scored from the model's own probabilities
  (the EM prior correction of Saerens, Latinne & Decaestecker 2002), with the A/B split of the rest kept
  even, so only the tie prior moves. Guards: a pseudo-count pull toward the training tie rate, bounds on
  the estimate, and no adaptation on a file too small to estimate a rate from.
- ``DavidsonTieModel``: the blend re-read as an antisymmetric preference score s = (log pA - log pB) / 2 and a
  tie logit from swap-symmetric inputs (the members' own tie logit, |s|), the Davidson form
  P(A) ∝ e^{a s}, P(B) ∝ e^{-a s}, P(tie) ∝ e^{c + g t + d |s|}; fitted by maximum likelihood.
- ``shrink`` / ``choose_shrinkage``: mix the probabilities with an A/B-even prior; the weight is chosen on
  held-out *sources* (leave-one-source-out), not on the set the blend was fitted on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

from arena_pipeline import ensemble as ens

EM_STRENGTH = 200.0  # pseudo-rows at the training tie rate (MAP pull against runaway estimates)
EM_BOUNDS = (0.01, 0.5)  # a tie rate outside this band is not believed
EM_MIN_ROWS = 100  # below this a file says too little about its own tie rate
SHRINK_GRID = tuple(np.round(np.arange(0.0, 0.61, 0.05), 2))


def even_prior(tie: float) -> np.ndarray:
    """[A, B, tie] with the non-tie mass split evenly (the only priors that keep swap consistency)."""
    return np.array([(1 - tie) / 2, (1 - tie) / 2, tie])


def with_tie_prior(p, train_tie: float, tie: float) -> np.ndarray:
    """Bayes' rule for a new prior: p(y|x) · π_new(y) / π_train(y), renormalised (A/B-even priors)."""
    p = ens.clip_probs(p)
    q = p * (even_prior(tie) / even_prior(train_tie))
    return q / q.sum(axis=1, keepdims=True)


def em_tie_prior(p, train_tie: float, strength: float = EM_STRENGTH, bounds: tuple[float, float] = EM_BOUNDS,
                 min_rows: int = EM_MIN_ROWS, max_iter: int = 20000, tol: float = 1e-9) -> tuple[np.ndarray, dict]:
    """The file's tie rate by EM on the model's probabilities, and the probabilities under it.

    ``train_tie`` is the tie rate the model's probabilities assume (its mean predicted tie on data like its
    training data). Each step: posteriors under the current tie prior, then the new prior = (sum of tie
    posteriors + ``strength`` · train_tie) / (rows + strength), kept inside ``bounds``. Returns the adapted
    probabilities and a report (``tie_prior_train``, ``tie_prior_estimated``, ``iterations``, ``converged``,
    ``adapted``, ``reason``).
    """
    p = ens.clip_probs(p)
    if not 0 < train_tie < 1:
        raise ValueError(f"train_tie must be in (0, 1), got {train_tie!r}")
    report = {"tie_prior_train": float(train_tie), "tie_prior_estimated": float(train_tie), "rows": len(p),
              "iterations": 0, "converged": True, "adapted": False, "reason": ""}
    if len(p) < min_rows:
        report["reason"] = f"{len(p)} rows < {min_rows}: too few to estimate a tie rate; probabilities unchanged"
        return p, report
    tie = float(train_tie)
    for it in range(1, max_iter + 1):
        new = (with_tie_prior(p, train_tie, tie)[:, 2].sum() + strength * train_tie) / (len(p) + strength)
        new = float(np.clip(new, *bounds))
        done = abs(new - tie) < tol
        tie = new
        if done:
            break
    report.update(tie_prior_estimated=tie, iterations=it, converged=bool(done), adapted=True,
                  reason="at a bound" if tie in bounds else "")
    return with_tie_prior(p, train_tie, tie), report


# ------------------------------------------------------------------------------------- Davidson tie model


def _score_and_tie(p) -> tuple[np.ndarray, np.ndarray]:
    lp = np.log(ens.clip_probs(p))
    return (lp[:, 0] - lp[:, 1]) / 2, lp[:, 2] - (lp[:, 0] + lp[:, 1]) / 2


@dataclass(frozen=True)
class DavidsonTieModel:
    """P(A) ∝ e^{a s}, P(B) ∝ e^{-a s}, P(tie) ∝ e^{c + g t + d |s|} on a blend's s and t (see module doc).

    The identity is a = 1, c = 0, g = 1, d = 0. ``fit`` never returns a model worse in sample than it."""

    a: float = 1.0
    c: float = 0.0
    g: float = 1.0
    d: float = 0.0

    def apply(self, p) -> np.ndarray:
        s, t = _score_and_tie(p)
        logits = np.column_stack([self.a * s, -self.a * s, self.c + self.g * t + self.d * np.abs(s)])
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    @classmethod
    def fit(cls, p, y, l2: float = 1e-3) -> "DavidsonTieModel":
        """Maximum likelihood (L-BFGS) with a small pull toward the identity."""
        p = ens.clip_probs(p)
        identity = np.array([1.0, 0.0, 1.0, 0.0])

        def loss(theta):
            return ens.log_loss3(y, cls(*theta).apply(p)) + l2 * float(np.sum((theta - identity) ** 2))

        res = minimize(loss, identity, method="L-BFGS-B")
        fitted = cls(*map(float, res.x))
        return fitted if ens.log_loss3(y, fitted.apply(p)) <= ens.log_loss3(y, p) else cls()

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- confidence control


def shrink(p, weight: float, tie: float) -> np.ndarray:
    """(1 - weight) · p + weight · even_prior(tie): less sure, never more."""
    if not 0 <= weight <= 1:
        raise ValueError(f"shrinkage weight must be in [0, 1], got {weight!r}")
    return (1 - weight) * ens.clip_probs(p) + weight * even_prior(tie)


def choose_shrinkage(held_out: dict[str, tuple[np.ndarray, np.ndarray]], tie: float,
                     grid=SHRINK_GRID) -> tuple[float, dict[float, float]]:
    """The weight of ``grid`` with the lowest mean (over sources, each counted once) held-out log loss.

    ``held_out``: source -> (labels, probabilities of a model that never saw that source). Returns the weight
    and the mean loss at every grid point.
    """
    if not held_out:
        raise ValueError("choose_shrinkage needs predictions for at least one held-out source")
    curve = {float(w): float(np.mean([ens.log_loss3(y, shrink(p, w, tie)) for y, p in held_out.values()]))
             for w in grid}
    return min(curve, key=lambda w: (curve[w], w)), curve

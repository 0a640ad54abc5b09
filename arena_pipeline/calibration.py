"""Calibration after the blend that keeps A/B swap consistency exact: how much tie, how sure.

Every map here treats A and B alike, so swapping the two answers still permutes the probabilities:

- ``em_tie_prior``: re-estimate the tie rate of the file being scored from the model's own probabilities
  (the EM prior correction of Saerens, Latinne & Decaestecker 2002), with the A/B split of the rest kept
  even, so only the tie prior moves. Guards: a pseudo-count pull toward the training tie rate, bounds on
  the estimate, and no adaptation on a file too small to estimate a rate from.
- ``DavidsonTieModel``: probabilities re-read as an antisymmetric preference score s = (log pA - log pB) / 2 and a
  symmetric tie logit t = log pT - (log pA + log pB) / 2, recombined in the Davidson form
  P(A) ∝ e^{a s}, P(B) ∝ e^{-a s}, P(tie) ∝ e^{c + g t + d |s|} and fitted by maximum likelihood; over several
  members' probabilities at once it is a stacker with the same symmetry (one a and g per member).
- ``shrink`` / ``choose_shrinkage``: mix the probabilities with an A/B-even prior; the weight is chosen on
  held-out *sources* (leave-one-source-out), not on the set the blend was fitted on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

from arena_pipeline import blending as ens

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
    """Davidson form over one or more probability inputs (a blend, or the members themselves: stacking).

    Each input m gives an antisymmetric score s_m and a symmetric tie logit t_m (module doc);
    S = sum_m a_m s_m; P(A) ∝ e^{S}, P(B) ∝ e^{-S}, P(tie) ∝ e^{c + sum_m g_m t_m + d |S|}.
    With one input the identity is a = [1], g = [1], c = d = 0 (``DavidsonTieModel()``); ``fit`` starts from
    the uniform average of the inputs' scores and never returns a model worse in sample than that start."""

    a: tuple[float, ...] = (1.0,)
    g: tuple[float, ...] = (1.0,)
    c: float = 0.0
    d: float = 0.0

    @staticmethod
    def _inputs(p) -> list[np.ndarray]:
        return list(p) if isinstance(p, (list, tuple)) else [p]

    def apply(self, p) -> np.ndarray:
        """``p``: one (n, 3) array, or a list of them in the order the model was fitted on."""
        parts = [_score_and_tie(x) for x in self._inputs(p)]
        if len(parts) != len(self.a):
            raise ValueError(f"this Davidson model takes {len(self.a)} input(s), got {len(parts)}")
        score = sum(a * s for a, (s, _) in zip(self.a, parts))
        tie = self.c + sum(g * t for g, (_, t) in zip(self.g, parts)) + self.d * np.abs(score)
        logits = np.column_stack([score, -score, tie])
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    @classmethod
    def _unpack(cls, theta: np.ndarray, m: int) -> "DavidsonTieModel":
        return cls(tuple(map(float, theta[:m])), tuple(map(float, theta[m:2 * m])), float(theta[-2]), float(theta[-1]))

    @classmethod
    def fit(cls, p, y, l2: float = 1e-3) -> "DavidsonTieModel":
        """Maximum likelihood (L-BFGS) with a small pull toward the start (uniform average of the inputs)."""
        inputs = [ens.clip_probs(x) for x in cls._inputs(p)]
        m = len(inputs)
        start = np.r_[np.full(m, 1.0 / m), np.full(m, 1.0 / m), 0.0, 0.0]

        def loss(theta):
            return ens.log_loss3(y, cls._unpack(theta, m).apply(inputs)) + l2 * float(np.sum((theta - start) ** 2))

        fitted = cls._unpack(minimize(loss, start, method="L-BFGS-B").x, m)
        initial = cls._unpack(start, m)
        return fitted if ens.log_loss3(y, fitted.apply(inputs)) <= ens.log_loss3(y, initial.apply(inputs)) else initial

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

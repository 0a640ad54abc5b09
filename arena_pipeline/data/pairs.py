"""Every pair of judged answers to one prompt as a weakly labelled pair (more training signal).

A file of judged answers (``question_id, prompt, model, response, judge_score``; arena-bench: 290 prompts x
up to 15 models, GPT-4 scores 1-10) holds far more pairs than the shipped pair file: every two answers to
the same prompt make one, labelled like the pair file (higher score wins, equal scores tie). The A/B
position of each pair is drawn at random (seeded) so neither side is favoured.
"""

import itertools

import numpy as np
import pandas as pd

from arena_pipeline.data.schema import DataError

REQUIRED = ("question_id", "prompt", "model", "response", "judge_score")


def answer_pairs(answers: pd.DataFrame, *, file: str = "<answers>", seed: int = 42,
                 source: str = "arena_bench_all_pairs") -> pd.DataFrame:
    """All within-prompt pairs of ``answers`` in the data contract; answers without a score are skipped."""
    missing = [c for c in REQUIRED if c not in answers.columns]
    if missing:
        raise DataError(f"{file}: column(s) {missing} missing; a judged-answers file needs {list(REQUIRED)}")
    scores = pd.to_numeric(answers["judge_score"], errors="coerce")
    bad = answers.index[~np.isfinite(scores.to_numpy(dtype=float)) & answers["judge_score"].notna().to_numpy()]
    if len(bad):
        row = answers.loc[bad[0]]
        raise DataError(f"{file}: row question_id={row['question_id']!r} model={row['model']!r}, column 'judge_score': "
                        f"{row['judge_score']!r} is not a number")
    judged = answers.assign(judge_score=scores).dropna(subset=["judge_score"])
    rng = np.random.default_rng(seed)
    rows = []
    for qid, group in judged.sort_values(["question_id", "model"]).groupby("question_id", sort=True):
        records = group.to_dict("records")
        for first, second in itertools.combinations(records, 2):
            a, b = (first, second) if rng.random() < 0.5 else (second, first)
            diff = a["judge_score"] - b["judge_score"]
            rows.append({
                "id": f"{source}-{qid}-{a['model']}-{b['model']}",
                "prompt": a["prompt"], "response_a": a["response"], "response_b": b["response"],
                "model_a": a["model"], "model_b": b["model"], "source": source, "question_id": qid,
                "winner_model_a": int(diff > 0), "winner_model_b": int(diff < 0), "winner_tie": int(diff == 0),
                "score_a": a["judge_score"], "score_b": b["judge_score"],
            })
    return pd.DataFrame(rows)

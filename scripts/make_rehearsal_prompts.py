"""Write the rehearsal's prompt set: shipped arena-bench prompts plus two- and three-turn conversations.

The shipped arena-bench prompts are all single-turn (SOURCES.md), but `full`'s generation regenerates multi-turn
prompts turn by turn, so the rehearsal needs some. Each crafted conversation chains real arena-bench
questions as its user turns; its existing answer chains one model's real answers to those questions (the
model is the first one that answered every question of the chain). Deterministic (numpy default_rng(0)):

    python scripts/make_rehearsal_prompts.py   # -> data/shipped/rehearsal_{prompts,answers}.parquet
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "shipped"
SINGLE, CHAINS = 5, (2, 2, 3)  # 5 single-turn prompts, two two-turn and one three-turn conversation


def first_turn(prompt: str) -> str:
    return json.loads(prompt)[0]


def build(prompts: pd.DataFrame, answers: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    rows = prompts.iloc[order].reset_index(drop=True)
    by_question = {q: g.sort_values("model") for q, g in answers.groupby("question_id")}
    out_prompts = [rows.iloc[i].to_dict() for i in range(SINGLE)]
    out_answers = [by_question[p["question_id"]] for p in out_prompts]
    cursor = SINGLE
    for n in CHAINS:
        chain = rows.iloc[cursor:cursor + n]
        cursor += n
        common = set.intersection(*(set(by_question[q]["model"]) for q in chain["question_id"]))
        model = sorted(common)[0]
        turns = [first_turn(p) for p in chain["prompt"]]
        replies = [first_turn(by_question[q].set_index("model").loc[model, "response"]) for q in chain["question_id"]]
        qid = "multi-" + hashlib.sha1("|".join(chain["question_id"]).encode()).hexdigest()[:24]
        prompt = json.dumps(turns, ensure_ascii=False)
        out_prompts.append({"id": f"arenabench-{qid}", "prompt": prompt, "question_id": qid, "n_turns": n,
                            "source": "rehearsal_chained_questions"})
        out_answers.append(pd.DataFrame([{"question_id": qid, "prompt": prompt, "model": model,
                                          "response": json.dumps(replies, ensure_ascii=False), "judge_score": np.nan,
                                          "source": "rehearsal_chained_answers"}]))
    return pd.DataFrame(out_prompts), pd.concat(out_answers, ignore_index=True)


def main() -> None:
    prompts, answers = build(pd.read_parquet(SHIPPED / "arena_bench_prompts.parquet"),
                             pd.read_parquet(SHIPPED / "arena_bench_answers.parquet"))
    prompts.to_parquet(SHIPPED / "rehearsal_prompts.parquet", index=False)
    answers.to_parquet(SHIPPED / "rehearsal_answers.parquet", index=False)
    print(f"{len(prompts)} prompts (turns: {prompts['n_turns'].value_counts().sort_index().to_dict()}), "
          f"{len(answers)} answers")


if __name__ == "__main__":
    main()

"""Write Kaggle-sized, Kaggle-format LMSYS Arena files by resampling the shipped texts (seeded).

    .venv/bin/python scripts/make_kaggle_data.py --out /tmp/kaggle            # train.csv + test.csv
    .venv/bin/python scripts/make_kaggle_data.py --out /tmp/k --train-rows 2000 --test-rows 500

``train.csv``: exactly the competition's columns (id, model_a, model_b, prompt, response_a, response_b,
winner_model_a, winner_model_b, winner_tie), 57,477 rows by default; ``test.csv``: id, prompt, response_a,
response_b, 25,000 rows. Every text cell is a JSON list of strings, one per turn. Each row takes a real prompt
from data/shipped and two different real answers to that prompt; multi-turn rows chain 2-6 such turns.
Labels are drawn with the competition's class rates (A 34.9%, B 34.2%, tie 30.9%) independently of the
texts: the files test scale and format, not accuracy.

What the real files contain, at these rates (per row; the multi-turn rate is the competition's order of
magnitude, the rare-case rates are chosen, not measured):
    multi-turn 14% (2 turns 9%, 3 turns 3%, 4-6 turns 2%); a null turn in a response (``[null]`` or
    ``["...", null]``) 1.5%; a lone surrogate escape such as ``\\ud83d`` 0.2%; an empty response ``[""]``
    0.3%; a 100k-character cell (a looping answer) 0.02%.
No (prompt, response_a, response_b) triple repeats as written; cleaning (a null turn becomes "") makes a few
coincide, and merges them with a count in its metadata (49 of 57,477 rows with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "shipped"
TRAIN_COLUMNS = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
                 "winner_model_a", "winner_model_b", "winner_tie"]
TEST_COLUMNS = ["id", "prompt", "response_a", "response_b"]
LABEL_RATES = (0.349, 0.342, 0.309)  # A, B, tie in the competition's train.csv (20,064 / 19,652 / 17,761)
TURN_COUNTS = {1: 0.86, 2: 0.09, 3: 0.03, 4: 0.01, 5: 0.005, 6: 0.005}
RATES = {"null_turn": 0.015, "surrogate": 0.002, "empty": 0.003, "long": 0.0002}
LONE_SURROGATE = "\ud83d"  # the high half of an emoji without its low half, as in the real files
LONG_CHARS = 100_000


def answer_pools() -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Every shipped prompt (first turn text) with the distinct (model, answer) pairs known for it."""
    pools: dict[str, dict[str, str]] = {}

    def add(prompt_cell: str, model: str, response_cell: str) -> None:
        prompt, response = json.loads(prompt_cell), json.loads(response_cell)
        if len(prompt) != 1 or len(response) != 1 or not isinstance(response[0], str) or not response[0].strip():
            return
        pools.setdefault(prompt[0], {}).setdefault(response[0], model or "unknown-model")

    for name in ("arena_bench_pairs", "arena_bench_unlabelled", "pandalm_test", "llmbar"):
        frame = pd.read_parquet(SHIPPED / f"{name}.parquet", columns=["prompt", "response_a", "response_b",
                                                                       "model_a", "model_b"])
        for row in frame.itertuples(index=False):
            add(row.prompt, row.model_a, row.response_a)
            add(row.prompt, row.model_b, row.response_b)
    answers = pd.read_parquet(SHIPPED / "arena_bench_answers.parquet", columns=["prompt", "model", "response"])
    for row in answers.itertuples(index=False):
        add(row.prompt, row.model, row.response)
    prompts = sorted(p for p, answers_ in pools.items() if len(answers_) >= 2)
    return prompts, [sorted((m, a) for a, m in pools[p].items()) for p in prompts]


def _dumps(turns: list) -> str:
    text = json.dumps(turns, ensure_ascii=False)
    if LONE_SURROGATE in text:  # not encodable as UTF-8: written as the JSON escape, as the real files have it
        text = json.dumps(turns, ensure_ascii=True)
    return text


def make_rows(n: int, seed: int, prompts: list[str], pools: list[list[tuple[str, str]]]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts, weights = zip(*TURN_COUNTS.items())
    seen: set[tuple[str, str, str]] = set()
    ids = np.unique(rng.integers(30_000, 4_294_967_295, size=2 * n + 16, dtype=np.int64))  # Kaggle-like ids
    ids = rng.permutation(ids)[:n]
    rows: list[dict] = []
    while len(rows) < n:
        n_turns = int(rng.choice(counts, p=np.asarray(weights) / sum(weights)))
        while True:  # a repeated triple is redrawn with the same turn count (keeps the turn-count rates)
            (prompt, resp_a, resp_b), model_a, model_b = _draw(rng, n_turns, prompts, pools)
            clean = (_dumps(prompt), _dumps(resp_a), _dumps(resp_b))
            if clean not in seen:
                break
        seen.add(clean)  # the faults come after the uniqueness test, so redraws do not change their rates
        key = (clean[0], _dumps(_damage(rng, resp_a)), _dumps(_damage(rng, resp_b)))
        label = int(rng.choice(3, p=LABEL_RATES))
        rows.append({"id": int(ids[len(rows)]), "model_a": model_a, "model_b": model_b, "prompt": key[0],
                     "response_a": key[1], "response_b": key[2], "winner_model_a": int(label == 0),
                     "winner_model_b": int(label == 1), "winner_tie": int(label == 2)})
    return pd.DataFrame(rows)


def _draw(rng: np.random.Generator, n_turns: int, prompts: list[str], pools: list[list[tuple[str, str]]]):
    """One conversation: per turn a real prompt and two different real answers to it."""
    prompt, resp_a, resp_b, model_a, model_b = [], [], [], None, None
    for _ in range(n_turns):
        k = int(rng.integers(len(prompts)))
        i, j = rng.choice(len(pools[k]), size=2, replace=False)
        (ma, a), (mb, b) = pools[k][i], pools[k][j]
        model_a, model_b = model_a or ma, model_b or mb
        prompt.append(prompts[k])
        resp_a.append(a)
        resp_b.append(b)
    return (prompt, resp_a, resp_b), model_a, model_b


def _damage(rng: np.random.Generator, turns: list) -> list:
    """The faults of the real files, at their rates (per response cell, so per row about twice as often
    for the two-sided ones; RATES are halved here to give the per-row figures above)."""
    turns = list(turns)
    if rng.random() < RATES["null_turn"] / 2:
        turns[int(rng.integers(len(turns)))] = None
    if rng.random() < RATES["surrogate"] / 2:
        t = int(rng.integers(len(turns)))
        if isinstance(turns[t], str):
            cut = int(rng.integers(len(turns[t]) + 1))
            turns[t] = turns[t][:cut] + LONE_SURROGATE + turns[t][cut:]
    if rng.random() < RATES["empty"] / 2:
        turns = [""] * len(turns)
    if rng.random() < RATES["long"] / 2:
        t = int(rng.integers(len(turns)))
        base = (turns[t] or "I apologize, but I cannot") + "\n"
        turns[t] = (base * (LONG_CHARS // len(base) + 1))[:LONG_CHARS + 17]
    return turns


def summary(frame: pd.DataFrame) -> str:
    """The rates of the special cases actually written (per row)."""
    texts = frame[["prompt", "response_a", "response_b"]]

    def share(test) -> float:
        return float(texts.apply(lambda column: column.map(test)).any(axis=1).mean())

    escape, empty = "\\ud83d", '[""]'
    multi = float(frame["prompt"].map(lambda cell: len(json.loads(cell)) > 1).mean())
    null = share(lambda cell: None in json.loads(cell))
    surrogate = share(lambda cell: escape in cell)
    empties = share(lambda cell: cell == empty)
    long_cells = int((texts.apply(lambda column: column.str.len()) > LONG_CHARS).to_numpy().sum())
    return (f"multi-turn {multi:.1%}, null turn {null:.2%}, lone surrogate {surrogate:.2%}, "
            f"empty response {empties:.2%}, cells over 100k chars {long_cells}")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.csv and test.csv")
    p.add_argument("--train-rows", type=int, default=57_477)
    p.add_argument("--test-rows", type=int, default=25_000)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts, pools = answer_pools()
    train = make_rows(args.train_rows, args.seed, prompts, pools)
    test = make_rows(args.test_rows, args.seed + 1, prompts, pools)
    test = test.assign(id=np.arange(len(test)) + 136_060)[TEST_COLUMNS]  # Kaggle's test ids are small integers
    write_csv(train[TRAIN_COLUMNS], out / "train.csv")
    write_csv(test, out / "test.csv")
    for name, frame in (("train.csv", train), ("test.csv", test)):
        print(f"{out / name}: {len(frame)} rows, {(out / name).stat().st_size / 1e6:.0f} MB; {summary(frame)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

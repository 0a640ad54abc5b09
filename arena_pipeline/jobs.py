"""Jobs: the data layer, stage 1, the pseudo-label rebuild, stage 2 and the whole pipeline.

Jobs holding fold-partitioned assets need a partition (or range) tag when started from the CLI, e.g.
``dagster job execute -m arena_pipeline.definitions -j stage1_job --tags '{"dagster/partition": "0"}'``;
`arena-pipeline demo` adds the range of the profile's folds itself.
"""

from __future__ import annotations

import dagster as dg

from arena_pipeline.assets.oof import STAGE1, STAGE2, oof_asset_name
from arena_pipeline.config import Profile
from arena_pipeline.partitions import fold_partitions

DATA_ASSETS = ["raw_labelled", "raw_external", "raw_unlabelled", "raw_prompts", "processed_folds"]
PSEUDO_ASSETS = ["raw_unlabelled", "raw_prompts", "generated_completions", "unlabelled_pairs", "pseudo_labels"]


def build_jobs(profile: Profile) -> list[dg.UnresolvedAssetJobDefinition]:
    stage1 = [oof_asset_name(STAGE1, m.name) for m in profile.models] + ["stage1_ensemble"]
    stage2 = [oof_asset_name(STAGE2, m.name) for m in profile.stage2_models] + ["final_ensemble", "predictor_bundle"]
    parts = fold_partitions(profile)
    return [
        dg.define_asset_job("data_job", selection=DATA_ASSETS,
                            description="Read, clean and validate the inputs; build processed_folds."),
        dg.define_asset_job("stage1_job", selection=stage1, partitions_def=parts,
                            description="Stage-1 training jobs (one per model and fold) and the stage-1 ensemble."),
        dg.define_asset_job("pseudo_labels_job", selection=PSEUDO_ASSETS,
                            description="Regenerate completions and rebuild pseudo labels from the stage-1 models."),
        dg.define_asset_job("stage2_job", selection=stage2, partitions_def=parts,
                            description="Stage-2 training on human + pseudo labels, final ensemble and bundle."),
        dg.define_asset_job("full_pipeline_job", selection=dg.AssetSelection.all() - dg.AssetSelection.groups("evaluation"),
                            partitions_def=parts, description="Everything, raw files to predictor bundle."),
        dg.define_asset_job("evaluation_job", selection=dg.AssetSelection.groups("evaluation"),
                            description="Leave-one-source-out evaluation and ablation table on the human-labelled sources."),
    ]

"""Jobs: the data layer, stage 1, the pseudo-label rebuild, stage 2 and the whole pipeline.

Jobs holding fold-partitioned assets need a partition (or range) tag when started from the CLI, e.g.
``dagster job execute -m arena_pipeline.definitions -j stage1_job --tags '{"dagster/partition": "0"}'``;
`arena-pipeline demo` adds the range of the profile's folds itself.
"""

from __future__ import annotations

import dagster as dg

from arena_pipeline.profile import Profile
from arena_pipeline.partitions import fold_partitions

# name -> description; `arena-pipeline demo --job` offers exactly these names
JOBS = {
    "data_job": "Read, clean and validate the inputs; build processed_folds.",
    "stage1_job": "Stage-1 training jobs (one per model and fold; a student's nested teacher jobs too) and the stage-1 ensemble.",
    "pseudo_labels_job": "Regenerate completions and rebuild pseudo labels from the stage-1 models.",
    "stage2_job": "Stage-2 training on human + pseudo labels, final ensemble and bundle.",
    "full_pipeline_job": "Everything, raw files to predictor bundle.",
    "evaluation_job": "Leave-one-source-out evaluation and ablation table on the human-labelled sources.",
}
DATA_ASSETS = ["raw_labelled", "raw_external", "raw_unlabelled", "raw_prompts", "processed_folds"]
PSEUDO_ASSETS = ["raw_unlabelled", "raw_prompts", "generated_completions", "unlabelled_pairs", "pseudo_labels"]


def build_jobs(profile: Profile) -> list[dg.UnresolvedAssetJobDefinition]:
    from arena_pipeline.assets.oof import STAGE1, STAGE2, oof_asset_name  # here: the CLI imports JOBS cheaply

    from arena_pipeline.assets.distillation import targets_asset_name

    stage1 = ([oof_asset_name(STAGE1, m.name) for m in profile.models] + ["stage1_ensemble"]
              + [targets_asset_name(m.name) for m in profile.models if m.distill])
    stage2 = [oof_asset_name(STAGE2, m.name) for m in profile.stage2_models] + ["final_ensemble", "predictor_bundle"]
    parts = fold_partitions(profile)
    return [
        dg.define_asset_job("data_job", selection=DATA_ASSETS,
                            description=JOBS["data_job"]),
        dg.define_asset_job("stage1_job", selection=stage1, partitions_def=parts,
                            description=JOBS["stage1_job"]),
        dg.define_asset_job("pseudo_labels_job", selection=PSEUDO_ASSETS,
                            description=JOBS["pseudo_labels_job"]),
        dg.define_asset_job("stage2_job", selection=stage2, partitions_def=parts,
                            description=JOBS["stage2_job"]),
        dg.define_asset_job("full_pipeline_job", selection=dg.AssetSelection.all() - dg.AssetSelection.groups("evaluation", "hpo", "generator_tuning"),
                            partitions_def=parts, description=JOBS["full_pipeline_job"]),
        dg.define_asset_job("evaluation_job", selection=dg.AssetSelection.groups("evaluation"),
                            description=JOBS["evaluation_job"]),
    ]

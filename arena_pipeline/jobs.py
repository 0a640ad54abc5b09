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


def build_jobs(profile: Profile) -> list[dg.UnresolvedAssetJobDefinition]:
    # selections by group (the assets' group_name), so a new member or asset joins its job with no edit here
    inputs, pseudo = dg.AssetSelection.groups("inputs"), dg.AssetSelection.groups("pseudo_labelling")
    stage1 = dg.AssetSelection.groups("stage1", "distillation") | dg.AssetSelection.assets("stage1_ensemble")
    stage2 = dg.AssetSelection.groups("stage2") | dg.AssetSelection.assets("final_ensemble", "predictor_bundle")
    # the raw files the pseudo-labelling assets read directly (prompts, unlabelled pool), not processed_folds
    pseudo_inputs = pseudo.upstream(depth=1) & dg.AssetSelection.all().roots()
    parts = fold_partitions(profile)
    return [
        dg.define_asset_job("data_job", selection=inputs,
                            description=JOBS["data_job"]),
        dg.define_asset_job("stage1_job", selection=stage1, partitions_def=parts,
                            description=JOBS["stage1_job"]),
        dg.define_asset_job("pseudo_labels_job", selection=pseudo | pseudo_inputs,
                            description=JOBS["pseudo_labels_job"]),
        dg.define_asset_job("stage2_job", selection=stage2, partitions_def=parts,
                            description=JOBS["stage2_job"]),
        dg.define_asset_job("full_pipeline_job", selection=dg.AssetSelection.all() - dg.AssetSelection.groups("evaluation", "hpo", "generator_tuning"),
                            partitions_def=parts, description=JOBS["full_pipeline_job"]),
        dg.define_asset_job("evaluation_job", selection=dg.AssetSelection.groups("evaluation"),
                            description=JOBS["evaluation_job"]),
    ]

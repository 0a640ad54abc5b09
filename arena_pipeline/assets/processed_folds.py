"""processed_folds: the validated, de-duplicated labelled table with a fold column (grouped by prompt)."""


from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline import plots
from arena_pipeline.profile import Profile
from arena_pipeline.data.folds import build_processed, fold_summary, length_percentiles
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_parquet, file_version
from arena_pipeline.resources.tracking import MlflowTracking

GROUP = "inputs"


def text_lengths(frame: pd.DataFrame) -> np.ndarray:
    return (frame["prompt"].str.len() + frame["response_a"].str.len() + frame["response_b"].str.len()).to_numpy()


def build_folds_asset(profile: Profile) -> dg.AssetsDefinition:
    class FoldsConfig(dg.Config):
        n_folds: int = profile.n_folds
        seed: int = profile.seed

    @dg.asset(group_name=GROUP, kinds={"parquet"},
              description="Labelled rows with StratifiedGroupKFold folds (grouped by normalised prompt); "
                          "external labelled rows are fold -1 (train only).")
    def processed_folds(context: dg.AssetExecutionContext, config: FoldsConfig, storage: ArenaStorage,
                        mlflow: MlflowTracking, raw_labelled: Path, raw_external: Path):
        labelled = pd.read_parquet(raw_labelled)
        external = pd.read_parquet(raw_external)
        frame, removed = build_processed(labelled, [external] if len(external) else [], n_folds=config.n_folds,
                                         seed=config.seed)
        path = atomic_write_parquet(frame, storage.data("processed_folds"))
        png = plots.length_histogram(
            {"fold >= 0": text_lengths(frame[frame["fold"] >= 0]), "fold -1": text_lengths(frame[frame["fold"] < 0])},
            storage.scratch("plots") / "processed_folds_lengths.png",
        )
        image = mlflow.log_pipeline_artifact(context, png)
        context.log.info(f"processed_folds: {len(frame)} rows in {config.n_folds} folds -> {path}")
        return dg.MaterializeResult(
            metadata={
                "rows": len(frame),
                "rows_per_fold": dg.MetadataValue.json({str(k): int(v) for k, v in frame["fold"].value_counts().sort_index().items()}),
                "rows_removed": dg.MetadataValue.json(removed),
                "fold_summary": dg.MetadataValue.json(fold_summary(frame)),
                "length_percentiles": dg.MetadataValue.json(length_percentiles(frame)),
                "length_histogram": image,
                "path": dg.MetadataValue.path(str(path)),
            },
            data_version=dg.DataVersion(file_version(path)),
        )

    return processed_folds

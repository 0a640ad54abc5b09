"""Blocking asset checks: bad folds, leaked pseudo labels or leaked distillation targets stop everything downstream."""


from pathlib import Path

import dagster as dg
import pandas as pd

from arena_pipeline.assets import distillation
from arena_pipeline.assets.pseudo_labels import leakage_report
from arena_pipeline.profile import Profile
from arena_pipeline.data.folds import check_groups_disjoint, check_label_balance, check_unique_ids
from arena_pipeline.resources.storage import ArenaStorage


def check_metadata(details: dict, prefix: str = "") -> dict[str, dg.MetadataValue]:
    """One metadata entry per figure (nested keys joined by dots: ``overall.A``, ``folds.0.rows``), so the UI
    lists them as rows instead of one JSON blob."""
    out: dict[str, dg.MetadataValue] = {}
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(check_metadata(value, f"{name}."))
        elif isinstance(value, bool):
            out[name] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            out[name] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[name] = dg.MetadataValue.float(value)
        elif isinstance(value, (list, tuple)):
            out[name] = dg.MetadataValue.text(", ".join(map(str, value)) if value else "none")
        else:
            out[name] = dg.MetadataValue.text(str(value))
    return out


def _result(passed: bool, details: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=bool(passed), metadata=check_metadata(details))


@dg.asset_check(asset="processed_folds", blocking=True,
                description="No normalised prompt sits in two folds (no prompt leaks across a split).")
def folds_groups_disjoint(processed_folds: Path) -> dg.AssetCheckResult:
    return _result(*check_groups_disjoint(pd.read_parquet(processed_folds)))


@dg.asset_check(asset="processed_folds", blocking=True,
                description="Each fold's label shares are within 2 percentage points of the whole.")
def folds_label_balance(processed_folds: Path) -> dg.AssetCheckResult:
    return _result(*check_label_balance(pd.read_parquet(processed_folds), tolerance=0.02))


@dg.asset_check(asset="processed_folds", blocking=True, description="Row ids are unique.")
def folds_unique_ids(processed_folds: Path) -> dg.AssetCheckResult:
    return _result(*check_unique_ids(pd.read_parquet(processed_folds)))


def build_pseudo_checks(profile: Profile) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset="pseudo_labels", blocking=True,
                    description="Fold K's pseudo labels come only from stage-1 models that never trained on fold K, "
                                "and no pair whose prompt is in fold K's validation rows enters fold K's training.",
                    additional_ins={"processed_folds": dg.AssetIn("processed_folds")})
    def pseudo_labels_no_leakage(storage: ArenaStorage, processed_folds: Path) -> dg.AssetCheckResult:
        report = leakage_report(storage, processed_folds, profile.folds)
        return _result(report["passed"], report)

    return [pseudo_labels_no_leakage]


def build_distillation_checks(profile: Profile) -> list[dg.AssetChecksDefinition]:
    """One blocking leak check per student's targets asset: a failure stops the student's training."""

    def check_for(student: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=distillation.targets_asset_name(student), name="distill_targets_no_leakage",
                        blocking=True,
                        description="Outer fold K's targets come only from teacher jobs that trained neither on fold K "
                                    "nor on the row's own fold (each row's provenance and each teacher job's job.json).")
        def distill_targets_no_leakage(storage: ArenaStorage) -> dg.AssetCheckResult:
            report = distillation.leakage_report(storage, student, profile.folds)
            return _result(report["passed"], report)

        return distill_targets_no_leakage

    return [check_for(m.name) for m in profile.models if m.distill]


FOLD_CHECKS = [folds_groups_disjoint, folds_label_balance, folds_unique_ids]

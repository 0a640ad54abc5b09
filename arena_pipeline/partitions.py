"""Fold partitions: one partition per fold the profile trains, so one (model, fold) rebuilds alone."""

from __future__ import annotations

import dagster as dg

from arena_pipeline.profile import Profile


def fold_partitions(profile: Profile) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(k) for k in profile.folds])


def fold_range_tags(profile: Profile) -> dict[str, str]:
    """Run tags that select every fold of the profile in one run (needs BackfillPolicy.single_run)."""
    keys = [str(k) for k in profile.folds]
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


def run_folds(context: dg.AssetExecutionContext) -> list[int]:
    """The folds this run materialises (one partition or a range)."""
    return [int(k) for k in context.partition_keys]

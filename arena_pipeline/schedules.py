"""A schedule that rebuilds generated completions and pseudo labels (cron configurable)."""

from __future__ import annotations

import os

import dagster as dg

PSEUDO_CRON = os.environ.get("ARENA_PSEUDO_CRON", "0 3 * * *")  # daily at 03:00 by default


def build_schedules(pseudo_job) -> list[dg.ScheduleDefinition]:
    return [
        dg.ScheduleDefinition(
            name="pseudo_labels_schedule",
            job=pseudo_job,
            cron_schedule=PSEUDO_CRON,
            description="Regenerates completions and rebuilds pseudo labels on a schedule (ARENA_PSEUDO_CRON).",
            default_status=dg.DefaultScheduleStatus.STOPPED,
        )
    ]

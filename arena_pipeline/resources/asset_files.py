"""The IO manager: hands an asset the files of the assets it reads, so its signature shows its inputs.

Assets write their own files where ``ArenaStorage`` lays them out (atomically) and return
``dg.MaterializeResult``: the files are the product (a person opens them from a shell, a launched job reads
them by path), so this manager never pickles a value. A downstream asset names what it reads as a parameter,

    def unlabelled_pairs(context, raw_unlabelled: Path, generated_completions: Path, raw_prompts: Path): ...

and receives each upstream asset's file path (``load_input``); a missing file fails with the asset to
materialise first. Inputs that are not one file (the fold-partitioned OOF folders an ensemble blends, the
profile-dependent member lists) stay ``deps=``: their readers go through ``ArenaStorage`` by member.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from arena_pipeline.resources.storage import ArenaStorage


class AssetFiles(dg.ConfigurableIOManager):
    """``load_input`` -> the upstream table's parquet path; ``handle_output`` accepts nothing but ``None``."""

    storage: ArenaStorage

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is not None:
            raise TypeError(f"{context.asset_key.to_user_string()} returned a {type(obj).__name__}: assets of this "
                            "project write their own files (ArenaStorage) and return dg.MaterializeResult")

    def load_input(self, context: dg.InputContext) -> Path:
        name = context.asset_key.path[-1]
        path = self.storage.data(name)
        if not path.exists():
            raise dg.Failure(f"input {name!r}: no file at {path}; materialise {name} first")
        return path

"""Raw inputs: labelled pairs, external labelled sets, the unlabelled pool, prompts for generation.

Each asset reads the files named in its run config (default: the shipped data of the profile), cleans and
validates them with the data layer, and writes one parquet file. Rows removed or repaired by cleaning are
counted in the metadata, per source.
"""


from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline.profile import Profile
from arena_pipeline.data.clean import clean_frame
from arena_pipeline.data.folds import label_index, length_percentiles
from arena_pipeline.data.load import read_table
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_parquet, file_version
from gpu_jobs.contract.schema import CLASS_NAMES

GROUP = "inputs"


class RawFilesConfig(dg.Config):
    """Point a raw asset at your own files (CSV incl. Kaggle train.csv, parquet, JSONL, saved HF datasets)."""

    paths: list[str] | None = None  # None: the profile's default files; []: no files
    max_rows_per_file: int = -1  # -1: the profile's default; 0: no cap


def _cap(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if not limit or len(frame) <= limit:
        return frame
    return frame.sample(n=limit, random_state=seed).sort_index()


def load_clean(paths: list[str], *, labelled: bool, limit: int | None, seed: int,
               tie_free_sources: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict]:
    """Read, clean and cap every file; metadata counts per file stem. Rows of ``tie_free_sources`` (their
    ``source`` column) get ``ties_possible = False`` unless the file says otherwise."""
    frames, meta = [], {}
    for path in paths:
        stem = Path(path).stem
        raw = read_table(path)
        cleaned, report = clean_frame(raw, file=str(path), labelled=labelled, tie_free_sources=tie_free_sources)
        capped = _cap(cleaned, limit, seed)
        meta[stem] = {**report.to_metadata(), "rows_after_cap": len(capped)}
        frames.append(capped)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return frame, meta


def label_balance(frame: pd.DataFrame) -> dict[str, float]:
    y = label_index(frame)
    return {name: round(float(np.mean(y == k)), 4) for k, name in enumerate(CLASS_NAMES)}


def _table_metadata(frame: pd.DataFrame, per_file: dict, path: Path, labelled: bool) -> dict:
    meta = {
        "rows": dg.MetadataValue.int(len(frame)),
        "per_file": dg.MetadataValue.json(per_file),
        "path": dg.MetadataValue.path(str(path)),
        "length_percentiles": dg.MetadataValue.json(length_percentiles(frame)) if len(frame) else None,
        "sources": dg.MetadataValue.json(frame["source"].value_counts().to_dict()) if len(frame) else None,
    }
    if labelled and len(frame):
        meta["label_balance"] = dg.MetadataValue.json(label_balance(frame))
    return {k: v for k, v in meta.items() if v is not None}


def _limit(config: RawFilesConfig, default: int | None) -> int | None:
    if config.max_rows_per_file == -1:
        return default
    return config.max_rows_per_file or None


def build_raw_assets(profile: Profile) -> list[dg.AssetsDefinition]:
    def make(name: str, default_paths: tuple[str, ...], *, labelled: bool, default_limit: int | None, doc: str):
        @dg.asset(name=name, group_name=GROUP, description=doc, kinds={"parquet"})
        def _asset(context: dg.AssetExecutionContext, config: RawFilesConfig, storage: ArenaStorage):
            paths = list(default_paths) if config.paths is None else config.paths
            frame, per_file = load_clean(paths, labelled=labelled, limit=_limit(config, default_limit),
                                         seed=profile.seed, tie_free_sources=profile.data.tie_free_sources)
            if name == "raw_unlabelled":
                incoming = sorted(p for p in storage.incoming_dir.iterdir() if p.suffix in {".parquet", ".csv", ".jsonl"})
                if incoming:
                    extra, extra_meta = load_clean([str(p) for p in incoming], labelled=False, limit=None,
                                                   seed=profile.seed)
                    frame = pd.concat([frame, extra], ignore_index=True)
                    per_file.update({f"incoming/{k}": v for k, v in extra_meta.items()})
                before = len(frame)
                frame = frame.drop_duplicates("id", keep="first")
                per_file["duplicate_ids_across_files"] = before - len(frame)
            path = atomic_write_parquet(frame, storage.data(name))
            context.log.info(f"{name}: {len(frame)} rows -> {path}")
            return dg.MaterializeResult(metadata=_table_metadata(frame, per_file, path, labelled),
                                        data_version=dg.DataVersion(file_version(path)))

        return _asset

    raw_labelled = make("raw_labelled", profile.data.labelled, labelled=True, default_limit=profile.max_labelled_rows,
                        doc="Human/judge-labelled pairs that get folds (default: arena-bench GPT-4-judged pairs).")
    raw_external = make("raw_external", profile.data.external, labelled=True, default_limit=profile.max_external_rows,
                        doc="Extra labelled sets, train only (fold -1): PandaLM and LLMBar human labels by default.")
    raw_unlabelled = make("raw_unlabelled", profile.data.unlabelled, labelled=False,
                          default_limit=profile.max_unlabelled_rows,
                          doc="Unlabelled pool of answer pairs, plus any files dropped into the incoming folder.")

    class PromptsConfig(dg.Config):
        prompts_path: str = profile.data.prompts
        answers_path: str = profile.data.answers
        max_prompts: int = profile.n_generate_prompts

    @dg.asset(group_name=GROUP, kinds={"parquet"},
              description="Prompts to answer with a generator, each with one existing answer to pair against.")
    def raw_prompts(context: dg.AssetExecutionContext, config: PromptsConfig, storage: ArenaStorage):
        prompts = read_table(config.prompts_path)
        answers = read_table(config.answers_path)
        for column, frame, file in (("prompt", prompts, config.prompts_path), ("question_id", answers, config.answers_path),
                                    ("response", answers, config.answers_path)):
            if column not in frame.columns:
                from arena_pipeline.data.schema import DataError

                raise DataError(f"{file}: column '{column}' is missing. Prompts need id, prompt, question_id; "
                                "answers need question_id, model, response.")
        rng = np.random.default_rng(profile.seed)
        # one existing answer per question, chosen at random (seeded)
        picked = answers.groupby("question_id", sort=True).apply(
            lambda g: g.iloc[int(rng.integers(len(g)))], include_groups=False
        ).reset_index()
        merged = prompts.merge(picked[["question_id", "model", "response"]], on="question_id", how="inner")
        missing = len(prompts) - len(merged)
        merged = _cap(merged.sort_values("id").reset_index(drop=True), config.max_prompts, profile.seed)
        path = atomic_write_parquet(merged, storage.data("raw_prompts"))
        return dg.MaterializeResult(metadata={
            "rows": len(merged),
            "prompts_without_answer": missing,
            "turns": dg.MetadataValue.json(merged["n_turns"].value_counts().to_dict() if "n_turns" in merged else {}),
            "path": dg.MetadataValue.path(str(path)),
        }, data_version=dg.DataVersion(file_version(path)))

    return [raw_labelled, raw_external, raw_unlabelled, raw_prompts]

"""Leave-one-source-out (LOSO) evaluation: how the recipe does on human labels it never saw.

For each held-out labelled source S (default: the external human sets, PandaLM and LLMBar), every stage-1
member is retrained by the same `gpu_jobs.train` job on all other rows (rows sharing a prompt with S
removed) and predicts S; the members are blended with the stage-1 ensemble's weights and temperature,
which were fitted on other data. Reported per source: log loss, 3-way accuracy, per-class loss, swap
consistency (same verdict after swapping A and B), a reliability diagram, an ablation table
(each member, its TTA, uniform blend, fitted blend, + temperature, + a tie prior fitted out of sample), and
the bundle and each member per subset of the source (its `subset` column, e.g. LLMBar's natural human
preference sets vs its adversarial instruction-following sets), which can tell very different stories.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline import ensemble as ens
from arena_pipeline import plots
from arena_pipeline.assets.oof import job_args
from arena_pipeline.config import Profile
from arena_pipeline.data.folds import label_index
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json, atomic_write_parquet
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.schema import PROB_COLUMNS

HELD_OUT_FOLD = 99  # the validation "fold" of a LOSO training job
PROBS = list(PROB_COLUMNS)


def loso_split(processed: pd.DataFrame, source: str) -> pd.DataFrame:
    """All rows train (fold -1) except `source`, which is the validation fold; shared prompts dropped."""
    held = processed["source"] == source
    if not held.any():
        raise dg.Failure(f"no rows of source '{source}' in processed_folds (sources: {sorted(processed['source'].unique())})")
    overlap = processed["group"].isin(set(processed.loc[held, "group"])) & ~held
    frame = processed[~overlap].copy()
    frame["fold"] = np.where(frame["source"] == source, HELD_OUT_FOLD, -1)
    return frame


def swap_consistency(p: np.ndarray, p_swapped_back: np.ndarray) -> float:
    """Share of rows whose verdict is unchanged when A and B are swapped (predictions permuted back)."""
    return float(np.mean(p.argmax(axis=1) == p_swapped_back.argmax(axis=1)))


def swapped_members(members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each member's prediction had the pair been given with A and B swapped (permuted back to [A, B, tie]).

    That is exactly its TTA twin: ``X+tta`` is X on the swapped pair permuted back, and X on the swapped pair
    is ``X+tta``'s input swapped twice; so the swapped view of a blend exchanges every member with its twin.
    """
    out = {}
    for name in members:
        twin = name[: -len("+tta")] if name.endswith("+tta") else f"{name}+tta"
        out[name] = members[twin] if twin in members else members[name]
    return out


def ablation_rows(y: np.ndarray, members: dict[str, np.ndarray], weights: dict[str, float], temperature: float,
                  tie_bias: float) -> list[dict]:
    def row(name, p):
        return {"variant": name, "log_loss": ens.log_loss3(y, p), "accuracy": ens.accuracy(y, p)}

    rows = [row(f"member {name}", p) for name, p in members.items()]
    rows.append(row("uniform blend", ens.blend(members, {n: 1.0 for n in members})))
    used = {n: w for n, w in weights.items() if n in members}
    fitted = ens.blend(members, used)
    rows.append(row("fitted blend (stage-1 weights)", fitted))
    tempered = ens.apply_temperature(fitted, temperature)
    rows.append(row("+ temperature", tempered))
    rows.append(row("+ tie prior (fitted on stage-1 OOF)", ens.apply_tie_bias(tempered, tie_bias)))
    return rows


def subset_rows(held: pd.DataFrame, y: np.ndarray, predictions: dict[str, np.ndarray]) -> list[dict]:
    """Log loss and accuracy of each prediction on each value of the held-out rows' ``subset`` column.

    Rows without a subset (the column missing or empty) are not broken down: an empty list.
    """
    if "subset" not in held.columns:
        return []
    subsets = held["subset"].fillna("").astype(str).to_numpy()
    rows = []
    for subset in sorted(set(subsets) - {""}):
        mask = subsets == subset
        row = {"subset": subset, "rows": int(mask.sum()), "tie_rate_true": float(np.mean(y[mask] == 2))}
        for name, p in predictions.items():
            row[name] = {"log_loss": ens.log_loss3(y[mask], p[mask]), "accuracy": ens.accuracy(y[mask], p[mask])}
        rows.append(row)
    return rows


def subset_table(source: str, rows: list[dict], name: str) -> str:
    lines = [f"| {source} subset | rows | {name} log loss | {name} acc |", "|---|---|---|---|"]
    lines += [f"| {r['subset']} | {r['rows']} | {r[name]['log_loss']:.4f} | {r[name]['accuracy']:.3f} |" for r in rows]
    return "\n".join(lines)


def markdown_table(results: dict[str, dict]) -> str:
    sources = list(results)
    lines = ["| variant | " + " | ".join(f"{s} log loss | {s} acc" for s in sources) + " |",
             "|---|" + "---|---|" * len(sources)]
    variants = [r["variant"] for r in results[sources[0]]["ablation"]]
    for variant in variants:
        cells = []
        for s in sources:
            found = next((r for r in results[s]["ablation"] if r["variant"] == variant), None)
            cells += [f"{found['log_loss']:.4f}", f"{found['accuracy']:.3f}"] if found else ["", ""]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_evaluation_asset(profile: Profile) -> dg.AssetsDefinition:
    class LosoConfig(dg.Config):
        sources: list[str] = ["pandalm_testset_v1", "llmbar"]

    @dg.asset(group_name="evaluation", deps=["processed_folds", "stage1_ensemble"], pool="gpu", kinds={"pytorch"},
              description="Leave-one-source-out evaluation of the stage-1 recipe on human-labelled sources.")
    def loso_evaluation(context: dg.AssetExecutionContext, config: LosoConfig, storage: ArenaStorage,
                        launcher: JobLauncher, mlflow: MlflowTracking):
        processed = pd.read_parquet(storage.data("processed_folds"))
        spec = json.loads(storage.ensemble("stage1_ensemble").read_text())
        stage1_oof = pd.read_parquet(storage.ensemble("stage1_ensemble").with_suffix(".oof.parquet"))
        y_stage1 = label_index(processed.set_index("id").loc[stage1_oof["id"]].reset_index())
        tie_bias = ens.fit_tie_bias(stage1_oof[PROBS].to_numpy(), y_stage1)  # fitted out of sample (other data)
        results: dict[str, dict] = {}
        metadata: dict = {}
        for source in config.sources:
            frame = loso_split(processed, source)
            data = atomic_write_parquet(frame, storage.scratch("loso") / f"{source}.parquet")
            members: dict[str, np.ndarray] = {}
            consistency: dict[str, float] = {}
            held = frame[frame["fold"] == HELD_OUT_FOLD]
            for model_spec in profile.models:
                out = storage.root / "loso" / source / model_spec.name
                launcher.run(context, "gpu_jobs.train", job_args(model_spec, HELD_OUT_FOLD, data, out, {"tta": True}),
                             extras={"loso_source": source, "model": model_spec.name}, **model_spec.launch_options)
                plain = pd.read_parquet(out / "oof.parquet").set_index("id").loc[held["id"], PROBS].to_numpy()
                swapped = pd.read_parquet(out / "oof_tta.parquet").set_index("id").loc[held["id"], PROBS].to_numpy()
                members[f"stage1/{model_spec.name}"] = plain
                members[f"stage1/{model_spec.name}+tta"] = swapped
                consistency[model_spec.name] = swap_consistency(plain, swapped)
            y = label_index(held)
            prior = np.bincount(label_index(frame[frame["fold"] == -1]), minlength=3) / int((frame["fold"] == -1).sum())
            weights = {n: w for n, w in spec["weights"].items() if n in members}
            final = ens.apply_temperature(ens.blend(members, weights), spec["temperature"])
            # the bundle's verdict on each pair vs its verdict on the same pair with A and B swapped
            final_swapped = ens.apply_temperature(ens.blend(swapped_members(members), weights), spec["temperature"])
            png = plots.reliability_diagram(y, final, storage.scratch("plots") / f"loso_{source}_reliability.png",
                                            f"LOSO {source}")
            results[source] = {
                "rows": len(held), "log_loss": ens.log_loss3(y, final), "accuracy": ens.accuracy(y, final),
                "per_class_loss": ens.per_class_loss(y, final),
                "swap_consistency": swap_consistency(final, final_swapped),
                "member_swap_consistency": consistency,
                "tie_rate_true": float(np.mean(y == 2)), "tie_rate_predicted_mean": float(final[:, 2].mean()),
                "train_class_prior_log_loss": ens.log_loss3(y, np.tile(prior, (len(y), 1))),
                "ablation": ablation_rows(y, members, weights, spec["temperature"], tie_bias),
                "by_subset": subset_rows(held, y, {"bundle": final, **members}),
            }
            metadata[f"{source}_log_loss"] = results[source]["log_loss"]
            metadata[f"{source}_accuracy"] = results[source]["accuracy"]
            metadata[f"{source}_swap_consistency"] = results[source]["swap_consistency"]
            metadata[f"{source}_reliability"] = mlflow.log_pipeline_artifact(context, png)
            context.log.info(f"LOSO {source}: log loss {results[source]['log_loss']:.4f}, "
                             f"accuracy {results[source]['accuracy']:.3f}")
        table = markdown_table(results)
        for source, report in results.items():
            if report["by_subset"]:
                table += "\n\n" + subset_table(source, report["by_subset"], "bundle")
        atomic_write_json(results, storage.root / "loso" / "results.json")
        (storage.root / "loso" / "ablation.md").write_text(table + "\n")
        metadata["ablation"] = dg.MetadataValue.md(table)
        metadata["results"] = dg.MetadataValue.json(results)
        return dg.MaterializeResult(metadata=metadata)

    return loso_evaluation

"""Leave-one-source-out (LOSO) evaluation: how the recipe does on human labels it never saw.

For each held-out labelled source S (default: the external human sets, PandaLM and LLMBar), every stage-1
member is retrained by the same `gpu_jobs.train` job on all other rows (rows sharing a prompt with S
removed) and predicts S; the members are blended with the stage-1 ensemble's weights and temperature,
which were fitted on other data. Reported per source: log loss, 3-way accuracy, per-class loss, swap
consistency (same verdict after swapping A and B), a reliability diagram, an ablation table
(each member, its TTA, uniform blend, fitted blend, + temperature, + a tie prior fitted out of sample, and the
calibration maps of `arena_pipeline.calibration`: a Davidson tie model fitted on stage-1 OOF, the tie prior
re-estimated by EM on the held-out file itself — the unlabelled file the bundle would meet — and shrinkage
toward the prior with its weight chosen on the *other* sources), and
the bundle and each member per subset of the source (its `subset` column, e.g. LLMBar's natural human
preference sets vs its adversarial instruction-following sets), which can tell very different stories.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline import calibration as cal
from arena_pipeline import blending as ens
from arena_pipeline import plots
from arena_pipeline.assets.ensembles import Member
from arena_pipeline.assets.oof import job_args
from arena_pipeline.profile import Profile
from arena_pipeline.data.folds import label_index
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json, atomic_write_parquet
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.schema import PROB_COLUMNS
from gpu_jobs.contract.ties import ties_possible, without_tie

EM_ROW = "+ tie prior re-estimated by EM on this file"
HELD_OUT_FOLD = 99  # the validation "fold" of a LOSO training job
PROBS = list(PROB_COLUMNS)
# LLMBar's natural human-preference sets vs its adversarial ones (the worse answer built to look better)
DEFAULT_PARTS = {"llmbar": {"natural": "^(?!.*Adversarial)", "adversarial": "Adversarial"}}


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
        twin = base_member(name) if name.endswith("+tta") else f"{name}+tta"
        out[name] = members[twin] if twin in members else members[name]
    return out


def _row(name: str, y: np.ndarray, p: np.ndarray) -> dict:
    return {"variant": name, "log_loss": ens.log_loss3(y, p), "accuracy": ens.accuracy(y, p),
            "tie_predicted_mean": float(p[:, 2].mean())}


def ablation_rows(y: np.ndarray, members: dict[str, np.ndarray], weights: dict[str, float], temperature: float,
                  tie_bias: float) -> list[dict]:
    rows = [_row(f"member {name}", y, p) for name, p in members.items()]
    rows.append(_row("uniform blend", y, ens.blend(members, {n: 1.0 for n in members})))
    used = {n: w for n, w in weights.items() if n in members}
    fitted = ens.blend(members, used)
    rows.append(_row("fitted blend (stage-1 weights)", y, fitted))
    rows += leave_one_member_out_rows(y, members, used)
    tempered = ens.apply_temperature(fitted, temperature)
    rows.append(_row("+ temperature", y, tempered))
    rows.append(_row("+ tie prior (fitted on stage-1 OOF)", y, ens.apply_tie_bias(tempered, tie_bias)))
    return rows


def base_member(name: str) -> str:
    """A member's model without its TTA twin mark (``stage1/x+tta`` -> ``stage1/x``)."""
    return name[: -len("+tta")] if name.endswith("+tta") else name


def leave_one_member_out_rows(y: np.ndarray, members: dict[str, np.ndarray], weights: dict[str, float]) -> list[dict]:
    """The fitted blend without each model (its TTA twin too), the other weights renormalised (all zero: the
    uniform blend of the rest), so the table shows the blend with and without every member."""
    rows = []
    for model in sorted({base_member(n) for n in members}):
        rest = {n: p for n, p in members.items() if base_member(n) != model}
        if not rest:
            continue
        rest_weights = {n: w for n, w in weights.items() if n in rest and w > 0} or {n: 1.0 for n in rest}
        rows.append(_row(f"fitted blend without {model}", y, ens.blend(rest, rest_weights)))
    return rows


def calibration_rows(y: np.ndarray, bundle: np.ndarray, tie_model: cal.DavidsonTieModel, train_tie: float,
                     shrink_weight: float) -> tuple[list[dict], dict]:
    """The bundle (tempered blend) under each calibration map; EM sees only the held-out probabilities."""
    adapted, em = cal.em_tie_prior(bundle, train_tie)
    shrunk = cal.shrink(bundle, shrink_weight, train_tie)
    both = cal.shrink(adapted, shrink_weight, em["tie_prior_estimated"])
    rows = [_row("+ Davidson tie model (fitted on stage-1 OOF)", y, tie_model.apply(bundle)),
            _row(EM_ROW, y, adapted),
            _row("+ shrinkage toward the prior (weight chosen on the other sources)", y, shrunk),
            _row("+ EM tie prior + that shrinkage", y, both)]
    return rows, em


def tie_table(results: dict[str, dict]) -> str:
    """Per source: true tie rate, the bundle's mean tie before and after EM, EM's estimate, the shrinkage weight."""
    lines = ["| source | tie rate (true) | bundle mean tie | EM tie prior (from training's) | bundle mean tie after EM "
             "| shrinkage weight |", "|---|---|---|---|---|---|"]
    for source, r in results.items():
        em = r["tie_prior_em"]
        after = next(row["tie_predicted_mean"] for row in r["ablation"] if row["variant"] == EM_ROW)
        lines.append(f"| {source} | {r['tie_rate_true']:.3f} | {r['tie_rate_predicted_mean']:.3f} | "
                     f"{em['tie_prior_estimated']:.3f} (from {em['tie_prior_train']:.3f}) | {after:.3f} | "
                     f"{r['shrinkage']['weight']:.2f} |")
    return "\n".join(lines)


def subset_labels(held: pd.DataFrame) -> pd.Series | None:
    """The held-out rows' ``subset`` column as strings ("" where empty), or None where the source has none."""
    return held["subset"].fillna("").astype(str) if "subset" in held.columns else None


def part_masks(held: pd.DataFrame, patterns: dict[str, str]) -> dict[str, np.ndarray]:
    """Rows of a held-out source whose ``subset`` matches each part's regex (parts with no rows left out)."""
    subsets = subset_labels(held)
    if not patterns or subsets is None:
        return {}
    masks = {name: subsets.str.contains(pattern, regex=True).to_numpy() for name, pattern in patterns.items()}
    return {name: mask for name, mask in masks.items() if mask.any()}


def subset_rows(held: pd.DataFrame, y: np.ndarray, predictions: dict[str, np.ndarray]) -> list[dict]:
    """Log loss and accuracy of each prediction on each value of the held-out rows' ``subset`` column.

    Rows without a subset (the column missing or empty) are not broken down: an empty list.
    """
    labels = subset_labels(held)
    if labels is None:
        return []
    subsets = labels.to_numpy()
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
    """One column pair (log loss, accuracy) per source and per part of a source, one line per variant."""
    columns = {}
    for source, r in results.items():
        columns[source] = r["ablation"]
        columns.update({f"{source} {name}": part["ablation"] for name, part in r.get("parts", {}).items()})
    lines = ["| variant | " + " | ".join(f"{c} log loss | {c} acc" for c in columns) + " |",
             "|---|" + "---|---|" * len(columns)]
    variants = [r["variant"] for r in next(iter(columns.values()))]
    for variant in variants:
        cells = []
        for c in columns:
            found = next((r for r in columns[c] if r["variant"] == variant), None)
            cells += [f"{found['log_loss']:.4f}", f"{found['accuracy']:.3f}"] if found else ["", ""]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loso_members(profile: Profile) -> tuple[list, dict[str, str]]:
    """The members LOSO retrains, and those it leaves out with the reason.

    A distillation student is left out: its soft targets are nested teacher predictions per arena fold, and a LOSO
    training set (every row but the held-out source) has no such targets, so its job would train the student as a
    plain model on the human labels and the row would be mislabelled. The blend rows renormalise the other weights.
    """
    left_out = {m.name: f"distillation student of {list(m.distill.teacher)}: LOSO has no nested teacher targets for "
                        "its training rows, so it is not retrained here" for m in profile.models if m.distill}
    return [m for m in profile.models if m.name not in left_out], left_out


def held_out_predictions(storage: ArenaStorage, profile: Profile, frame: pd.DataFrame, source: str,
                         models: list[str] | None = None) -> dict:
    """One held-out source's labels and each stage-1 member's prediction (plain and swapped) from its LOSO job
    (``models``: only these members; default every member of the profile)."""
    held = frame[frame["fold"] == HELD_OUT_FOLD]
    no_tie = ~ties_possible(held, source)  # a source without ties is scored without one (contract.ties)
    members: dict[str, np.ndarray] = {}
    consistency: dict[str, float] = {}
    for model_spec in (profile.models if models is None else [profile.model(m) for m in models]):
        out = storage.root / "loso" / source / model_spec.name
        plain, swapped = (without_tie(pd.read_parquet(out / name).set_index("id").loc[held["id"], PROBS].to_numpy(),
                                      no_tie) for name in ("oof.parquet", "oof_tta.parquet"))
        members[f"stage1/{model_spec.name}"] = plain
        members[f"stage1/{model_spec.name}+tta"] = swapped
        consistency[model_spec.name] = swap_consistency(plain, swapped)
    train_y = label_index(frame[frame["fold"] == -1])
    return {"held": held, "y": label_index(held), "members": members, "consistency": consistency,
            "prior": np.bincount(train_y, minlength=3) / len(train_y)}


def stage1_fit_rows(storage: ArenaStorage, profile: Profile, processed: pd.DataFrame) -> dict:
    """What the calibration maps are fitted on: the stage-1 ensemble's spec, its OOF blend, labels, members' OOF."""
    spec = json.loads(storage.ensemble("stage1_ensemble").read_text())
    oof = pd.read_parquet(storage.ensemble("stage1_ensemble").with_suffix(".oof.parquet"))
    members = {}
    for m in spec["members"]:  # the members the ensemble was fitted on (demo sizing may have left one out)
        member = Member(m["stage"], m["model"], m["tta"])
        frame = pd.concat([pd.read_parquet(member.oof_file(storage, fold)) for fold in profile.folds])
        members[member.name] = frame.set_index("id").loc[oof["id"], PROBS].to_numpy()
    return {"spec": spec, "p": oof[PROBS].to_numpy(), "members": members,
            "y": label_index(processed.set_index("id").loc[oof["id"]].reset_index())}


def loso_report(held_out: dict[str, dict], stage1: dict, plots_dir: Path,
                parts: dict[str, dict[str, str]] | None = None) -> tuple[dict[str, dict], dict[str, Path]]:
    """Score every held-out source: the bundle, the ablation rows, the calibration maps, subsets, reliability.

    ``parts`` (source -> part name -> regex on the ``subset`` column) gives a source's whole ablation again on
    each part of its rows (``results[source]["parts"]``, and a column each in the markdown table).

    The maps are fitted on the stage-1 OOF rows (arena-bench fold 0) or, for the shrinkage weight, on the other
    held-out sources; nothing is fitted on the source it is scored on except EM's own estimate of its tie rate,
    which uses no labels."""
    parts = DEFAULT_PARTS if parts is None else parts
    spec, stage1_p, stage1_y = stage1["spec"], stage1["p"], stage1["y"]
    tie_bias = ens.fit_tie_bias(stage1_p, stage1_y)
    tie_model = cal.DavidsonTieModel.fit(stage1_p, stage1_y)
    train_tie = float(stage1_p[:, 2].mean())  # the tie rate the bundle's probabilities assume
    for source, h in held_out.items():
        h["weights"] = {n: w for n, w in spec["weights"].items() if n in h["members"]}
        if not any(w > 0 for w in h["weights"].values()):
            weighted = sorted(n for n, w in spec["weights"].items() if w > 0)
            raise dg.Failure(f"LOSO {source}: the stage-1 ensemble's weight is all on members LOSO does not retrain "
                             f"({weighted}; a distillation student is left out, see the warning above), so there is "
                             "no bundle to score; give a retrained member weight or evaluate the members alone")
        h["final"] = ens.apply_temperature(ens.blend(h["members"], h["weights"]), spec["temperature"])
    stacked = [n for n in stage1["members"] if all(n in h["members"] for h in held_out.values())]
    stacker = cal.DavidsonTieModel.fit([stage1["members"][n] for n in stacked], stage1_y) if stacked else None
    results: dict[str, dict] = {}
    pngs: dict[str, Path] = {}
    for source, h in held_out.items():
        y, held, members, final, weights = h["y"], h["held"], h["members"], h["final"], h["weights"]
        # confidence control chosen out of source: on the other held-out sources and the stage-1 OOF rows
        others = {s: (o["y"], o["final"]) for s, o in held_out.items() if s != source}
        shrink_weight, shrink_curve = cal.choose_shrinkage({**others, "stage1_oof": (stage1_y, stage1_p)}, train_tie)
        def variant_rows(mask: np.ndarray) -> tuple[list[dict], dict]:
            """Every ablation and calibration row on the rows in ``mask`` (EM sees only those rows' probabilities)."""
            part = {n: p[mask] for n, p in members.items()}
            calibrated, em = calibration_rows(y[mask], final[mask], tie_model, train_tie, shrink_weight)
            if stacker is not None:
                calibrated.append(_row("Davidson stacker over the members (fitted on stage-1 OOF)", y[mask],
                                       stacker.apply([part[n] for n in stacked])))
            return ablation_rows(y[mask], part, weights, spec["temperature"], tie_bias) + calibrated, em

        rows, em = variant_rows(np.ones(len(y), dtype=bool))
        by_part = {name: (mask, variant_rows(mask)[0]) for name, mask in part_masks(held, parts.get(source, {})).items()}
        # the bundle's verdict on each pair vs its verdict on the same pair with A and B swapped
        final_swapped = ens.apply_temperature(ens.blend(swapped_members(members), weights), spec["temperature"])
        pngs[source] = plots.reliability_diagram(y, final, plots_dir / f"loso_{source}_reliability.png",
                                                 f"LOSO {source}")
        results[source] = {
            "rows": len(held), "log_loss": ens.log_loss3(y, final), "accuracy": ens.accuracy(y, final),
            "per_class_loss": ens.per_class_loss(y, final),
            "swap_consistency": swap_consistency(final, final_swapped),
            "member_swap_consistency": h["consistency"],
            "tie_rate_true": float(np.mean(y == 2)), "tie_rate_predicted_mean": float(final[:, 2].mean()),
            "train_class_prior_log_loss": ens.log_loss3(y, np.tile(h["prior"], (len(y), 1))),
            "ablation": rows,
            "parts": {name: {"rows": int(mask.sum()), "ablation": part_rows} for name, (mask, part_rows) in by_part.items()},
            "tie_prior_em": em, "davidson_tie_model": tie_model.to_dict(),
            "davidson_stacker": {"members": stacked, **(stacker.to_dict() if stacker else {})},
            "shrinkage": {"weight": shrink_weight, "chosen_on": sorted(others) + ["stage1_oof"], "curve": shrink_curve},
            "by_subset": subset_rows(held, y, {"bundle": final, **members}),
        }
    return results, pngs


def report_markdown(results: dict[str, dict]) -> str:
    table = markdown_table(results) + "\n\n" + tie_table(results)
    for source, report in results.items():
        if report["by_subset"]:
            table += "\n\n" + subset_table(source, report["by_subset"], "bundle")
    return table


def build_evaluation_asset(profile: Profile) -> dg.AssetsDefinition:
    class LosoConfig(dg.Config):
        sources: list[str] = ["pandalm_testset_v1", "llmbar"]
        # source -> part -> regex on its `subset` column: the ablation again on each part's rows
        parts: dict[str, dict[str, str]] = DEFAULT_PARTS

    @dg.asset(group_name="evaluation", deps=["stage1_ensemble"], pool="gpu", kinds={"pytorch"},
              description="Leave-one-source-out evaluation of the stage-1 recipe on human-labelled sources.")
    def loso_evaluation(context: dg.AssetExecutionContext, config: LosoConfig, storage: ArenaStorage,
                        launcher: Launcher, mlflow: MlflowTracking, processed_folds: Path):
        processed = pd.read_parquet(processed_folds)
        members, left_out = loso_members(profile)
        for name, reason in left_out.items():
            context.log.warning(f"LOSO leaves out {name}: {reason}")
        held_out: dict[str, dict] = {}
        for source in config.sources:
            frame = loso_split(processed, source)
            data = atomic_write_parquet(frame, storage.scratch("loso") / f"{source}.parquet")
            for model_spec in members:
                out = storage.root / "loso" / source / model_spec.name
                launcher.run(context, "gpu_jobs.train", job_args(model_spec, HELD_OUT_FOLD, data, out, {"tta": True}),
                             extras={"loso_source": source, "model": model_spec.name}, **model_spec.launch_options)
            held_out[source] = held_out_predictions(storage, profile, frame, source, [m.name for m in members])
        results, pngs = loso_report(held_out, stage1_fit_rows(storage, profile, processed), storage.scratch("plots"),
                                    config.parts)
        metadata: dict = {}
        for source, r in results.items():
            metadata[f"{source}_log_loss"] = r["log_loss"]
            metadata[f"{source}_accuracy"] = r["accuracy"]
            metadata[f"{source}_swap_consistency"] = r["swap_consistency"]
            metadata[f"{source}_reliability"] = mlflow.log_pipeline_artifact(context, pngs[source])
            context.log.info(f"LOSO {source}: log loss {r['log_loss']:.4f}, accuracy {r['accuracy']:.3f}; tie rate "
                             f"true {r['tie_rate_true']:.3f}, bundle {r['tie_rate_predicted_mean']:.3f}, EM estimate "
                             f"{r['tie_prior_em']['tie_prior_estimated']:.3f}; shrinkage weight chosen elsewhere "
                             f"{r['shrinkage']['weight']:.2f}")
        for r in results.values():
            r["left_out"] = left_out
        table = report_markdown(results)
        atomic_write_json(results, storage.root / "loso" / "results.json")
        (storage.root / "loso" / "ablation.md").write_text(table + "\n")
        metadata["ablation"] = dg.MetadataValue.md(table)
        metadata["results"] = dg.MetadataValue.json(results)
        return dg.MaterializeResult(metadata=metadata)

    return loso_evaluation

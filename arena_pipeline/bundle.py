"""The predictor bundle: a self-contained folder that scores new pairs without the Dagster instance.

Layout::

    bundle.json                      members, weights, temperature, folds, configs, data versions
    models/<stage>/<model>/fold<k>/  the trained model folders (weights/adapter + head + tokenizer + config)

Scoring: each member's folds are averaged, members are blended with the ensemble weights, the blend is
tempered — exactly the arithmetic of the final ensemble asset, so the bundle reproduces the pipeline's
own predictions for the same rows. Optionally (``adapt_tie_prior``) the tie prior is then re-estimated on the
scored file by EM (``arena_pipeline.calibration.em_tie_prior``), starting from the tie rate the blend
assumes (``oof_mean_tie`` in bundle.json); off by default (see the README's accuracy section for why).

Quantised scoring (``quantize``: none | int8 | int4, see ``gpu_jobs.quantize``): bundle.json's ``quantization``
holds the mode the bundle was built for and, per member fold, how that fold was quantised (method, device,
reason) when it scored the submission (or, without one, how it would be on the building machine, ``planned``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from arena_pipeline import calibration as cal
from arena_pipeline import blending as ens
from gpu_jobs.contract.atomic import publish_dir
from gpu_jobs.contract.schema import LABEL_COLUMNS
from gpu_jobs.contract.ties import ties_possible, without_tie

SUBMISSION_COLUMNS = list(LABEL_COLUMNS)  # the Kaggle submission names the probabilities so


class BundleError(ValueError):
    pass


def write_bundle(target: Path, spec: dict, model_dirs: dict[tuple[str, str, int], Path], extra: dict) -> Path:
    """Copy the model folders of the members with weight > 0 and write bundle.json (built aside, then renamed)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    models: dict[str, dict[str, str]] = {}
    for (stage, model, fold), src in sorted(model_dirs.items()):
        rel = Path("models") / stage / model / f"fold{fold}"
        shutil.copytree(src, partial / rel)
        models.setdefault(f"{stage}/{model}", {})[str(fold)] = str(rel)
    manifest = {**spec, "models": models, **extra, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (partial / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return publish_dir(partial, target)


def quantize_mode(manifest: dict, requested: str | None = None) -> str:
    """The quantisation to score with: the one asked for, else the bundle's own, else none."""
    return requested or manifest.get("quantization", {}).get("mode", "none")


def fold_key(bundle_dir: Path, model_dir: Path) -> str:
    """``stage/model/foldK`` of a member fold's folder inside the bundle."""
    stage, model, fold = Path(model_dir).relative_to(Path(bundle_dir) / "models").parts
    return f"{stage}/{model}/{fold}"


def planned_quantization(manifest: dict, mode: str, device_type: str) -> dict:
    """bundle.json's ``quantization`` before any scoring: how each member fold would be quantised on a device."""
    from gpu_jobs.quantize import plan

    members = {}
    for key, folds in sorted(manifest["models"].items()):
        family = manifest["configs"][key]["family"]
        for fold in sorted(folds):
            members[f"{key}/fold{fold}"] = {**plan(family, mode, device_type), "planned": True}
    return {"mode": mode, "members": members}


def record_quantization(bundle_dir: Path, mode: str, records: dict[str, dict]) -> dict:
    """Write how each member fold was quantised when it scored into bundle.json (atomically); return it."""
    from gpu_jobs.contract.atomic import atomic_write_text

    manifest = load_manifest(bundle_dir)
    manifest["quantization"] = {"mode": mode, "members": dict(sorted(records.items()))}
    atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), Path(bundle_dir) / "bundle.json")
    return manifest["quantization"]


def load_manifest(bundle_dir: Path) -> dict:
    path = Path(bundle_dir) / "bundle.json"
    if not path.exists():
        raise BundleError(f"{bundle_dir}: not a predictor bundle (no bundle.json). Run the pipeline "
                          "(`arena-pipeline demo`) or pass --bundle pointing at a bundle folder.")
    return json.loads(path.read_text())


# (model folder, tta) -> (probabilities, TTA probabilities or None) for the rows being scored
Predict = Callable[[Path, bool], tuple[np.ndarray, "np.ndarray | None"]]


def score_frame(bundle_dir: Path, frame: pd.DataFrame, progress=None, predict: Predict | None = None,
                quantize: str | None = None, records: dict | None = None) -> np.ndarray:
    """(n, 3) probabilities [A wins, B wins, tie] for the rows of ``frame`` (data contract columns).

    ``predict`` runs one member fold; default: in this process (the `predict` CLI), quantised by ``quantize``
    (default: the bundle's own mode), each fold's quantisation record put in ``records`` under
    ``stage/model/foldK``. The `predictor_bundle` asset passes one that launches `gpu_jobs.predict` as a job,
    like every other model job of the graph."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    if predict is None:
        from gpu_jobs.predict import predict_frame

        mode = quantize_mode(manifest, quantize)

        def predict(model_dir: Path, tta: bool):
            record: dict = {}
            out = predict_frame(model_dir, frame, tta=tta, quantize=mode, record=record)
            if records is not None:
                records[fold_key(bundle_dir, model_dir)] = record
            return out

    weights = {name: w for name, w in manifest["weights"].items() if w > 0}
    members = [m for m in manifest["members"] if m["name"] in weights]
    probs: dict[str, np.ndarray] = {}
    for key in sorted({f"{m['stage']}/{m['model']}" for m in members}):
        want_tta = any(f"{m['stage']}/{m['model']}" == key and m["tta"] for m in members)
        plain, swapped = [], []
        for fold, rel in sorted(manifest["models"][key].items()):
            p, p_tta = predict(bundle_dir / rel, want_tta)
            plain.append(p)
            if want_tta:
                swapped.append(p_tta)
            if progress:
                progress(key, fold)
        for m in members:
            if f"{m['stage']}/{m['model']}" == key:
                probs[m["name"]] = np.mean(swapped if m["tta"] else plain, axis=0)
    blended = ens.apply_temperature(ens.blend(probs, weights), manifest["temperature"])
    # rows whose labelling has no tie (a ties_possible = false column in the scored file) get none
    return without_tie(blended / blended.sum(axis=1, keepdims=True), ~ties_possible(frame, "the scored file"))


def training_tie_rate(manifest: dict, bundle_dir: Path) -> float:
    """The tie rate the bundle's blend assumes (where EM tie-prior adaptation starts from)."""
    if "oof_mean_tie" not in manifest:
        raise BundleError(f"{bundle_dir}/bundle.json has no 'oof_mean_tie' (built before tie-prior adaptation "
                          "existed): rebuild the bundle (materialise final_ensemble and predictor_bundle)")
    return float(manifest["oof_mean_tie"])


def adapt_tie_prior(bundle_dir: Path, probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """The scored file's own tie rate by EM, and the probabilities under it (A/B swap consistency kept)."""
    return cal.em_tie_prior(probs, training_tie_rate(load_manifest(bundle_dir), bundle_dir))


def submission_frame(ids, probs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"id": list(ids), **{c: probs[:, i] for i, c in enumerate(SUBMISSION_COLUMNS)}})

"""predictor_bundle: the final ensemble packed with its models, plus a Kaggle submission when configured.

The submission's rows are scored by `gpu_jobs.predict` jobs (one per member fold, through the launcher, in the
`gpu` pool, like every other model job); only the blend arithmetic runs in the Dagster step. The `predict` CLI
scores the same bundle in its own process.
"""


import json
from pathlib import Path

import dagster as dg
import pandas as pd
import yaml

from arena_pipeline.bundle import (Predict, adapt_tie_prior, fold_key, load_manifest, planned_quantization,
                                   record_quantization, score_frame, submission_frame, write_bundle)
from arena_pipeline.profile import Profile
from arena_pipeline.data.clean import clean_frame
from arena_pipeline.data.load import read_table
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_parquet, file_version, refuse_overwrite
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.schema import PROB_COLUMNS
from gpu_jobs.predict import default_device, quantization_path, tta_path

PROBS = list(PROB_COLUMNS)


def launched_predict(context: dg.AssetExecutionContext, launcher: Launcher, profile: Profile, bundle: Path,
                     frame: pd.DataFrame, scratch: Path, quantize: str = "none",
                     records: dict | None = None) -> Predict:
    """A ``Predict`` that scores the frame with `gpu_jobs.predict` launched as a job (in the `gpu` pool, on the
    launcher's backend), one job per member fold of the bundle, and reads its output back in row order; with
    ``quantize`` the job quantises its model and each job's quantisation record lands in ``records``."""
    data = atomic_write_parquet(frame, scratch / "rows.parquet")
    ids = frame["id"].astype(str)

    def predict(model_dir: Path, tta: bool):
        stage, model, fold = Path(model_dir).relative_to(bundle / "models").parts
        out = scratch / f"{stage}_{model}_{fold}.parquet"
        args = ["--model-dir", str(model_dir), "--data", str(data), "--output", str(out)] + (["--tta"] if tta else [])
        if quantize != "none":
            args += ["--quantize", quantize]
        launcher.run(context, "gpu_jobs.predict", args, extras={"model": model, "fold": fold, "bundle": str(bundle)},
                     **profile.model(model).launch_options)
        if records is not None and quantize != "none":
            records[fold_key(bundle, model_dir)] = json.loads(quantization_path(out).read_text())
        read = lambda path: pd.read_parquet(path).set_index("id").loc[ids, PROBS].to_numpy()  # noqa: E731
        return read(out), (read(tta_path(out)) if tta else None)

    return predict


def build_bundle_asset(profile: Profile) -> dg.AssetsDefinition:
    class BundleConfig(dg.Config):
        test_path: str = profile.test_path  # a Kaggle-format test.csv (id, prompt, response_a, response_b) to score
        max_test_rows: int = profile.max_test_rows  # 0: every row (what a submission needs)
        adapt_tie_prior: bool = False  # re-estimate the test file's tie rate by EM (calibration.em_tie_prior)
        # none | int8 | int4 (gpu_jobs.quantize): int8 = dynamic int8 on a CPU, bitsandbytes 8-bit decoders on CUDA
        quantize: str = "none"

    @dg.asset(group_name="ensembles", deps=["final_ensemble"], kinds={"folder"}, pool="gpu",
              description="Self-contained predictor (models, weights, temperature, configs, data versions) that "
                          "scores new files without Dagster; writes submission.csv for a configured test file.")
    def predictor_bundle(context: dg.AssetExecutionContext, config: BundleConfig, storage: ArenaStorage,
                         mlflow: MlflowTracking, launcher: Launcher, processed_folds: Path):
        submission = storage.bundle_dir / "submission.csv"
        # the bundle folder is replaced whole: a test file inside it would be deleted before it is read
        refuse_overwrite([("submission", submission), ("bundle folder", storage.bundle_dir)],
                         [("test_path", config.test_path)])
        spec = json.loads(storage.ensemble("final_ensemble").read_text())
        used = {(m["stage"], m["model"]) for m in spec["members"] if spec["weights"].get(m["name"], 0) > 0}
        model_dirs, configs, versions = {}, {}, {}
        for stage, model in sorted(used):
            for fold in profile.folds:
                job_dir = storage.job_dir(stage, model, fold)
                model_dirs[(stage, model, fold)] = job_dir / "model"
                configs[f"{stage}/{model}"] = yaml.safe_load((job_dir / "model" / "config.yaml").read_text())
                versions[f"{stage}/{model}/fold{fold}"] = json.loads((job_dir / "job.json").read_text())["data_version"]
        versions["processed_folds"] = file_version(processed_folds)
        bundle = write_bundle(storage.bundle_dir, spec, model_dirs,
                              {"configs": configs, "data_versions": versions, "profile": profile.name})
        # how each member fold would be quantised on this machine, replaced below by what the scoring jobs report
        quantization = planned_quantization(load_manifest(bundle), config.quantize, default_device().type)
        record_quantization(bundle, config.quantize, quantization["members"])
        metadata = {"path": dg.MetadataValue.path(str(bundle)), "members_used": dg.MetadataValue.json(sorted(
            f"{s}/{m}" for s, m in used)), "final_log_loss_cv": spec["fitted_blend_log_loss_cv"],
            "final_log_loss_in_sample": spec["fitted_blend_log_loss_in_sample"],
            "best_member_log_loss": min(spec["member_log_loss"].values()),
            "class_prior_log_loss": spec["class_prior_log_loss"]}
        if config.test_path:
            raw = read_table(config.test_path)
            raw = raw.head(config.max_test_rows) if config.max_test_rows else raw
            frame, report = clean_frame(raw, file=config.test_path, labelled=False, dedupe=False)
            records: dict = {}
            probs = score_frame(bundle, frame, predict=launched_predict(context, launcher, profile, bundle, frame,
                                                                        storage.scratch("bundle_scoring"),
                                                                        config.quantize, records))
            if config.quantize != "none":
                quantization = record_quantization(bundle, config.quantize, records)
            if config.adapt_tie_prior:
                probs, em = adapt_tie_prior(bundle, probs)
                context.log.info(f"tie prior by EM on {config.test_path}: {em['tie_prior_train']:.3f} -> "
                                 f"{em['tie_prior_estimated']:.3f} {em['reason']}")
                metadata["tie_prior_em"] = dg.MetadataValue.json(em)
            submission_frame(frame["id"], probs).to_csv(submission, index=False)
            metadata.update({"submission": dg.MetadataValue.path(str(submission)), "submission_rows": len(frame),
                             "test_cleaning": dg.MetadataValue.json(report.to_metadata())})
        metadata["quantization"] = dg.MetadataValue.json(quantization)
        version, link = mlflow.register_bundle(context, bundle, {
            "final_log_loss_cv": spec["fitted_blend_log_loss_cv"],
            "final_log_loss_in_sample": spec["fitted_blend_log_loss_in_sample"]})
        metadata.update({"mlflow_model_version": str(version), "mlflow_run": dg.MetadataValue.url(link)})
        context.log.info(f"bundle written to {bundle}; registered as arena-pipeline-predictor v{version}")
        return dg.MaterializeResult(metadata=metadata)

    return predictor_bundle

"""predictor_bundle refuses a test_path its own writes would destroy, before it writes anything."""

import hashlib
import shutil

import dagster as dg
import pytest

from arena_pipeline.assets.bundle import build_bundle_asset
from arena_pipeline.config import SHIPPED, SMOKE
from arena_pipeline.resources.storage import ArenaStorage, OverwriteError
from arena_pipeline.resources.tracking import MlflowTracking


@pytest.mark.parametrize("case", ["last_submission", "symlink_into_bundle"])
def test_bundle_refuses_a_test_path_inside_the_bundle(tmp_path, case):
    storage = ArenaStorage(home=str(tmp_path / "arena"))
    storage.bundle_dir.mkdir(parents=True)
    target = storage.bundle_dir / "submission.csv"
    shutil.copy(SHIPPED / "pandalm_test.parquet", target)  # real bytes; only their identity matters here
    test_path = target
    if case == "symlink_into_bundle":
        test_path = tmp_path / "test.csv"
        test_path.symlink_to(target)
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    with pytest.raises(OverwriteError, match="test_path") as err:
        dg.materialize([build_bundle_asset(SMOKE)],
                       resources={"storage": storage,
                                  "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")},
                       run_config={"ops": {"predictor_bundle": {"config": {"test_path": str(test_path)}}}})
    assert str(target) in str(err.value) and str(test_path) in str(err.value)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in storage.bundle_dir.parent.iterdir()) == ["bundle"]  # nothing written beside it

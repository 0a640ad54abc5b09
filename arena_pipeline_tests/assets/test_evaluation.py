"""Leave-one-source-out evaluation: the split is leak-free, and the asset reports every source."""

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from arena_pipeline import calibration as cal
from arena_pipeline import blending as ens
from arena_pipeline.assets.evaluation import (DEFAULT_PARTS, HELD_OUT_FOLD, calibration_rows, leave_one_member_out_rows,
                                              loso_members, loso_report, loso_split, markdown_table, part_masks, subset_rows,
                                              subset_table,
                                              swap_consistency, swapped_members)
from arena_pipeline.profile import SMOKE


def test_loso_split_holds_out_one_source_and_its_prompts():
    frame = pd.DataFrame({
        "id": list("abcdef"), "source": ["x", "x", "pandalm", "pandalm", "llmbar", "x"],
        "group": ["p1", "p2", "p1", "p3", "p4", "p3"], "fold": [0, 1, -1, -1, -1, 2],
    })
    split = loso_split(frame, "pandalm")
    assert split.loc[split["fold"] == HELD_OUT_FOLD, "id"].tolist() == ["c", "d"]
    train = split[split["fold"] == -1]
    assert train["id"].tolist() == ["b", "e"]  # rows sharing prompt p1/p3 with the held-out source are gone
    with pytest.raises(dg.Failure, match="no rows of source 'nope'"):
        loso_split(frame, "nope")


def test_swap_consistency():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    assert swap_consistency(p, p) == 1.0
    assert swap_consistency(p, p[:, [1, 0, 2]]) == 0.0


def test_swapped_view_of_a_blend_exchanges_tta_twins():
    plain = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])  # a position-biased member: always "A"
    twin = np.array([[0.3, 0.6, 0.1], [0.4, 0.5, 0.1]])  # the same member on swapped pairs, permuted back
    steady = np.array([[0.2, 0.7, 0.1], [0.7, 0.2, 0.1]])  # no TTA twin: taken as swap-equivariant
    members = {"m": plain, "m+tta": twin, "f": steady}
    swapped = swapped_members(members)
    assert swapped["m"] is twin and swapped["m+tta"] is plain and swapped["f"] is steady
    # only the biased member: its verdict flips on every swapped pair; with its twin it is consistent
    assert swap_consistency(members["m"], swapped["m"]) == 0.0
    both = 0.5 * (members["m"] + members["m+tta"])
    assert swap_consistency(both, 0.5 * (swapped["m"] + swapped["m+tta"])) == 1.0


def test_subset_rows_score_each_subset_on_its_own_rows():
    held = pd.DataFrame({"subset": ["nat", "adv", "nat", None, "adv"]})
    y = np.array([0, 1, 1, 2, 0])
    good = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    rows = subset_rows(held, y, {"bundle": good})
    assert [(r["subset"], r["rows"]) for r in rows] == [("adv", 2), ("nat", 2)]  # the row without a subset is left out
    adv, nat = rows
    assert nat["bundle"]["accuracy"] == 1.0 and nat["bundle"]["log_loss"] == pytest.approx(-np.log(0.8))
    assert adv["bundle"]["accuracy"] == 0.5
    assert adv["bundle"]["log_loss"] == pytest.approx(ens.log_loss3(y[[1, 4]], good[[1, 4]]))
    assert adv["tie_rate_true"] == 0.0
    assert "| adv | 2 | " in subset_table("llmbar", rows, "bundle")
    assert subset_rows(pd.DataFrame({"x": [1]}), np.array([0]), {"bundle": good[:1]}) == []


@pytest.mark.slow
def test_loso_evaluation_on_smoke_run(smoke_run, monkeypatch):
    defs = smoke_run["defs"]
    job = defs.resolve_job_def("evaluation_job")
    monkeypatch.setenv("DAGSTER_HOME", str(smoke_run["home"]))
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success
    results = json.loads((smoke_run["storage"].root / "loso" / "results.json").read_text())
    assert set(results) == {"pandalm_testset_v1", "llmbar"}
    for source, report in results.items():
        assert report["rows"] == SMOKE.max_external_rows
        assert 0.3 < report["log_loss"] < 2.0 and 0 <= report["accuracy"] <= 1
        assert 0 <= report["swap_consistency"] <= 1
        variants = [r["variant"] for r in report["ablation"]]
        assert "member stage1/features" in variants and "+ temperature" in variants
        assert {f"fitted blend without stage1/{m.name}" for m in SMOKE.models} <= set(variants)
        assert {"+ Davidson tie model (fitted on stage-1 OOF)", "+ tie prior re-estimated by EM on this file",
                "+ shrinkage toward the prior (weight chosen on the other sources)",
                "Davidson stacker over the members (fitted on stage-1 OOF)"} <= set(variants)
        assert "stage1/features" in report["davidson_stacker"]["members"]
        em = report["tie_prior_em"]
        assert em["rows"] == report["rows"] and 0.01 <= em["tie_prior_estimated"] <= 0.5
        # the shrinkage weight of a source is chosen without it
        assert source not in report["shrinkage"]["chosen_on"] and "stage1_oof" in report["shrinkage"]["chosen_on"]
    assert results["llmbar"]["tie_rate_true"] == 0.0
    by_subset = results["llmbar"]["by_subset"]  # LLMBar rows carry their subset; PandaLM rows have none
    assert by_subset and sum(r["rows"] for r in by_subset) == results["llmbar"]["rows"]
    assert {"bundle", "stage1/features"} <= set(by_subset[0]) and results["pandalm_testset_v1"]["by_subset"] == []
    assert results["pandalm_testset_v1"]["parts"] == {}  # the default parts split LLMBar only
    assert sum(part["rows"] for part in results["llmbar"]["parts"].values()) == results["llmbar"]["rows"]
    table = (smoke_run["storage"].root / "loso" / "ablation.md").read_text()
    assert table.startswith("| variant |") and "fitted blend" in table and "| llmbar subset |" in table
    assert "| source | tie rate (true) |" in table


def test_blend_without_each_member_drops_it_and_its_tta_twin():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3  # right and confident
    noise = rng.dirichlet([1, 1, 1], size=200)
    members = {"stage1/good": good, "stage1/good+tta": good, "stage1/noise": noise}
    rows = {r["variant"]: r for r in leave_one_member_out_rows(y, members, {"stage1/good": 0.5, "stage1/noise": 0.5})}
    assert set(rows) == {"fitted blend without stage1/good", "fitted blend without stage1/noise"}
    # without `good` (and its twin) only the noise is left; without the noise, only `good` (its weight renormalised)
    assert rows["fitted blend without stage1/good"]["log_loss"] == pytest.approx(ens.log_loss3(y, noise))
    assert rows["fitted blend without stage1/noise"]["log_loss"] == pytest.approx(ens.log_loss3(y, good))
    # a remaining member whose weight was 0: the uniform blend of what is left
    zero = leave_one_member_out_rows(y, {"a": good, "b": noise}, {"a": 1.0, "b": 0.0})
    assert zero[0]["variant"] == "fitted blend without a"
    assert zero[0]["log_loss"] == pytest.approx(ens.log_loss3(y, noise))


def test_calibration_rows_score_each_map_on_the_held_out_rows():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([4, 4, 2], size=300)
    y = np.array([rng.choice(3, p=row) for row in p])
    rows, em = calibration_rows(y, p, cal.DavidsonTieModel(), float(p[:, 2].mean()), 0.0)
    assert len(rows) == 4 and em["adapted"]
    davidson, _, shrunk, _ = rows
    # identity tie model and zero shrinkage leave the bundle as it is
    assert davidson["log_loss"] == pytest.approx(ens.log_loss3(y, p), abs=1e-9)
    assert shrunk["log_loss"] == pytest.approx(ens.log_loss3(y, p), abs=1e-9)
    assert shrunk["tie_predicted_mean"] == pytest.approx(p[:, 2].mean())


def test_llmbar_natural_and_adversarial_parts_get_the_whole_ablation(tmp_path):
    """The default parts split LLMBar by its subset names; each part's rows are the source's rows scored on it."""
    rng = np.random.default_rng(2)
    subsets = ["LLMBar/Natural", "Processed/MT-Bench", "LLMBar/Adversarial/Neighbor", "LLMBar/Adversarial/GPTInst"] * 30
    held = pd.DataFrame({"subset": subsets})
    masks = part_masks(held, DEFAULT_PARTS["llmbar"])
    assert masks["natural"].sum() == 60 and masks["adversarial"].sum() == 60
    assert not (masks["natural"] & masks["adversarial"]).any()
    assert part_masks(pd.DataFrame({"x": [1]}), DEFAULT_PARTS["llmbar"]) == {}  # no subset column: no parts

    y = rng.integers(0, 2, len(held))  # A or B, no ties, like LLMBar
    members = {"stage1/a": rng.dirichlet([2, 2, 1], size=len(y)), "stage1/b": rng.dirichlet([2, 2, 1], size=len(y))}
    held_out = {"llmbar": {"held": held, "y": y, "members": members, "consistency": {}, "prior": np.ones(3) / 3}}
    oof_y = rng.integers(0, 3, 200)
    stage1 = {"spec": {"weights": {"stage1/a": 0.7, "stage1/b": 0.3}, "temperature": 1.0},
              "p": rng.dirichlet([3, 3, 2], size=200), "y": oof_y,
              "members": {"stage1/a": rng.dirichlet([2, 2, 1], size=200)}}
    results, _ = loso_report(held_out, stage1, tmp_path)
    parts = results["llmbar"]["parts"]
    assert {name: part["rows"] for name, part in parts.items()} == {"natural": 60, "adversarial": 60}
    whole = [r["variant"] for r in results["llmbar"]["ablation"]]
    for name, part in parts.items():
        assert [r["variant"] for r in part["ablation"]] == whole
        row = next(r for r in part["ablation"] if r["variant"] == "member stage1/b")
        assert row["log_loss"] == pytest.approx(ens.log_loss3(y[masks[name]], members["stage1/b"][masks[name]]))
    header = markdown_table(results).splitlines()[0]
    assert "| llmbar natural log loss | llmbar natural acc | llmbar adversarial log loss |" in header
    # no parts asked for: the source alone
    assert loso_report(held_out, stage1, tmp_path, parts={})[0]["llmbar"]["parts"] == {}
    # every weight on a member LOSO left out (a student): a specific failure, not the blend's generic one
    only_student = {**stage1, "spec": {"weights": {"stage1/student": 1.0, "stage1/a": 0.0}, "temperature": 1.0}}
    with pytest.raises(dg.Failure, match=r"LOSO llmbar: the stage-1 ensemble's weight is all on members LOSO does "
                                         r"not retrain \(\['stage1/student'\]"):
        loso_report(held_out, only_student, tmp_path)


def test_a_distillation_student_is_left_out_of_loso_with_its_reason():
    """A LOSO training set has no nested teacher targets: the student would train as a plain model under its name."""
    from pathlib import Path

    from arena_pipeline.profile import load_profile

    profile = load_profile(str(Path(__file__).parent / "profiles" / "distill_smoke.yaml"))
    students = {m.name for m in profile.models if m.distill}
    members, left_out = loso_members(profile)
    assert students and set(left_out) == students
    assert {m.name for m in members} == {m.name for m in profile.models} - students
    assert all("nested teacher targets" in reason for reason in left_out.values())
    assert loso_members(SMOKE) == (list(SMOKE.models), {})

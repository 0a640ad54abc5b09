"""Tests of ``gpu_jobs.contract.ties``: reading the column, scoring without a tie, the EM targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpu_jobs.contract.swap import SWAP_PERMUTATION
from gpu_jobs.contract.ties import TIES_COLUMN, conditional_targets, ties_possible, without_tie


def test_missing_column_and_empty_cells_mean_ties_were_possible():
    assert ties_possible(pd.DataFrame({"id": ["a", "b"]})).tolist() == [True, True]
    frame = pd.DataFrame({"id": list("abcdefg"), TIES_COLUMN: [True, False, None, np.nan, "false", "No", 0]})
    assert ties_possible(frame).tolist() == [True, False, True, True, False, False, False]


def test_bad_value_names_the_source_row_and_column():
    frame = pd.DataFrame({"id": ["r1", "r2"], TIES_COLUMN: [True, "maybe"]})
    with pytest.raises(ValueError, match=r"pairs\.csv: row id 'r2': column 'ties_possible' must be true or false"):
        ties_possible(frame, "pairs.csv")


def test_without_tie_keeps_the_a_to_b_ratio_and_the_swap():
    p = np.array([[0.3, 0.1, 0.6], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    q = without_tie(p, [True, True, False])
    np.testing.assert_allclose(q, [[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [0.5, 0.3, 0.2]])
    np.testing.assert_allclose(without_tie(p[:, SWAP_PERMUTATION], [True, True, False]), q[:, SWAP_PERMUTATION])
    np.testing.assert_allclose(p, [[0.3, 0.1, 0.6], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])  # the input is not changed


def test_conditional_targets_give_the_gradient_of_the_conditional_likelihood():
    """At the current model, d/dz of the EM-weighted cross-entropy equals d/dz of -log p_y / (p_A + p_B)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.eye(3)[rng.integers(0, 2, 50)]  # A or B wins: these rows cannot be ties
    t, factor = conditional_targets(y, p[:, 2], np.ones(50, dtype=bool))
    np.testing.assert_allclose(t.sum(1), 1.0)
    grad_em = factor[:, None] * (p - t)  # d/dz of factor * cross-entropy(t, softmax z)
    pab = p[:, :2] / p[:, :2].sum(1, keepdims=True)
    grad_conditional = np.concatenate([pab - y[:, :2], np.zeros((50, 1))], axis=1)  # softmax over A, B only
    np.testing.assert_allclose(grad_em, grad_conditional, atol=1e-12)
    untouched, f = conditional_targets(y, p[:, 2], np.zeros(50, dtype=bool))
    np.testing.assert_array_equal(untouched, y) and np.testing.assert_array_equal(f, 1.0)

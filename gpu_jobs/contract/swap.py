"""The A/B swap: the same pair with response A and response B exchanged.

Class-indexed arrays are permuted with ``SWAP_PERMUTATION`` (A <-> B, the tie stays); tables with
``swap_frame``. Both are involutions: swapping twice gives back the original.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SWAP_PERMUTATION = [1, 0, 2]  # column j of the swapped array is column SWAP_PERMUTATION[j] of the original

# Column pairs exchanged by a swap (those present in a frame): texts, labels, soft targets, model names,
# judge scores, votes, predicted probabilities.
SWAP_COLUMN_PAIRS = (
    ("response_a", "response_b"),
    ("winner_model_a", "winner_model_b"),
    ("target_a", "target_b"),
    ("model_a", "model_b"),
    ("score_a", "score_b"),
    ("votes_a", "votes_b"),
    ("p_a", "p_b"),
)


def swap_probs(p) -> np.ndarray:
    """An (n, 3) array of class probabilities (or targets) with the A and B columns exchanged."""
    return np.asarray(p)[:, SWAP_PERMUTATION]


def swap_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The same pairs with A and B exchanged (texts, labels, soft targets, model names, votes, scores,
    probabilities); other columns are copied unchanged."""
    out = frame.copy()
    for a, b in SWAP_COLUMN_PAIRS:
        if a in frame.columns and b in frame.columns:
            out[a], out[b] = frame[b].to_numpy(), frame[a].to_numpy()
    return out

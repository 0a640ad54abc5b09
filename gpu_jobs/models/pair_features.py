"""The hand-made pair features of the ``features`` family: parsing a pair's turns, per-response features
(length, repetition, structure, refusal, quality, prompt overlap), pair similarity and prompt features, and
the dense antisymmetric / symmetric blocks the model is fitted on (see ``gpu_jobs.models.features``).

Pure Python / numpy: no model, no config.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from gpu_jobs.contract.schema import TEXT_COLUMNS
from gpu_jobs.contract.turns import TurnsError, parse_turns_fixes

# ------------------------------------------------------------------------------------ text handling


def _turns(cell: Any, column: str, row_id: Any) -> list[str]:
    """The turns of a contract-1 cell (strict: a cell that is not a JSON list of turns is an error)."""
    try:
        return parse_turns_fixes(cell, strict=True)[0]
    except TurnsError as err:
        raise ValueError(f"row id={row_id!r}, column '{column}': {err}") from None


def parse_frame(frame: pd.DataFrame) -> dict[str, list[list[str]]]:
    """Turn lists of the three text columns; errors name the row id and the column."""
    missing = [c for c in TEXT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; the data contract needs {list(TEXT_COLUMNS)}")
    ids = frame["id"].tolist() if "id" in frame.columns else list(range(len(frame)))
    return {
        col: [_turns(cell, col, rid) for cell, rid in zip(frame[col].tolist(), ids)] for col in TEXT_COLUMNS
    }


# ------------------------------------------------------------------------------- hand-made features

_WORD = re.compile(r"\w+", re.UNICODE)
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.M)
_BULLET = re.compile(r"^\s*[-*+•]\s+\S", re.M)
_NUMBERED = re.compile(r"^\s*\d{1,3}[.)]\s+\S", re.M)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_INLINE_CODE = re.compile(r"(?<!`)`[^`\n]+`(?!`)")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$", re.M)
_URL = re.compile(r"https?://\S+")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?。！？](\s|$)")
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|as a language model|as an ai language model|"
    r"i cannot|i can'?t|i can not|i'?m (?:not able|unable)|i am (?:not able|unable)|i do not have|i don'?t have"
    r"|not appropriate|i won'?t be able|cannot (?:provide|assist|help|fulfill)|unethical)",
    re.I,
)
_HEDGE = re.compile(r"\b(however|it depends|it is important to note|please note|note that|keep in mind)\b", re.I)
_STOP = frozenset(
    "a an the and or but if then else of to in on at by for with from as is are was were be been being "
    "this that these those it its it's i you he she we they me my your our their his her them us do does did "
    "not no yes so such can could would should will shall may might must have has had what which who whom "
    "whose when where why how all any some each few more most other into over under than too very just "
    "about also there here only own same both up down out off again further once please give write make "
    "following given using use one two".split()
)

# per-response features by group; each is computed on the response (all turns joined) given the prompt
FEATURE_GROUPS: dict[str, list[str]] = {
    "length": ["log_chars", "log_words", "log_lines", "log_paragraphs", "log_sentences", "log_chars_last_turn"],
    "structure": ["headers", "bullets", "numbered", "code_blocks", "inline_code", "bold", "table_rows", "urls"],
    "refusal": ["refusal", "refusal_start", "hedges"],
    # degenerate looping text (repeated lines, repeated word trigrams): disliked by judges and people alike
    "repetition": ["repeated_line_frac", "repeated_trigram_frac"],
    "quality": [
        "mean_word_len", "type_token_ratio", "question_marks", "exclamations", "empty", "empty_turns", "digit_frac",
        "upper_frac", "nonascii_frac", "nonascii_mismatch", "ends_cleanly",
    ],
    "overlap": ["prompt_recall", "response_precision", "key_term_recall", "copies_prompt"],
    # pair-level (symmetric) groups
    "similarity": ["identical", "identical_ws", "word_jaccard", "bigram_jaccard"],
    "prompt": ["p_log_chars", "p_turns", "p_question_marks", "p_code", "p_nonascii_frac", "p_list_request"],
}
RESPONSE_GROUPS = ("length", "repetition", "structure", "refusal", "quality", "overlap")
PAIR_GROUPS = ("similarity", "prompt")
RESPONSE_FEATURES = [name for g in RESPONSE_GROUPS for name in FEATURE_GROUPS[g]]
SIMILARITY_FEATURES = FEATURE_GROUPS["similarity"]
PROMPT_FEATURES = FEATURE_GROUPS["prompt"]
# response features that also get the symmetric |f(A) - f(B)| and f(A) + f(B) columns
SYMMETRIC_SUBSET = [
    "log_chars", "log_lines", "headers", "bullets", "numbered", "code_blocks", "bold", "refusal", "empty",
    "prompt_recall", "key_term_recall", "repeated_line_frac", "nonascii_mismatch",
]


_LETTER = re.compile(r"[^\W\d_]")
_UPPER = re.compile(r"[A-ZÀ-ÖØ-Þ]")
_DIGIT = re.compile(r"\d")


def _n_nonascii(text: str) -> int:
    return len(text) - len(text.encode("ascii", "ignore"))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _frac(count: float, total: float) -> float:
    return count / total if total else 0.0


_WINDOW = 50  # words; ratio features are averaged over windows so that they do not just track the length


def _type_token_ratio(words: list[str]) -> float:
    return len(set(words)) / len(words) if words else 0.0


def _repeated_trigram_frac(words: list[str]) -> float:
    trigrams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def _windowed(words: list[str], fn) -> float:
    """Mean of ``fn`` over consecutive windows of ``_WINDOW`` words (the last partial window joins the one
    before). Plain ratios such as type/token fall with the length; windowed ones measure the text itself."""
    if len(words) <= _WINDOW:
        return fn(words)
    starts = range(0, len(words) - _WINDOW + 1, _WINDOW)
    windows = [words[i : i + _WINDOW] for i in starts]
    windows[-1] = words[starts[-1] :]
    return float(np.mean([fn(w) for w in windows]))


def response_features(
    turns: list[str], prompt_turns: list[str], groups: tuple[str, ...] | list[str] = RESPONSE_GROUPS
) -> dict[str, float]:
    """Hand-made features of one response (all turns joined) given its prompt; only the groups asked for
    are computed (the regular expressions are most of the cost)."""
    text = "\n\n".join(turns)
    stripped = text.strip()
    n_chars = len(text)
    words = _words(text)
    n_words = len(words)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    log_count = lambda pattern: float(np.log1p(len(pattern.findall(text))))  # noqa: E731
    out: dict[str, float] = {}
    if "length" in groups:
        out.update({
            "log_chars": float(np.log1p(n_chars)),
            "log_words": float(np.log1p(n_words)),
            "log_lines": float(np.log1p(len(lines))),
            "log_paragraphs": float(np.log1p(sum(1 for p in _PARAGRAPH_SPLIT.split(text) if p.strip()))),
            "log_sentences": log_count(_SENTENCE_END),
            "log_chars_last_turn": float(np.log1p(len(turns[-1]) if turns else 0)),
        })
    if "repetition" in groups:
        out.update({
            "repeated_line_frac": (1.0 - len(set(lines)) / len(lines)) if lines else 0.0,
            "repeated_trigram_frac": _windowed(words, _repeated_trigram_frac),
        })
    if "structure" in groups:
        out.update({
            "headers": log_count(_HEADER),
            "bullets": log_count(_BULLET),
            "numbered": log_count(_NUMBERED),
            "code_blocks": float(np.log1p(text.count("```") // 2)),
            "inline_code": log_count(_INLINE_CODE),
            "bold": log_count(_BOLD),
            "table_rows": log_count(_TABLE_ROW),
            "urls": log_count(_URL),
        })
    if "refusal" in groups:
        out.update({
            "refusal": log_count(_REFUSAL),
            "refusal_start": float(bool(_REFUSAL.search(stripped[:200]))),
            "hedges": log_count(_HEDGE),
        })
    if "quality" in groups or "overlap" in groups:
        prompt = "\n\n".join(prompt_turns)
    if "quality" in groups:
        n_letters = len(_LETTER.findall(text)) or 1
        nonascii = _frac(_n_nonascii(text), n_chars)
        out.update({
            "mean_word_len": (sum(len(w) for w in words) / n_words) if n_words else 0.0,
            "type_token_ratio": _windowed(words, _type_token_ratio),
            "question_marks": float(np.log1p(text.count("?") + text.count("？"))),
            "exclamations": float(np.log1p(text.count("!"))),
            "empty": float(not stripped),
            "empty_turns": _frac(sum(not t.strip() for t in turns), len(turns)),
            "digit_frac": _frac(len(_DIGIT.findall(text)), n_chars),
            "upper_frac": len(_UPPER.findall(text)) / n_letters,
            "nonascii_frac": nonascii,
            "nonascii_mismatch": abs(nonascii - _frac(_n_nonascii(prompt), len(prompt))),
            "ends_cleanly": float(bool(stripped) and stripped[-1] in ".!?)]}\"'`*。！？:；;"),
        })
    if "overlap" in groups:
        p_set = set(_words(prompt))
        r_set = set(words)
        key_terms = {w for w in p_set if w not in _STOP and len(w) > 3}
        out.update({
            "prompt_recall": _frac(len(p_set & r_set), len(p_set)),
            "response_precision": _frac(len(p_set & r_set), len(r_set)),
            "key_term_recall": _frac(len(key_terms & r_set), len(key_terms)),
            "copies_prompt": float(len(stripped) > 20 and stripped.lower() in prompt.lower()),
        })
    return out


def prompt_features(prompt_turns: list[str]) -> dict[str, float]:
    prompt = "\n\n".join(prompt_turns)
    return {
        "p_log_chars": float(np.log1p(len(prompt))),
        "p_turns": float(len(prompt_turns)),
        "p_question_marks": float(np.log1p(prompt.count("?"))),
        "p_code": float("```" in prompt or "def " in prompt or "{" in prompt),
        "p_nonascii_frac": _frac(_n_nonascii(prompt), len(prompt)),
        "p_list_request": float(bool(re.search(r"\b(list|steps|ways|ideas|examples|tips)\b", prompt.lower()))),
    }


def _jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def pair_similarity(a_turns: list[str], b_turns: list[str]) -> dict[str, float]:
    """Symmetric A-B similarity (a tie signal: near-identical answers)."""
    a = "\n\n".join(a_turns).strip()
    b = "\n\n".join(b_turns).strip()
    wa, wb = _words(a), _words(b)
    return {
        "identical": float(a == b),
        "identical_ws": float(a.lower().split() == b.lower().split()),
        "word_jaccard": _jaccard(set(wa), set(wb)),
        "bigram_jaccard": _jaccard(set(zip(wa, wa[1:])), set(zip(wb, wb[1:]))),
    }


def dense_feature_names(groups: list[str] | tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
    """(antisymmetric names, symmetric names) of the dense block for the chosen feature groups."""
    groups = list(FEATURE_GROUPS) if groups is None else list(groups)
    resp = [n for g in RESPONSE_GROUPS if g in groups for n in FEATURE_GROUPS[g]]
    sym_subset = [n for n in SYMMETRIC_SUBSET if n in resp]
    anti = [f"diff_{n}" for n in resp]
    sym = [f"absdiff_{n}" for n in sym_subset] + [f"sum_{n}" for n in sym_subset]
    if "length" in groups:
        anti.append("len_ratio")
        sym.append("abs_len_ratio")
    for g in PAIR_GROUPS:
        if g in groups:
            sym += FEATURE_GROUPS[g]
    return anti, sym


def dense_features(parsed: dict[str, list[list[str]]], groups=None):
    """(antisymmetric block, symmetric block) for parsed rows, columns as ``dense_feature_names(groups)``.

    The blocks of the A/B-swapped pairs need no second pass: the antisymmetric block negated, the
    symmetric block as is (``FeaturesModel._design`` stacks them so).
    """
    groups = list(FEATURE_GROUPS) if groups is None else list(groups)
    rows = list(zip(parsed["prompt"], parsed["response_a"], parsed["response_b"]))
    n = len(rows)
    resp = [x for g in RESPONSE_GROUPS if g in groups for x in FEATURE_GROUPS[g]]
    sym_subset = [x for x in SYMMETRIC_SUBSET if x in resp]
    anti_cols: list[np.ndarray] = []
    sym_cols: list[np.ndarray] = []
    if resp:
        needed = tuple(g for g in RESPONSE_GROUPS if g in groups)
        fa_d = [response_features(a, p, needed) for p, a, _ in rows]
        fb_d = [response_features(b, p, needed) for p, _, b in rows]
        fa = np.asarray([[f[x] for x in resp] for f in fa_d], dtype=np.float64).reshape(n, len(resp))
        fb = np.asarray([[f[x] for x in resp] for f in fb_d], dtype=np.float64).reshape(n, len(resp))
        d = fa - fb
        idx = [resp.index(x) for x in sym_subset]
        anti_cols.append(d)
        sym_cols += [np.abs(d[:, idx]), (fa + fb)[:, idx]]
    if "length" in groups:
        la = np.asarray([sum(map(len, a)) for _, a, _ in rows], dtype=np.float64)
        lb = np.asarray([sum(map(len, b)) for _, _, b in rows], dtype=np.float64)
        ratio = np.divide(la - lb, la + lb, out=np.zeros_like(la), where=(la + lb) > 0)
        anti_cols.append(ratio[:, None])
        sym_cols.append(np.abs(ratio)[:, None])
    if "similarity" in groups:
        sims = [pair_similarity(a, b) for _, a, b in rows]
        sym_cols.append(np.asarray([[s[x] for x in SIMILARITY_FEATURES] for s in sims], dtype=np.float64).reshape(n, -1))
    if "prompt" in groups:
        pfs = [prompt_features(p) for p, _, _ in rows]
        sym_cols.append(np.asarray([[s[x] for x in PROMPT_FEATURES] for s in pfs], dtype=np.float64).reshape(n, -1))
    anti = np.hstack(anti_cols) if anti_cols else np.zeros((n, 0))
    sym = np.hstack(sym_cols) if sym_cols else np.zeros((n, 0))
    return anti, sym

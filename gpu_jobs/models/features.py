"""The ``features`` model family: hand-made length / structure features + TF-IDF into a linear or
gradient-boosted classifier (the reference solution's "feature model" side member).

Every pair is described by

- **antisymmetric** features ``f(A) - f(B)`` (and the TF-IDF difference vector ``tfidf(A) - tfidf(B)``):
  they change sign when A and B are swapped;
- **symmetric** features: ``|f(A) - f(B)|``, ``f(A) + f(B)``, A-B similarity and prompt-only
  features: unchanged by a swap (they carry the tie signal).

Trained on both orders (``swap_augment``, labels permuted ``[1, 0, 2]``), such a model predicts on a
swapped pair the permuted probabilities of the original. For the logistic model this holds exactly:
after fitting, the coefficients are projected onto the swap-equivariant subspace (a no-op at the exact
optimum of the swap-augmented problem, it removes the solver's tolerance error). For ``hgb`` trees
cannot be projected; ``symmetrize: true`` averages the prediction with the permuted prediction of the
swapped pair instead.

Soft targets (stage-2 pseudo labels) are fitted by expanding each row into three weighted rows, one per
class, with weight ``target probability x sample weight`` (the cross-entropy with probability targets).

What transfers (measured by ``benchmarks/features_loso.py``, leave-one-source-out on human labels): the
length features, repetition (looping text) and the A-B similarity. Structure, refusal, other "quality"
signals (lexical variety, truncation, ...) and prompt-overlap features help on unseen arena prompts with
GPT-4 labels but hurt on PandaLM / LLMBar, so the default config uses length + repetition + similarity +
prompt; ``features_hgb.yaml`` uses all.

``gpu_jobs`` never imports ``arena_pipeline``.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pydantic import Field, field_validator, model_validator

from gpu_jobs.config import Bool, ConfigKeyError, Float, Int, JobConfig, Str, read_yaml, validate_model
from gpu_jobs.contract.atomic import atomic_path, atomic_write_text
from gpu_jobs.contract.schema import TEXT_COLUMNS
from gpu_jobs.contract.swap import SWAP_PERMUTATION, swap_frame  # noqa: F401  (re-exported for callers)
from gpu_jobs.contract.turns import TurnsError, parse_turns_fixes

FAMILY_NAME = "features"
MODEL_FILE = "features_model.skops"
# types skops does not trust by default that a features model legitimately holds
TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


# --------------------------------------------------------------------------------------------- config


class FeaturesConfig(JobConfig):
    """Configuration of the ``features`` family (``gpu_jobs/configs/features.yaml``).

    Nested sections (``features:``, ``training:``, ``model_args:``, as other families write them) are flattened;
    ``training.checkpoint_every_steps`` is accepted (checked) and ignored: the family fits in seconds."""

    family: Literal["features"] = FAMILY_NAME
    name: Str = "features"
    seed: Int = 42
    tta: Bool = True
    model: Literal["logistic", "hgb"] = "logistic"
    swap_augment: Bool = True
    symmetrize: Bool = True
    n_threads: Int = Field(1, ge=0)  # BLAS / OpenMP threads while fitting and predicting (0: the libraries' default)
    # hand-made features (groups: length, repetition, structure, refusal, quality, overlap, similarity, prompt)
    dense_features: Bool = True
    feature_groups: tuple[Str, ...] = ("length", "repetition", "similarity", "prompt")
    feature_clip: Float = Field(3.0, gt=0)  # standardised dense features are clipped to +-this (limits extrapolation)
    interactions: tuple[Str, ...] = ()  # symmetric features that multiply every antisymmetric dense feature
    # TF-IDF on the responses, as the A - B difference
    tfidf_word: Bool = False
    tfidf_word_ngram: tuple[Int, Int] = (1, 2)
    tfidf_word_max_features: Int = Field(20000, ge=1)
    tfidf_char: Bool = False
    tfidf_char_ngram: tuple[Int, Int] = (3, 5)
    tfidf_char_max_features: Int = Field(30000, ge=1)
    tfidf_min_df: Int = Field(3, ge=1)
    tfidf_max_chars: Int = Field(6000, ge=1)  # each response is cut to this many characters before TF-IDF
    tfidf_weight: Float = Field(1.0, ge=0)  # scale of the TF-IDF block relative to the standardised dense block
    # sentence embeddings (a bi-encoder view): cos(prompt, A) - cos(prompt, B), cos(A, B) and, with
    # embedding_vectors, the difference of the two response vectors; "" turns the block off
    embedding_model: Str = ""
    embedding_max_length: Int = Field(256, ge=1)
    embedding_batch_size: Int = Field(32, ge=1)
    embedding_vectors: Bool = True
    embedding_threads: Int = 0  # torch threads while embedding (0: all cores)
    # logistic regression
    C: Float = Field(0.001, gt=0)
    max_iter: Int = Field(2000, ge=1)
    tol: Float = Field(1e-4, gt=0)
    # histogram gradient boosting (model: hgb)
    hgb_max_iter: Int = Field(300, ge=1)
    hgb_learning_rate: Float = Field(0.05, gt=0)
    hgb_max_leaf_nodes: Int = Field(15, ge=2)
    hgb_min_samples_leaf: Int = Field(40, ge=1)
    hgb_l2_regularization: Float = Field(1.0, ge=0)
    hgb_svd_components: Int = Field(32, ge=0)  # TF-IDF difference reduced to this many components for the trees

    @model_validator(mode="before")
    @classmethod
    def _flatten_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        training = data.get("training")
        if isinstance(training, dict) and "checkpoint_every_steps" in training:
            training = dict(training)
            every = training.pop("checkpoint_every_steps")
            if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
                raise ConfigKeyError("training.checkpoint_every_steps", f"must be an integer or null, got {every!r}")
            data["training"] = training
        for section in ("features", "training", "model_args"):
            if isinstance(data.get(section), dict):
                nested = data.pop(section)
                for k, v in nested.items():
                    if k in data:
                        raise ConfigKeyError(f"{section}.{k}", "given twice (top level and in the section)")
                    data[k] = v
        for key in ("feature_groups", "interactions"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
        return data

    @field_validator("feature_groups")
    @classmethod
    def _known_groups(cls, groups: tuple[str, ...]) -> tuple[str, ...]:
        bad = [g for g in groups if g not in FEATURE_GROUPS]
        if bad:
            raise ValueError(f"unknown group(s) {bad}; known: {list(FEATURE_GROUPS)}")
        return groups

    @field_validator("tfidf_word_ngram", "tfidf_char_ngram")
    @classmethod
    def _ngram_range(cls, pair: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= pair[0] <= pair[1]:
            raise ValueError(f"must be [lo, hi] with 1 <= lo <= hi, got {list(pair)}")
        return pair

    @model_validator(mode="after")
    def _some_block(self):
        if not ((self.dense_features and self.feature_groups) or self.tfidf_word or self.tfidf_char
                or self.embedding_model):
            raise ConfigKeyError("dense_features", "at least one of 'dense_features', 'tfidf_word', 'tfidf_char', "
                                 "'embedding_model' must be set")
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "features config", key_prefix: str = "") -> "FeaturesConfig":
        return validate_model(cls, data, source, key_prefix)


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


# -------------------------------------------------------------------------------------------- model


def _response_text(turns: list[str], max_chars: int) -> str:
    return "\n\n".join(turns)[:max_chars]


class FeaturesModel:
    """Features + TF-IDF pair classifier. ``predict_proba`` columns: A wins, B wins, tie."""

    def __init__(self, cfg: FeaturesConfig):
        if isinstance(cfg, dict):
            cfg = FeaturesConfig.from_dict(cfg)
        self.cfg = cfg
        self.vectorizers: dict[str, Any] = {}
        self.anti_scale: np.ndarray | None = None
        self.sym_mean: np.ndarray | None = None
        self.sym_scale: np.ndarray | None = None
        self.svd = None
        self.estimator = None
        self.n_anti: int = 0
        self.feature_names: list[str] = []
        self.fit_info: dict[str, Any] = {}
        self._embedder = None  # built on first use, never saved (the encoder is loaded from embedding_model)

    # ---------------------------------------------------------------- design matrix

    def _embedding_block(self, parsed) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """(antisymmetric, symmetric, names, names) from sentence embeddings of prompt, A and B."""
        from gpu_jobs.models.embeddings import SentenceEmbedder

        cfg = self.cfg
        if self._embedder is None:
            self._embedder = SentenceEmbedder(cfg.embedding_model, cfg.embedding_max_length,
                                              cfg.embedding_batch_size, cfg.embedding_threads)
        n = len(parsed["prompt"])
        texts = ["\n\n".join(turns) for column in ("prompt", "response_a", "response_b") for turns in parsed[column]]
        ep, ea, eb = np.split(self._embedder.encode(texts), [n, 2 * n])  # one call: one length-sorted pass
        cos_pa, cos_pb = (ep * ea).sum(1), (ep * eb).sum(1)
        anti = [(cos_pa - cos_pb)[:, None]]
        names_anti = ["diff_prompt_cosine"]
        if cfg.embedding_vectors:
            anti.append(ea - eb)
            names_anti += [f"emb_diff_{i}" for i in range(ea.shape[1])]
        sym = np.column_stack([(ea * eb).sum(1), 0.5 * (cos_pa + cos_pb)])
        return np.hstack(anti).astype(np.float64), sym.astype(np.float64), names_anti, ["ab_cosine", "mean_prompt_cosine"]

    def _texts(self, parsed) -> tuple[list[str], list[str]]:
        m = self.cfg.tfidf_max_chars
        return ([_response_text(t, m) for t in parsed["response_a"]], [_response_text(t, m) for t in parsed["response_b"]])

    def _fit_vectorizers(self, ta: list[str], tb: list[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        cfg = self.cfg
        docs = ta + tb  # both responses: the vocabulary and idf are unchanged by an A/B swap
        self.vectorizers = {}
        common = dict(min_df=cfg.tfidf_min_df, sublinear_tf=True, dtype=np.float32, lowercase=True)
        if cfg.tfidf_word:
            self.vectorizers["word"] = TfidfVectorizer(
                analyzer="word", ngram_range=tuple(cfg.tfidf_word_ngram), max_features=cfg.tfidf_word_max_features,
                **common,
            ).fit(docs)
        if cfg.tfidf_char:
            self.vectorizers["char"] = TfidfVectorizer(
                analyzer="char_wb", ngram_range=tuple(cfg.tfidf_char_ngram),
                max_features=cfg.tfidf_char_max_features, **common,
            ).fit(docs)

    def _design(self, parsed, fit: bool, with_swapped: bool = False):
        """Design matrix (antisymmetric columns first); with ``with_swapped`` the swapped rows follow."""
        cfg = self.cfg
        n = len(parsed["prompt"])
        anti_blocks: list = []
        sym_blocks: list = []
        names_anti: list[str] = []
        names_sym: list[str] = []
        if cfg.dense_features or cfg.embedding_model:
            anti, sym = dense_features(parsed, cfg.feature_groups if cfg.dense_features else ())
            a_names, s_names = dense_feature_names(cfg.feature_groups if cfg.dense_features else ())
            if cfg.embedding_model:
                e_anti, e_sym, e_a_names, e_s_names = self._embedding_block(parsed)
                anti, sym = np.hstack([anti, e_anti]), np.hstack([sym, e_sym])
                a_names, s_names = a_names + e_a_names, s_names + e_s_names
            if with_swapped:
                anti, sym = np.vstack([anti, -anti]), np.vstack([sym, sym])
            if fit:
                # antisymmetric columns are only scaled (centering would break the sign flip); the RMS over
                # both orders equals the RMS over one
                rms = np.sqrt(np.mean(anti**2, axis=0)) if len(anti) else np.ones(anti.shape[1])
                self.anti_scale = np.where(rms > 1e-12, rms, 1.0)
                self.sym_mean = sym.mean(axis=0) if len(sym) else np.zeros(sym.shape[1])
                sd = sym.std(axis=0) if len(sym) else np.ones(sym.shape[1])
                self.sym_scale = np.where(sd > 1e-12, sd, 1.0)
            clip = cfg.feature_clip
            anti = np.clip(anti / self.anti_scale, -clip, clip)
            sym = np.clip((sym - self.sym_mean) / self.sym_scale, -clip, clip)
            anti_blocks.append(anti)
            sym_blocks.append(sym)
            names_anti += a_names
            names_sym += s_names
            # interactions: antisymmetric x symmetric context is antisymmetric (e.g. the length difference
            # matters differently when both answers are short)
            for ctx in cfg.interactions:
                if ctx not in s_names:
                    raise ValueError(
                        f"features config key 'interactions': {ctx!r} is not a symmetric feature of the chosen "
                        f"groups; choose from {s_names}"
                    )
                col = sym[:, s_names.index(ctx)][:, None]
                anti_blocks.append(anti * col)
                names_anti += [f"{a}*{ctx}" for a in a_names]
        tfidf = None
        if cfg.tfidf_word or cfg.tfidf_char:
            ta, tb = self._texts(parsed)
            if fit:
                self._fit_vectorizers(ta, tb)
            blocks = [vec.transform(ta) - vec.transform(tb) for vec in self.vectorizers.values()]
            tfidf = sp.hstack(blocks, format="csr").astype(np.float64)
            if with_swapped:
                tfidf = sp.vstack([tfidf, -tfidf], format="csr")
        if cfg.model == "logistic":
            if tfidf is not None:
                anti_blocks.append(tfidf * cfg.tfidf_weight)
                names_anti += [f"tfidf_{k}:{t}" for k, v in self.vectorizers.items() for t in v.get_feature_names_out()]
            self.n_anti = sum(b.shape[1] for b in anti_blocks) if fit else self.n_anti
            X = sp.hstack([sp.csr_matrix(b) for b in anti_blocks + sym_blocks] or [sp.csr_matrix((n, 0))], format="csr")
        else:
            # trees take dense input: the TF-IDF difference goes through a truncated SVD (linear, no centering,
            # so still antisymmetric)
            if tfidf is not None and cfg.hgb_svd_components > 0:
                if fit:
                    from sklearn.decomposition import TruncatedSVD

                    k = max(1, min(cfg.hgb_svd_components, tfidf.shape[1] - 1, tfidf.shape[0] - 1))
                    self.svd = TruncatedSVD(n_components=k, random_state=cfg.seed).fit(tfidf)
                anti_blocks.append(self.svd.transform(tfidf))
                names_anti += [f"tfidf_svd_{i}" for i in range(self.svd.n_components)]
            self.n_anti = sum(b.shape[1] for b in anti_blocks) if fit else self.n_anti
            X = np.hstack(anti_blocks + sym_blocks) if anti_blocks + sym_blocks else np.zeros((n, 0))
        if fit:
            self.feature_names = names_anti + names_sym
        return X

    # ---------------------------------------------------------------- fit / predict

    def _threads(self):
        from threadpoolctl import threadpool_limits

        # the matrices are small: one thread is faster than a BLAS pool fighting other processes for cores
        return threadpool_limits(self.cfg.n_threads) if self.cfg.n_threads > 0 else contextlib.nullcontext()

    def fit(self, frame: pd.DataFrame, targets: np.ndarray, sample_weight: np.ndarray | None = None) -> "FeaturesModel":
        """Fit on ``frame`` (data contract columns) and ``targets`` (n, 3) probabilities (A, B, tie).

        Targets may be soft (pseudo labels); each row becomes three rows weighted by target x sample weight.
        """
        with self._threads():
            return self._fit(frame, targets, sample_weight)

    def _fit(self, frame: pd.DataFrame, targets: np.ndarray, sample_weight: np.ndarray | None) -> "FeaturesModel":
        t0 = time.perf_counter()
        cfg = self.cfg
        n = len(frame)
        targets = np.asarray(targets, dtype=np.float64)
        if targets.shape != (n, 3):
            raise ValueError(f"targets must have shape ({n}, 3) (A wins, B wins, tie), got {targets.shape}")
        if not np.all(np.isfinite(targets)) or (targets < -1e-9).any():
            raise ValueError("targets must be finite non-negative probabilities")
        sums = targets.sum(axis=1)
        if np.any(np.abs(sums - 1.0) > 1e-3):
            bad = int(np.argmax(np.abs(sums - 1.0)))
            rid = frame["id"].iloc[bad] if "id" in frame.columns else bad
            raise ValueError(f"targets of row id={rid!r} sum to {sums[bad]:.4f}, not 1")
        targets = np.clip(targets, 0, None) / sums[:, None]
        w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if w.shape != (n,) or not np.all(np.isfinite(w)) or (w < 0).any():
            raise ValueError(f"sample_weight must be {n} finite non-negative numbers")
        if n == 0 or w.sum() <= 0:
            raise ValueError("no training rows with positive weight")

        parsed = parse_frame(frame)
        t_parse = time.perf_counter()
        X = self._design(parsed, fit=True, with_swapped=cfg.swap_augment)
        if cfg.swap_augment:
            targets = np.vstack([targets, targets[:, SWAP_PERMUTATION]])
            w = np.concatenate([w, w])
        t_feat = time.perf_counter()

        rows = np.repeat(np.arange(X.shape[0]), 3)
        labels = np.tile(np.arange(3), X.shape[0])
        weights = (targets * w[:, None]).reshape(-1)
        keep = weights > 0
        rows, labels, weights = rows[keep], labels[keep], weights[keep]
        if len(np.unique(labels)) < 2:
            raise ValueError("targets put all their mass on one class; need at least two classes to fit")
        Xe = X[rows]
        weights = weights * (len(weights) / weights.sum())  # mean weight 1 keeps C's meaning
        self.estimator = self._make_estimator()
        self.estimator.fit(Xe, labels, sample_weight=weights)
        if cfg.model == "logistic":
            self._complete_classes()
            if cfg.symmetrize and cfg.swap_augment:
                self._symmetrize_coefficients()
        self.fit_info = {
            "n_rows": n,
            "n_design_rows": int(Xe.shape[0]),
            "n_features": int(X.shape[1]),
            "n_antisymmetric": int(self.n_anti),
            "parse_s": round(t_parse - t0, 3),
            "features_s": round(t_feat - t_parse, 3),
            "fit_s": round(time.perf_counter() - t_feat, 3),
        }
        return self

    def _make_estimator(self):
        cfg = self.cfg
        if cfg.model == "logistic":
            from sklearn.linear_model import LogisticRegression

            return LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, tol=cfg.tol, solver="lbfgs")
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(
            max_iter=cfg.hgb_max_iter, learning_rate=cfg.hgb_learning_rate, max_leaf_nodes=cfg.hgb_max_leaf_nodes,
            min_samples_leaf=cfg.hgb_min_samples_leaf, l2_regularization=cfg.hgb_l2_regularization,
            early_stopping=False, random_state=cfg.seed,
        )

    def _complete_classes(self) -> None:
        """Make the logistic model 3-class even when a class got no weight (e.g. no ties in the data)."""
        est = self.estimator
        if list(est.classes_) == [0, 1, 2]:
            return
        coef = np.zeros((3, est.coef_.shape[1]))
        intercept = np.full(3, -30.0)  # an absent class gets ~zero probability
        if est.coef_.shape[0] == 1:  # binary: sklearn keeps one row, for classes_[1]
            c0, c1 = est.classes_
            coef[c1], intercept[c1] = est.coef_[0] / 2, est.intercept_[0] / 2
            coef[c0], intercept[c0] = -est.coef_[0] / 2, -est.intercept_[0] / 2
        else:
            for i, c in enumerate(est.classes_):
                coef[c], intercept[c] = est.coef_[i], est.intercept_[i]
        est.coef_, est.intercept_, est.classes_ = coef, intercept, np.arange(3)

    def _symmetrize_coefficients(self) -> None:
        """Project the multinomial coefficients onto the swap-equivariant subspace.

        A swap flips the sign of the antisymmetric columns (x -> S x) and must exchange the A and B logits:
        W_b = W_a S, W_tie = W_tie S, b_a = b_b. Each coefficient is averaged with its image, which is a
        no-op at the exact optimum of the swap-augmented problem and removes the solver's tolerance error.
        """
        est = self.estimator
        s = np.ones(est.coef_.shape[1])
        s[: self.n_anti] = -1.0
        W, b = np.asarray(est.coef_, dtype=np.float64), np.asarray(est.intercept_, dtype=np.float64)
        wa = 0.5 * (W[0] + W[1] * s)
        wt = 0.5 * (W[2] + W[2] * s)
        est.coef_ = np.vstack([wa, wa * s, wt])
        ba = 0.5 * (b[0] + b[1])
        est.intercept_ = np.array([ba, ba, b[2]])

    def _predict_parsed(self, parsed) -> np.ndarray:
        X = self._design(parsed, fit=False)
        proba = self.estimator.predict_proba(X)
        full = np.zeros((X.shape[0], 3))
        full[:, np.asarray(self.estimator.classes_, dtype=int)] = proba
        return full

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """(n, 3) probabilities: A wins, B wins, tie."""
        if self.estimator is None:
            raise RuntimeError("FeaturesModel.predict_proba called before fit() or load()")
        if len(frame) == 0:
            return np.zeros((0, 3))
        with self._threads():
            return self._predict(frame)

    def _predict(self, frame: pd.DataFrame) -> np.ndarray:
        parsed = parse_frame(frame)
        p = self._predict_parsed(parsed)
        if self.cfg.model == "hgb" and self.cfg.symmetrize:
            swapped = {"prompt": parsed["prompt"], "response_a": parsed["response_b"], "response_b": parsed["response_a"]}
            p = 0.5 * (p + self._predict_parsed(swapped)[:, SWAP_PERMUTATION])
        p = np.clip(p, 1e-7, None)
        return p / p.sum(axis=1, keepdims=True)

    def coefficients(self) -> pd.DataFrame | None:
        """Logistic model only: one row per feature, the A-win and tie coefficients (for reading the model)."""
        if self.cfg.model != "logistic" or self.estimator is None:
            return None
        W = self.estimator.coef_
        return pd.DataFrame({"feature": self.feature_names, "coef_a": W[0], "coef_b": W[1], "coef_tie": W[2]})

    # ---------------------------------------------------------------- persistence

    def save(self, model_dir: Path) -> None:
        """``model_dir/features_model.skops`` (skops: no pickle, loads only allow-listed types) and
        ``model_dir/config.yaml`` (``family: features``); each file is written aside, then renamed."""
        import skops.io as sio
        import yaml

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "vectorizers": self.vectorizers, "anti_scale": self.anti_scale, "sym_mean": self.sym_mean,
            "sym_scale": self.sym_scale, "svd": self.svd, "estimator": self.estimator, "n_anti": self.n_anti,
            "feature_names": self.feature_names, "fit_info": self.fit_info,
        }
        with atomic_path(model_dir / MODEL_FILE) as tmp:
            sio.dump(state, tmp)
        atomic_write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), model_dir / "config.yaml")

    @classmethod
    def load(cls, model_dir: Path) -> "FeaturesModel":
        import skops.io as sio
        import yaml

        model_dir = Path(model_dir)
        cfg_path = model_dir / "config.yaml"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found; is {model_dir} a features model directory?")
        from gpu_jobs.config import RESOLVED_KEY

        raw = read_yaml(cfg_path)
        raw.pop(RESOLVED_KEY, None)  # what the training job's hardware gave; not a setting
        if raw.get("family") != FAMILY_NAME:
            raise ValueError(f"{cfg_path}: family is {raw.get('family')!r}, expected '{FAMILY_NAME}'")
        model = cls(FeaturesConfig.from_dict(raw, str(cfg_path)))
        state_path = model_dir / MODEL_FILE
        if not state_path.exists():
            raise FileNotFoundError(f"{state_path} not found; the model directory is incomplete (re-run training)")
        untrusted = sio.get_untrusted_types(file=state_path)
        refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
        if refused:
            raise ValueError(f"{state_path}: refusing to load types outside the allow-list: {refused}")
        state = sio.load(state_path, trusted=list(untrusted))
        for key, value in state.items():
            setattr(model, key, value)
        return model


# ------------------------------------------------------------------------------------ the family


class FeaturesFamily:
    """The ``features`` family behind the registry protocol: fitted and applied by the main process alone."""

    name = FAMILY_NAME
    config_class = FeaturesConfig
    neural = False
    kinds = frozenset({"scikitlearn"})

    def fit(self, cfg, train_df, y, w, accelerator=None, history_path=None, checkpointer=None, log=None,
            report=None, held_out=None):  # held_out: no pre-training stage here
        t0 = time.perf_counter()
        model = FeaturesModel(cfg).fit(train_df, y, sample_weight=w)
        train_s = time.perf_counter() - t0
        if history_path is not None:
            Path(history_path).touch()  # no steps: an empty history
        return model, None, {"train_examples_per_s": len(train_df) / max(train_s, 1e-9), "train_s": train_s,
                             "n_steps": 0, "resumed_from_step": 0, "first_train_loss": None,
                             "final_train_loss": None}

    def save(self, model, tokenizer, model_dir) -> None:
        model.save(Path(model_dir))

    def load(self, model_dir, cfg=None, device=None):
        return FeaturesModel.load(Path(model_dir)), None

    def predict(self, cfg, model, tokenizer, frame, tta=False, batch_size=None, max_length=None, device=None,
                accelerator=None, progress=False, precision=None):
        probs = np.asarray(model.predict_proba(frame), dtype=np.float64)
        probs_tta = (np.asarray(model.predict_proba(swap_frame(frame))[:, SWAP_PERMUTATION], dtype=np.float64)
                     if tta else None)
        return probs, probs_tta


FAMILY = FeaturesFamily()

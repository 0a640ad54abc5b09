"""The ``features`` model family: hand-made length / structure features + TF-IDF into a linear or
gradient-boosted classifier (the reference solution's "feature model" side member).

Every pair is described by (the hand-made features are computed in ``gpu_jobs.models.pair_features``)

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
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pydantic import Field, field_validator, model_validator

from gpu_jobs.config import Bool, ConfigKeyError, Float, Int, JobConfig, Str, read_yaml, validate_model
from gpu_jobs.contract.atomic import atomic_path, atomic_write_text
from gpu_jobs.contract.swap import SWAP_PERMUTATION, swap_frame  # noqa: F401  (re-exported for callers)
from gpu_jobs.contract.ties import conditional_targets, ties_possible
from gpu_jobs.models.pair_features import FEATURE_GROUPS, dense_feature_names, dense_features, parse_frame

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
    # rows with ties_possible = false (gpu_jobs/contract/ties.py) train on P(y | not tie): EM refits after the first
    tie_free_em_steps: Int = Field(3, ge=0)
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


# -------------------------------------------------------------------------------------------- model


def _response_text(turns: list[str], max_chars: int) -> str:
    return "\n\n".join(turns)[:max_chars]


def _imputed(targets: np.ndarray, w: np.ndarray, p_tie: np.ndarray, tie_free: np.ndarray):
    """(targets, weights) with the tie-free rows' removed ties imputed at ``p_tie`` (contract.ties)."""
    t, factor = conditional_targets(targets, p_tie, tie_free)
    return t, w * factor


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

        tie_free = ~ties_possible(frame, "features training rows")
        if cfg.swap_augment:
            tie_free = np.concatenate([tie_free, tie_free])
        if tie_free.any():  # conditional likelihood by EM: the removed ties imputed where the model expects them
            possible = ~tie_free
            tau = float(np.average(targets[possible, 2], weights=w[possible])) if (w[possible] > 0).any() else 0.0
            n_design = self._fit_design(X, *_imputed(targets, w, np.full(len(w), tau), tie_free))
            for _ in range(cfg.tie_free_em_steps):
                n_design = self._fit_design(X, *_imputed(targets, w, self._design_proba(X)[:, 2], tie_free))
        else:
            n_design = self._fit_design(X, targets, w)
        self.fit_info = {
            "n_rows": n,
            "n_tie_free_rows": int(tie_free[:n].sum()),
            "n_design_rows": n_design,
            "n_features": int(X.shape[1]),
            "n_antisymmetric": int(self.n_anti),
            "parse_s": round(t_parse - t0, 3),
            "features_s": round(t_feat - t_parse, 3),
            "fit_s": round(time.perf_counter() - t_feat, 3),
        }
        return self

    def _fit_design(self, X, targets: np.ndarray, w: np.ndarray) -> int:
        """Fit the estimator on design rows ``X`` with soft ``targets``: each row becomes three rows weighted by
        target x weight. Returns the number of weighted rows."""
        cfg = self.cfg
        rows = np.repeat(np.arange(X.shape[0]), 3)
        labels = np.tile(np.arange(3), X.shape[0])
        weights = (targets * w[:, None]).reshape(-1)
        keep = weights > 0
        rows, labels, weights = rows[keep], labels[keep], weights[keep]
        if len(np.unique(labels)) < 2:
            raise ValueError("targets put all their mass on one class; need at least two classes to fit")
        weights = weights * (len(weights) / weights.sum())  # mean weight 1 keeps C's meaning
        self.estimator = self._make_estimator()
        self.estimator.fit(X[rows], labels, sample_weight=weights)
        if cfg.model == "logistic":
            self._complete_classes()
            if cfg.symmetrize and cfg.swap_augment:
                self._symmetrize_coefficients()
        return int(len(rows))

    def _design_proba(self, X) -> np.ndarray:
        full = np.zeros((X.shape[0], 3))
        full[:, np.asarray(self.estimator.classes_, dtype=int)] = self.estimator.predict_proba(X)
        return full

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
        return self._design_proba(self._design(parsed, fit=False))

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

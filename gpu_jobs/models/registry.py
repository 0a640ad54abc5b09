"""The model families: one registry, one protocol, no family-name branches anywhere else.

A family is a module under ``gpu_jobs/models`` that defines ``FAMILY``, an object with

- ``name``: the ``family:`` value of its YAML configs;
- ``config_class``: its pydantic config (``gpu_jobs.config.JobConfig`` subclass; ``family: Literal[name]``);
- ``neural``: True when it trains in the shared accelerate loop (``gpu_jobs.train``: every process trains,
  precision, gradient accumulation, checkpoints); False when the main process alone fits and predicts it
  (cheap CPU models such as ``features``), the other ranks waiting;
- ``kinds``: the Dagster asset kinds of its jobs (``{"pytorch"}``, ``{"scikitlearn"}``, ...);
- ``fit(cfg, train_df, y, w, accelerator, history_path=None, checkpointer=None, log=None, report=None,
  held_out=None)`` -> ``(model, tokenizer_or_None, stats)`` with stats ``train_examples_per_s``, ``train_s``,
  ``n_steps``, ``resumed_from_step``, ``first_train_loss``, ``final_train_loss`` (plus ``pretrain_*`` after a
  pre-training stage, and optionally ``metrics``: a dict of the family's own figures, copied into
  metrics.json); ``held_out`` is the validation fold, which no stage may train on;
- ``save(model, tokenizer, model_dir)`` and ``load(model_dir, cfg, device=None)`` -> ``(model, tokenizer)``;
- ``predict(cfg, model, tokenizer, frame, tta=False, batch_size=None, max_length=None, device=None,
  accelerator=None, progress=False, precision=None)`` -> ``(probs, probs_tta_or_None)``, (n, 3) A, B, tie in input order.

A neural family only writes ``build(cfg, device)`` -> ``(model, tokenizer)`` (a
``transformers`` sequence classifier with 3 labels), ``save``, ``load`` and ``HEAD_NAMES`` (the parameter
name parts that get ``training.head_lr``), and wraps them in ``gpu_jobs.models.neural.NeuralFamily``, which
supplies ``fit`` (the shared loop) and ``predict`` (length-sorted batches, TTA). Its config class
subclasses ``gpu_jobs.config.NeuralConfig``. A family whose rows are not one tagged sequence passes
``io_fn=`` (``cfg`` -> ``neural.RowIO``: encode / collate / row length, used by training and prediction
alike; the siamese ``reward_model`` / ``bi_encoder`` and the cross-encoder's ``window:`` option), and one
with a pre-training stage ``pretrain_fn=`` (the reward model); ``gpu_jobs.train`` / ``predict`` only ask
``family.io(cfg)`` and ``family.pretrain(...)``.

Adding a family (e.g. ``my_family``): write ``gpu_jobs/models/my_family.py`` with the module-level
``build``/``save``/``load``/``HEAD_NAMES`` and, at its end::

    class MyFamilyConfig(NeuralConfig):
        family: Literal["my_family"] = "my_family"
        # ... the family's own sections, with extra keys forbidden as in NeuralConfig

    FAMILY = NeuralFamily("my_family", MyFamilyConfig, build=build, save_fn=save, load_fn=load,
                          head_names=HEAD_NAMES)

then add its one line to ``FAMILIES`` below (``"my_family": "gpu_jobs.models.my_family",``). Nothing else
changes: ``gpu_jobs.train`` / ``predict`` / ``probe`` and the Dagster assets (kinds, demo sizing) ask the
family; a profile member with ``config: my_family_x.yaml`` has its overrides checked against
``MyFamilyConfig`` when the profile loads. A non-neural family implements the protocol itself (see
``FeaturesFamily`` in ``gpu_jobs/models/features.py``); so does a neural family whose training is not the
shared loop (``DPOFamily`` in ``gpu_jobs/models/dpo.py``: a causal LM tuned with DPO, its own loop). Keep the module's heavy imports (``torch``, ``transformers``, ``peft``)
inside its functions: profiles look the config class up when the Dagster definitions load.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

FAMILIES: dict[str, str] = {  # family name -> the module that defines FAMILY
    "features": "gpu_jobs.models.features",
    "cross_encoder": "gpu_jobs.models.cross_encoder",
    "llm_classifier": "gpu_jobs.models.llm_classifier",
    "reward_model": "gpu_jobs.models.reward_model",
    "bi_encoder": "gpu_jobs.models.bi_encoder",
    "dpo": "gpu_jobs.models.dpo",
}


@runtime_checkable
class ModelFamily(Protocol):
    name: str
    config_class: type
    neural: bool
    kinds: frozenset[str]

    def fit(self, cfg, train_df, y, w, accelerator, history_path=None, checkpointer=None, log=None,
            report=None, held_out=None) -> tuple[Any, Any, dict]: ...

    def save(self, model, tokenizer, model_dir) -> None: ...

    def load(self, model_dir, cfg, device=None) -> tuple[Any, Any]: ...

    def predict(self, cfg, model, tokenizer, frame, tta=False, batch_size=None, max_length=None, device=None,
                accelerator=None, progress=False, precision=None): ...


def get_family(name: str) -> ModelFamily:
    """The family registered under ``name`` (its module is imported on first use)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {list(FAMILIES)}")
    family = importlib.import_module(FAMILIES[name]).FAMILY
    if family.name != name:
        raise RuntimeError(f"{FAMILIES[name]}.FAMILY is named {family.name!r}, registered as {name!r}")
    return family


def family_of(cfg) -> ModelFamily:
    """The family of a loaded config object."""
    return get_family(cfg.family)


def family_names() -> list[str]:
    return list(FAMILIES)

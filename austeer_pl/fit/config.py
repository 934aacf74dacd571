"""Typed settings of a fit: the one source of every default.

Each group is a frozen dataclass that validates itself and names the setting in its errors
(:class:`~austeer_pl.errors.SettingError`); a command line maps a setting's name to its flag.
``train.py``'s ``--model.*`` options are the fields of :data:`MODEL_GROUPS` (flat: ``--model.k``,
``--model.strength_epochs``), its ``--data.*`` options those of :data:`DATA_GROUPS`;
``configs/default.yaml``, ``evaluate.py --compare`` and the method registry read the same objects
(``tests/fit/test_config.py`` fails if any two disagree).

Example:
    >>> config = FitConfig.from_settings({"k": [10, 30], "strength": "gate"})
    >>> config.grid.k_values, config.strength.strength
    ((10, 30), 'gate')
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, get_type_hints

from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.placement import placement_kwargs
from austeer_pl.core.prefix import use_shared_prefix
from austeer_pl.core.quant import check_quantize
from austeer_pl.core.strength import STRENGTH_KINDS, STRENGTH_LOSSES
from austeer_pl.errors import SettingError
from austeer_pl.methods.austeer import AusteerGrid
from austeer_pl.scoring.evaluate import SCORINGS
from austeer_pl.scoring.statistics import CRITERIA
from austeer_pl.tasks.config import DataConfig

#: How the grid is chosen: by the validation criterion, or by a judge of generated text under a
#: fluency budget (behaviour tasks); ``auto`` follows the task.
SELECTIONS = ("auto", "accuracy", "judge")
CORRECTIONS = ("final", "grid")


def _check(ok: bool, setting: str, problem: str) -> None:
    if not ok:
        raise SettingError(setting, problem)


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model.

    Args:
        model_name: ``smollm2-135m-instruct`` (embedded), a hub id, a local folder or a ``.gguf`` file.
        dtype: ``float32``, ``bfloat16``, ``float16`` or None (the checkpoint's).
        cache_dir: cache of the converted embedded model.
        layout_layers: module path of the decoder layer list, for models austeer-pl does not locate (e.g. ``model.layers``).
        layout_attention: module path, inside a layer, of the attention output projection (e.g. ``self_attn.o_proj``).
        layout_ffn: module path, inside a layer, of the FFN block (e.g. ``mlp``).
        device_map: a model larger than one device: ``auto``, ``balanced``, ``sequential`` or a JSON map of module names to devices (a GPU index, ``cpu``, ``disk``); each process holds one such replica.
        max_memory: with a device_map, a JSON map of devices to the most each may hold (e.g. ``{"0": "20GiB", "cpu": "60GiB"}``).
        offload_folder: with a device_map, where weights offloaded to ``disk`` go.
        quantize: a quantised base: ``int8`` (torchao weight-only, any device), ``bnb-int8`` or ``bnb-nf4`` (bitsandbytes, CUDA); edits stay in the activations' dtype.
    """

    model_name: str = DEFAULT_MODEL
    dtype: str | None = None
    cache_dir: str | None = None
    layout_layers: str | None = None
    layout_attention: str | None = None
    layout_ffn: str | None = None
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    quantize: str | None = None

    def __post_init__(self) -> None:
        placement_kwargs(self.device_map, self.max_memory, self.offload_folder)  # a bad placement is one line now
        check_quantize(self.quantize)

    def placement(self) -> dict[str, Any]:
        """The ``load_model`` keywords of the placement (empty: the whole model on the module's device)."""
        return {
            **({"quantize": self.quantize} if self.quantize else {}),
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
        }

    def layout_spec(self) -> dict[str, str | None] | None:
        """The module paths recorded in exported states (None: located automatically)."""
        if not self.layout_layers:
            return None
        return {"layers": self.layout_layers, "attention": self.layout_attention, "ffn": self.layout_ffn}


@dataclass(frozen=True)
class SelectionConfig:
    """How the grid is chosen on validation (the regret table of ``benchmarks/selection.py`` is why).

    Args:
        scoring: validation scoring, ``loglik``, ``generate`` or ``paper`` (None: the task's default).
        selection: ``accuracy`` (the validation criterion), ``judge`` (behaviour: the judge score of greedy generations from validation prompts, among grid points within the fluency budget) or ``auto`` (``judge`` for behaviour tasks such as ``sentiment``).
        criterion: ``loss`` (the mean choice log-loss, ``logsumexp(choices) - log p(right)``), ``margin`` (right minus best wrong log-likelihood) or ``accuracy``; accuracy is always reported beside it. Generation scorings use accuracy.
        halving: successive halving: every grid point on the first ``halving_min_examples`` validation examples, the best ``1/halving_eta`` on ``halving_eta`` times as many, ... until two remain, which see all; false scores every point on every example.
        halving_min_examples: examples of halving's first round.
        halving_eta: the factor between halving's rounds.
        harm_budget: the largest mean per-token KL (nats) to the unsteered next-token distribution on ordinary text a grid point may have; points above it are not candidates. None: no bound.
        verdict_level: the verdict's one-sided level: the best point must beat "no steering" by more than the noise, or the fit exports an empty state (``train.py --export_anyway`` exports the best point). 1 turns the verdict off.
        verdict_correction: ``final`` divides the level by the number of points in halving's last round; ``grid`` by the whole grid (Bonferroni, stricter).
        replay: score grid points from the unsteered model's recorded layers below their first steered layer (exact; about half the work for upper-layer units).
    """

    scoring: str | None = None
    selection: str = "auto"
    criterion: str = "loss"
    halving: bool = True
    halving_min_examples: int = 16
    halving_eta: int = 3
    harm_budget: float | None = 0.5
    verdict_level: float = 0.05
    verdict_correction: str = "final"
    replay: bool = True

    def __post_init__(self) -> None:
        _check(
            self.scoring is None or self.scoring in SCORINGS,
            "scoring",
            f"must be one of {', '.join(SCORINGS)}, not {self.scoring!r}",
        )
        _check(
            self.selection in SELECTIONS, "selection", f"must be one of {', '.join(SELECTIONS)}, not '{self.selection}'"
        )
        _check(self.criterion in CRITERIA, "criterion", f"must be one of {', '.join(CRITERIA)}, not '{self.criterion}'")
        _check(
            self.halving_min_examples >= 1,
            "halving_min_examples",
            f"must be 1 or more, not {self.halving_min_examples}",
        )
        _check(self.halving_eta >= 2, "halving_eta", f"must be 2 or more, not {self.halving_eta}")
        _check(
            self.harm_budget is None or (math.isfinite(self.harm_budget) and self.harm_budget > 0),
            "harm_budget",
            f"must be a positive KL in nats per token (or null for no bound), not {self.harm_budget}",
        )
        _check(
            self.verdict_correction in CORRECTIONS,
            "verdict_correction",
            f"must be final or grid, not '{self.verdict_correction}'",
        )
        _check(
            math.isfinite(self.verdict_level) and 0 < self.verdict_level <= 1,
            "verdict_level",
            f"must be in (0, 1] (1 turns the verdict off), not {self.verdict_level}",
        )

    def choose_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~austeer_pl.fit.choose.choose` these settings mean (the
        criterion as set; a fit under generation scoring uses accuracy)."""
        return {
            "criterion": self.criterion,
            "halving": self.halving,
            "min_examples": self.halving_min_examples,
            "eta": self.halving_eta,
            "harm_budget": self.harm_budget,
            "level": self.verdict_level,
            "correction": self.verdict_correction,
        }


@dataclass(frozen=True)
class StrengthConfig:
    """The learned strength (:mod:`austeer_pl.core.strength`), trained after selection with the LLM frozen.

    Args:
        strength: ``momentum`` (the paper's rule ``alpha * m``), or a learned ``scalar`` per unit or input-conditioned ``gate``.
        strength_epochs: epochs of the learned-strength phase.
        strength_lr: Adam learning rate of the strength parameters.
        strength_loss: ``nll`` (the right answer's negative log-likelihood) or ``choice`` (the logistic loss of right vs. wrong answer, the decision log-likelihood scoring makes).
        kl_weight: weight of KL(unsteered || steered) of the next-token distribution at the answer position.
        patience: validation epochs without improvement before the strength phase stops.
        gate_layer: decoder layer whose input the gate reads (default: the first steered layer).
        gate_width: hidden width of the gate.
    """

    strength: str = "momentum"
    strength_epochs: int = 3
    strength_lr: float = 0.01
    strength_loss: str = "nll"
    kl_weight: float = 1.0
    patience: int = 2
    gate_layer: int | None = None
    gate_width: int = 16

    def __post_init__(self) -> None:
        _check(
            self.strength in STRENGTH_KINDS,
            "strength",
            f"'{self.strength}' is unknown; choose one of {', '.join(STRENGTH_KINDS)}",
        )
        _check(
            self.strength_loss in STRENGTH_LOSSES,
            "strength_loss",
            f"'{self.strength_loss}' is unknown; choose one of {', '.join(STRENGTH_LOSSES)}",
        )
        _check(self.strength_epochs >= 0, "strength_epochs", f"must be 0 or more, not {self.strength_epochs}")
        _check(self.strength_lr > 0, "strength_lr", f"must be positive, not {self.strength_lr}")
        _check(self.kl_weight >= 0, "kl_weight", f"must be 0 or more, not {self.kl_weight}")
        _check(self.patience >= 1, "patience", f"must be 1 or more, not {self.patience}")
        _check(self.gate_width >= 1, "gate_width", f"must be 1 or more, not {self.gate_width}")

    @property
    def learned(self) -> str | None:
        """The learned variant's method name (``austeer_scalar``, ``austeer_gate``), or None."""
        return f"austeer_{self.strength}" if self.strength != "momentum" and self.strength_epochs > 0 else None


@dataclass(frozen=True)
class JudgeConfig:
    """The judge of a behaviour fit (``selection: judge``).

    Args:
        judge: ``vader``, ``vader:negative`` or a local classifier folder (see :mod:`austeer_pl.scoring.judges`).
        fluency_budget: the largest perplexity ratio to the unsteered generations a chosen behaviour state may have.
        max_new_tokens: tokens generated per validation prompt when judging.
        max_judge_prompts: distinct validation prompts generated from when judging.
    """

    judge: str = "vader"
    fluency_budget: float = 1.5
    max_new_tokens: int = 32
    max_judge_prompts: int = 32

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.fluency_budget) and self.fluency_budget > 0,
            "fluency_budget",
            f"must be a positive perplexity ratio, not {self.fluency_budget}",
        )
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be 1 or more, not {self.max_new_tokens}")
        _check(self.max_judge_prompts >= 1, "max_judge_prompts", f"must be 1 or more, not {self.max_judge_prompts}")


@dataclass(frozen=True)
class BatchConfig:
    """How the pairs and examples are batched (the data settings that do not decide the splits).

    Args:
        batch_size: pairs per forward pass in fitting (per process).
        eval_batch_size: examples per forward pass in validation and test; the grid's choice is the same for any number of processes at the same value.
        num_workers: DataLoader worker processes.
        shared_prefix: in the momentum pass, run each pair's prompt once and continue both answers from its KV cache (about half the work on short answers; the units equal the full sequences' to float tolerance). ``False`` reads the two full sequences of each pair. ``auto`` shares on the CPU and reads full sequences on an accelerator, where a small model measured slower shared.
    """

    batch_size: int = 16
    eval_batch_size: int = 16
    num_workers: int = 0
    shared_prefix: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            _check(
                not isinstance(value, bool) and isinstance(value, int) and value >= 1,
                name,
                f"must be 1 or more, got {value!r}",
            )
        _check(self.num_workers >= 0, "num_workers", f"must be 0 or more, not {self.num_workers}")
        use_shared_prefix(self.shared_prefix, "cpu")  # a bad value fails here, before any work


#: The groups of ``train.py``'s ``--model.*`` options, in the order ``--help`` lists them.
MODEL_GROUPS: tuple[type, ...] = (ModelConfig, AusteerGrid, StrengthConfig, SelectionConfig, JudgeConfig)
#: The groups of its ``--data.*`` options.
DATA_GROUPS: tuple[type, ...] = (DataConfig, BatchConfig)


@dataclass(frozen=True)
class FitConfig:
    """Every model-side setting of a fit, grouped. :meth:`from_settings` takes ``train.py``'s flat names."""

    model: ModelConfig = field(default_factory=ModelConfig)
    grid: AusteerGrid = field(default_factory=AusteerGrid)
    strength: StrengthConfig = field(default_factory=StrengthConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FitConfig:
        """Group flat settings (``{"k": [10], "strength": "gate", ...}``); missing ones take their defaults."""
        return cls(*group_settings(MODEL_GROUPS, settings))

    def settings(self) -> dict[str, Any]:
        """The flat settings (``train.py``'s ``--model.*`` names)."""
        return {
            f.name: getattr(group, f.name)
            for group in (self.model, self.grid, self.strength, self.selection, self.judge)
            for f in fields(group)
        }


def group_settings(groups: Sequence[type], settings: Mapping[str, Any]) -> list[Any]:
    """One instance of each group from flat ``settings`` (unknown names are refused)."""
    known = {f.name for group in groups for f in fields(group)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SettingError(unknown[0], f"is not a setting; choose from {', '.join(sorted(known))}")
    return [group(**{f.name: settings[f.name] for f in fields(group) if f.name in settings}) for group in groups]


def defaults(groups: Sequence[type]) -> dict[str, Any]:
    """The default of every setting of ``groups`` (tuples as lists, as a command line shows them)."""
    out = {}
    for group in groups:
        for f in fields(group):
            value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def signature(groups: Sequence[type], *, self_param: bool = True) -> inspect.Signature:
    """A signature with one keyword per setting of ``groups`` (its default and type): what
    LightningCLI reads from a module's ``__init__`` to build the ``--model.*`` options."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] if self_param else []
    values = defaults(groups)
    for group in groups:
        hints = get_type_hints(group)
        for f in fields(group):
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[f.name], annotation=hints[f.name]
                )
            )
    return inspect.Signature(params)


def settings_doc(intro: str, groups: Sequence[type]) -> str:
    """A class docstring whose ``Args:`` list every setting of ``groups`` (from each group's own
    docstring), so ``--help`` describes each option where it is defined."""
    lines = [intro.rstrip(), "", "Args:"]
    for group in groups:
        doc = inspect.getdoc(group) or ""
        args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
        for line in args.splitlines():
            if line.strip():
                lines.append(f"    {line.strip()}" if not line.startswith("        ") else f"        {line.strip()}")
    return "\n".join(lines) + "\n"


__all__ = [
    "DATA_GROUPS",
    "MODEL_GROUPS",
    "SELECTIONS",
    "BatchConfig",
    "FitConfig",
    "JudgeConfig",
    "ModelConfig",
    "SelectionConfig",
    "StrengthConfig",
    "defaults",
    "group_settings",
    "settings_doc",
    "signature",
]

"""Fine-tuning hyperparameters: defaults from the product description, valid ranges, resolution.

One place validates them for every entry point (CreateJob, ValidateJob, the trainer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

TRAIN_ON_INPUTS_CHOICES = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    default: Any
    kind: type
    low: float | None
    high: float | None
    low_inclusive: bool
    high_inclusive: bool
    help: str

    def range_text(self) -> str:
        lo = "[" if self.low_inclusive else "("
        hi = "]" if self.high_inclusive else ")"
        return f"{lo}{self.low:g}, {self.high:g}{hi}"


PARAMS: tuple[Param, ...] = (
    Param("learning_rate", 1e-4, float, 0.0, 0.1, False, True,
          "Peak learning rate (the step size of each update)."),
    Param("lr_peak_ratio", 0.0, float, 0.0, 1.0, True, True,
          "0: constant rate after warmup. r > 0: start at r x peak, rise to the peak over the "
          "warmup, then follow a cosine back down to r x peak at the last step."),
    Param("warmup_ratio", 0.0, float, 0.0, 1.0, True, False,
          "Fraction of the total steps spent in linear warmup."),
    Param("min_examples", 200, int, 1, 10_000_000, True, True,
          "Training is refused below this many examples after topic filtering."),
    Param("test_fraction", 0.1, float, 0.0, 0.5, False, True,
          "Share of the examples held out for evaluation (seeded, deterministic split)."),
    Param("n_evals", 20, int, 0, 1000, True, True,
          "Evaluations on the test split, spread evenly over training."),
    Param("max_epochs", 20, int, 1, 100, True, True,
          "Upper bound on passes over the training split; early stopping may end sooner."),
    Param("n_checkpoints", 1, int, 1, 100, True, True,
          "Checkpoints kept, evenly spaced; 1 keeps the final model only."),
    Param("batch_size", 8, int, 1, 1024, True, True, "Examples per optimisation step."),
    Param("lora_rank", 8, int, 1, 512, True, True, "Rank of the LoRA adapter matrices."),
    Param("lora_alpha", 8.0, float, 0.0, 4096.0, False, True,
          "Scale of the LoRA update (alpha / rank multiplies it)."),
    Param("lora_dropout", 0.1, float, 0.0, 0.9, True, True, "Dropout on the LoRA input."),
    Param("early_stopping_patience", 3, int, 0, 1000, True, True,
          "Evaluations without improvement of eval loss before training stops; 0 disables."),
    Param("seed", 42, int, 0, 2**31 - 1, True, True, "Seed for the split, init and shuffling."),
)
PARAMS_BY_NAME = {p.name: p for p in PARAMS}


@dataclasses.dataclass(frozen=True)
class Violation:
    field: str
    description: str


class HyperparameterError(ValueError):
    def __init__(self, violations: list[Violation]):
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


@dataclasses.dataclass(frozen=True)
class ResolvedHyperparameters:
    learning_rate: float = 1e-4
    lr_peak_ratio: float = 0.0
    warmup_ratio: float = 0.0
    min_examples: int = 200
    test_fraction: float = 0.1
    n_evals: int = 20
    max_epochs: int = 20
    n_checkpoints: int = 1
    batch_size: int = 8
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    early_stopping_patience: int = 3
    seed: int = 42
    lora_target_modules: tuple[str, ...] = ()
    train_on_inputs: str = "auto"  # as requested: auto / true / false

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResolvedHyperparameters":
        data = dict(data)
        data["lora_target_modules"] = tuple(data.get("lora_target_modules", ()))
        return cls(**data)


def resolve(
    given: dict[str, Any],
    *,
    available_modules: tuple[str, ...],
    default_modules: tuple[str, ...],
) -> ResolvedHyperparameters:
    """Fill defaults, check every range, and return the resolved values or raise with all errors."""
    violations: list[Violation] = []
    values: dict[str, Any] = {}
    for name in given:
        if name not in PARAMS_BY_NAME and name not in ("lora_target_modules", "train_on_inputs"):
            violations.append(Violation(name, "unknown hyperparameter"))
    for p in PARAMS:
        raw = given.get(p.name)
        if raw is None:
            values[p.name] = p.default
            continue
        if p.kind is int and (isinstance(raw, bool) or int(raw) != raw):
            violations.append(Violation(p.name, f"must be a whole number, got {raw!r}"))
            continue
        value = p.kind(raw)
        low_ok = value >= p.low if p.low_inclusive else value > p.low
        high_ok = value <= p.high if p.high_inclusive else value < p.high
        if not (low_ok and high_ok):
            violations.append(
                Violation(p.name, f"must be in {p.range_text()}, got {raw!r}. {p.help}")
            )
            continue
        values[p.name] = value
    modules = given.get("lora_target_modules") or ()
    if modules:
        unknown = [m for m in modules if m not in available_modules]
        if unknown:
            violations.append(Violation(
                "lora_target_modules",
                f"{', '.join(unknown)} not in this model; choose from {', '.join(available_modules)}",
            ))
        if len(set(modules)) != len(modules):
            violations.append(Violation("lora_target_modules", "lists a module twice"))
        values["lora_target_modules"] = tuple(modules)
    else:
        values["lora_target_modules"] = tuple(default_modules)
    toi = (given.get("train_on_inputs") or "auto").lower()
    if toi not in TRAIN_ON_INPUTS_CHOICES:
        violations.append(Violation("train_on_inputs", f"must be one of auto/true/false, got {toi!r}"))
    values["train_on_inputs"] = toi
    if violations:
        raise HyperparameterError(violations)
    return ResolvedHyperparameters(**values)


def learning_rate_multiplier(step: int, total_steps: int, warmup_ratio: float, peak_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    peak_ratio == 0: linear warmup from ~0 to the peak, then constant.
    peak_ratio == r > 0: start at r, rise linearly to 1 over the warmup, then a cosine from 1
    down to r at the last step.
    """
    import math

    total_steps = max(1, total_steps)
    warmup_steps = int(math.ceil(warmup_ratio * total_steps))
    if peak_ratio <= 0:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return 1.0
    if warmup_steps and step < warmup_steps:
        return peak_ratio + (1.0 - peak_ratio) * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return peak_ratio + (1.0 - peak_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def spread(n: int, total_steps: int) -> list[int]:
    """``n`` steps spread evenly over ``1..total_steps``, the last one at ``total_steps``: where
    training evaluates (``n_evals``) and keeps checkpoints (``n_checkpoints``)."""
    if n <= 0 or total_steps <= 0:
        return []
    return sorted({max(1, -(-k * total_steps // n)) for k in range(1, n + 1)})


def planned_total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    """Optimisation steps of ``epochs`` passes over ``n_examples`` in batches of ``batch_size``
    (the last batch of an epoch may be short)."""
    return math.ceil(n_examples / batch_size) * epochs


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warmup, as ``learning_rate_multiplier`` counts them."""
    return int(math.ceil(warmup_ratio * max(1, total_steps)))


MAX_SCHEDULE_POINTS = 40  # points of ``learning_rate_points``: enough for a small plot


def learning_rate_points(learning_rate: float, total_steps: int, warmup_ratio: float, peak_ratio: float,
                         max_points: int = MAX_SCHEDULE_POINTS) -> list[tuple[int, float]]:
    """``(step, learning rate)`` for steps counted from 1, where the schedule changes course
    and at its ends: step 1, the last warmup step, the first step after the warmup and the last
    step; with a cosine decay (``peak_ratio`` > 0) also evenly spaced steps along it, up to
    ``max_points`` in all. The rate at step ``s`` is the one the trainer's scheduler uses for
    that step: ``learning_rate x learning_rate_multiplier(s - 1, ...)`` (the scheduler starts at
    its step 0 and advances after every optimisation step). Between two points the schedule is
    a straight line (warmup, constant) or close to one (the cosine between sampled steps)."""
    if total_steps <= 0:
        return []
    warmup = min(warmup_steps(total_steps, warmup_ratio), total_steps)
    steps = {1, total_steps}
    if warmup:
        steps.add(warmup)
        if warmup < total_steps:
            steps.add(warmup + 1)
    first_decay = warmup + 1
    if peak_ratio > 0 and first_decay < total_steps:
        room = max(0, max_points - len(steps))
        span = total_steps - first_decay
        for k in range(1, room + 1):
            steps.add(first_decay + round(k * span / (room + 1)))
    return [(s, learning_rate * learning_rate_multiplier(s - 1, total_steps, warmup_ratio, peak_ratio))
            for s in sorted(steps)]


def to_proto(resolved: ResolvedHyperparameters):
    """ResolvedHyperparameters -> common.v1.Hyperparameters with every field set."""
    from tuneforge.api.common.v1 import common_pb2

    msg = common_pb2.Hyperparameters()
    for p in PARAMS:
        setattr(msg, p.name, getattr(resolved, p.name))
    msg.lora_target_modules.extend(resolved.lora_target_modules)
    msg.train_on_inputs = resolved.train_on_inputs
    return msg


def from_proto(msg) -> dict[str, Any]:
    """common.v1.Hyperparameters -> the fields that are set, as a dict for ``resolve``."""
    given: dict[str, Any] = {}
    for p in PARAMS:
        if msg.HasField(p.name):
            given[p.name] = getattr(msg, p.name)
    if msg.lora_target_modules:
        given["lora_target_modules"] = tuple(msg.lora_target_modules)
    if msg.HasField("train_on_inputs"):
        given["train_on_inputs"] = msg.train_on_inputs
    return given

"""The typed, validated trial config: YAML files, dotted overrides and one-line errors.

A trial is fully described by one `TrialConfig`. It is built from a YAML file, from
`--set section.key=value` overrides, or from the dict that Ray Tune passes to a trial, and
validated at that edge: nothing deeper reads raw dict keys. Importing this module does not
import TensorFlow, so a bad config is refused in milliseconds.
"""

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from study.data import DATASETS, one_line
from study.losses import LOSSES
from study.optimizers import OPTIMIZERS, SCHEDULES

# The one metric that the searcher, the scheduler and the analysis rank trials by. Never a
# loss: values of different losses are not comparable.
METRIC = "val_accuracy"
MODE = "max"
# Where a trial's time went before it trained, as its first two epochs report them
# (study/trainable.py's EpochReporter): its process's start to its first step, and its
# first epoch's time beyond its second's (compiling, or reading the compilation cache).
STARTUP_SECONDS, COMPILE_SECONDS = TIMINGS = ("startup_seconds", "compile_seconds")

# Steps per execution with a GPU under "auto": enough to hide Python's per-step dispatch.
GPU_STEPS_PER_EXECUTION = 16

ACTIVATIONS = ("elu", "relu", "gelu", "silu", "selu", "leaky_relu", "tanh")


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def _check_name(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


class _Section(BaseModel):
    # Unknown keys are errors, and a validated config never changes under a running trial.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: str = "cifar100"
    # CIFAR-100 has 100 fine and 20 coarse classes; CIFAR-10 ignores this.
    label_mode: Literal["fine", "coarse"] = "fine"
    # The official tarball, a folder holding it, or its extracted folder. None: the download
    # cache (~/.keras/datasets), downloading once if needed.
    data_dir: str | None = None
    # "split": validate on a stratified split carved from the training set, keeping the
    # test set for the final evaluation only. "test": validate on the test set, as the
    # 2020 notebook did (only for reproducing it).
    validation: Literal["split", "test"] = "split"
    # A fraction of the training set in (0, 1), or a count of images (an integer >= 1).
    validation_size: float | int = Field(default=0.1, gt=0)
    # The split (and subsets) depend on this seed only, not on the trial's seed, so every
    # trial of a study is validated on the same images.
    split_seed: int = Field(default=0, ge=0)
    # Keep only this many training (and test) images, stratified; for smoke runs.
    train_subset: int | None = Field(default=None, ge=1)
    test_subset: int | None = Field(default=None, ge=1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value):
        return _check_name(value, DATASETS, "dataset")

    @field_validator("validation_size")
    @classmethod
    def _fraction_or_count(cls, value):
        if isinstance(value, float) and not value < 1:
            raise ValueError("must be a fraction in (0, 1) or a whole number of images >= 1")
        return value

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset].num_classes[self.label_mode]


class ModelConfig(_Section):
    # Multiplies every layer's width: 1.0 is the notebook's 128-256-512 convs and 1024 dense.
    width: float = Field(default=1.0, gt=0, le=8)
    conv_dropout: float = Field(default=0.25, ge=0, lt=1)
    dense_dropout: float = Field(default=0.5, ge=0, lt=1)
    activation: str = "elu"
    batch_norm: bool = False
    # Random horizontal flips and 4-pixel translations, as Keras layers active in training only.
    augment: bool = False

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, value):
        return _check_name(value, ACTIVATIONS, "activation")


class LossConfig(_Section):
    name: str = "categorical_crossentropy"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    focal_gamma: float = Field(default=2.0, ge=0, le=10)
    # rescaled_square only (Hui & Belkin, 2021): the weight k and the target M of the true
    # class. Their 1,000-class tasks used k = 15, M = 30; for 100 classes, k = 1 (no extra
    # weight) and M = 15 (docs/reference.md says why); for 10 classes they rescaled nothing
    # (k = M = 1).
    square_k: float = Field(default=1.0, gt=0, le=100)
    square_m: float = Field(default=15.0, gt=0, le=100)
    # "auto": each loss gets the head it is meant for (see study/losses.py).
    # "softmax": a softmax head for every loss, as the 2020 notebook had.
    head: Literal["auto", "softmax"] = "auto"

    @field_validator("name")
    @classmethod
    def _known_loss(cls, value):
        return _check_name(value, LOSSES, "loss")

    @model_validator(mode="after")
    def _smoothing_supported(self):
        if self.label_smoothing > 0 and not LOSSES[self.name].label_smoothing:
            allowed = ", ".join(n for n, spec in LOSSES.items() if spec.label_smoothing)
            raise ValueError(
                f"label_smoothing > 0 is not defined for loss {self.name!r}; only for: {allowed}"
            )
        return self


class OptimizerConfig(_Section):
    name: str = "adam"
    # Not Keras's 1e-3, which kills the full-width network without batch norm.
    learning_rate: float = Field(default=3e-4, gt=0, le=10)
    # Decoupled weight decay (applied by the optimizer, scaled by the learning rate); not
    # applied to biases or batch-norm scales and offsets.
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    # SGD only.
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    schedule: str = "cosine"
    # inverse_time only: lr / (1 + decay * step), the old Keras `decay=` argument.
    decay: float = Field(default=1e-6, ge=0, allow_inf_nan=False)
    # cosine only: linear warm-up over this many epochs, then cosine decay to zero.
    warmup_epochs: float = Field(default=0.0, ge=0)

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, value):
        return _check_name(value, OPTIMIZERS, "optimizer")

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value):
        return _check_name(value, SCHEDULES, "schedule")


class TrainingConfig(_Section):
    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    # Evaluation has no gradients, so it can use much larger batches.
    eval_batch_size: int = Field(default=1024, ge=1, le=65_536)
    # When to save model.keras (always after the last epoch as well). "auto": at the first
    # epoch end at least `checkpoint_seconds` after the trial's start or its last checkpoint:
    # at most one checkpoint that often, however short the epochs (a 1.5 s GPU epoch would
    # otherwise spend a fifth of its time saving), and a killed worker loses at most that
    # long plus one epoch. An integer: every that many epochs.
    checkpoint_every: int | Literal["auto"] = "auto"
    checkpoint_seconds: float = Field(default=60.0, gt=0, le=86_400, allow_inf_nan=False)
    # "auto": on when a GPU is visible, off on CPU (where they slow training down; JAX
    # compiles on CPU as well, see `resolve`).
    mixed_precision: bool | Literal["auto"] = "auto"
    jit_compile: bool | Literal["auto"] = "auto"
    # Training steps per call into TensorFlow; "auto": 16 with a GPU, where it saves the
    # per-step Python dispatch, 1 on CPU (where study.bench measured no gain). The math is
    # the same either way; a divergence is noticed at the end of an execution.
    steps_per_execution: Annotated[int, Field(ge=1, le=1_000)] | Literal["auto"] = "auto"
    # Stop a dead trial (study/health.py): one whose training and validation accuracy sat
    # at chance for this many epochs in a row, after enough steps to judge. 0: never.
    dead_patience: int = Field(default=2, ge=0, le=10_000)

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _auto_or_epochs(cls, value):
        if value == "auto":
            return value
        # 2.0 too: a CSV column of whole numbers may read back as floats.
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and float(value).is_integer() and value >= 1:
            return int(value)
        raise ValueError(f"must be auto or a whole number of epochs >= 1 (got {value!r})")

    def resolve(self, gpu: bool, backend: str = "tensorflow") -> dict:
        """What the "auto" settings mean on a machine with or without a GPU. On CPU, JAX
        compiles too: uncompiled, it runs op by op, several times slower."""

        def pick(value, with_gpu, without_gpu):
            return (with_gpu if gpu else without_gpu) if value == "auto" else value

        return {
            "mixed_precision": pick(self.mixed_precision, True, False),
            "jit_compile": pick(self.jit_compile, True, backend != "tensorflow"),
            "steps_per_execution": pick(self.steps_per_execution, GPU_STEPS_PER_EXECUTION, 1),
        }


class TrialConfig(_Section):
    """Everything one trial needs; a best trial is rebuilt from this alone."""

    seed: int = Field(default=0, ge=0, lt=2**31)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _warmup_within_training(self):
        if self.optimizer.warmup_epochs >= self.training.epochs:
            raise ValueError(
                f"optimizer.warmup_epochs ({self.optimizer.warmup_epochs:g}) must be less "
                f"than training.epochs ({self.training.epochs})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _allowed_keys(root: type[BaseModel], section: str) -> str | None:
    owner = root
    for part in filter(None, section.split(".")):
        field = getattr(owner, "model_fields", {}).get(part)
        if field is None:
            return None
        owner = field.annotation
    fields = getattr(owner, "model_fields", None)
    return ", ".join(fields) if fields else None


def format_error(error: ValidationError, root: type[BaseModel] = None, prefix: str = "") -> str:
    """One line naming the first bad field (as `prefix` + its dotted path) and what is allowed."""
    first = error.errors()[0]
    location = prefix + ".".join(str(part) for part in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        section = location.rpartition(".")[0]
        allowed = _allowed_keys(root or TrialConfig, section.removeprefix(prefix.rstrip(".")))
        where = f"in '{section}'" if section else "at the top level"
        listing = f"; allowed keys {where}: {allowed}" if allowed else ""
        return f"unknown key '{location}'{listing}{more}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "model_type":
        return f"{location or 'config'}: must be a mapping of keys to values{more}"
    head = f"{location}: " if location else ""
    got = "" if first["type"].startswith("value_error") else f" (got {first['input']!r})"
    return f"{head}{message}{got}{more}"


def validate(raw: dict[str, Any]) -> TrialConfig:
    """Validates a nested dict (a YAML file's contents, or what Ray Tune passes)."""
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_error(error)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not a text file (not UTF-8)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}") from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting.
        raise ConfigError(f"--config: {path} nests too deeply") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, not {raw!r:.40}")
    return raw


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """Splits `section.key=value`; the value is parsed as YAML (0.01, true, null, [a, b])."""
    dotted, sep, text = assignment.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML") from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting.
        raise ConfigError(f"--set {dotted.strip()}: the value nests too deeply") from None
    return dotted.strip(), value


def set_value(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets `section.key` in a nested dict, creating sections as needed."""
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{section}' is not a section")
        node = child
    node[key] = value


def load_config_dict(raw: dict[str, Any], overrides=(), values=None) -> TrialConfig:
    """Applies `--set` overrides and plain values to a parsed config, then validates."""
    for assignment in overrides:
        set_value(raw, *parse_assignment(assignment))
    for dotted, value in (values or {}).items():
        set_value(raw, dotted, value)
    return validate(raw)


def load_config(path: str | Path | None = None, overrides=(), values=None) -> TrialConfig:
    """Reads a trial-only YAML config (or the defaults), applies overrides, validates."""
    return load_config_dict(read_yaml(Path(path)) if path is not None else {}, overrides, values)


def dump_yaml(config: TrialConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"optimizer": {"name": "adam"}} gives "optimizer.name"."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def overlay(base: dict[str, Any], values) -> dict[str, Any]:
    """`values` laid over a copy of the nested `base`: dotted keys (what Tune's searcher and
    the tables' columns hold) or whole sections. A missing value (None, or NaN from an
    empty CSV cell) leaves the base value: a key that a search condition left out."""
    raw = {key: dict(v) if isinstance(v, dict) else v for key, v in base.items()}
    for key, value in dict(values).items():
        value = _plain(value)
        if isinstance(value, dict):
            for inner, inner_value in flatten(value, f"{key}.").items():
                if _plain(inner_value) is not None:
                    set_value(raw, inner, _plain(inner_value))
        elif value is not None:
            set_value(raw, key, value)
    return raw


def config_values(row, base: dict[str, Any]) -> dict[str, Any]:
    """The config's own dotted keys among a table row's columns (trials.csv has others)."""
    return {key: row[key] for key in flatten(base) if key in row}


def from_params(values, base: dict[str, Any] | None = None) -> TrialConfig:
    """The one way from a trial's values (Tune's config, a trials.csv row) to its config:
    laid over the study's base config, then validated."""
    return validate(overlay(base or {}, values))


def _plain(value):
    """A plain Python value; NumPy scalars unwrapped, NaN (an empty cell) as None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value

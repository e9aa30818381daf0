"""The study config: a base trial config plus the `search` section that varies it.

A config file holds the trial sections (`data`, `model`, ...) and an optional `search`
section: the search space over dotted trial keys, how many trials, the searcher, the
scheduler and the resources per trial. Everything is checked here, before Ray starts:
each searched value must make a valid trial config. study/search.py turns it into what
Ray Tune and Optuna take.
"""

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from study.config import (
    METRIC,
    ConfigError,
    TrialConfig,
    format_error,
    from_params,
    load_config_dict,
    parse_assignment,
    read_yaml,
    set_value,
)
from study.files import CONFIG_FILE, OPTUNA_FILE  # noqa: F401  Imported from here too.


def default_config() -> Path:
    """configs/default.yaml: in the checkout, or as the installed package's data
    (study.configs) where the package was installed from a wheel."""
    checkout = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    if checkout.is_file():
        return checkout
    import importlib.resources

    return Path(str(importlib.resources.files("study.configs") / "default.yaml"))


# Data-parallel training is not built: a trial given two GPUs would train on one.
ONE_GPU = "a trial trains on one GPU, so at most 1 (fractions such as 0.25 pack trials on a GPU)"
# Trials that share a GPU when neither --gpus-per-trial nor search.gpus_per_trial says:
# on an H200, 4 of the default trial started together trained 2.4 times the images of one
# in the same time, their start and compilation counted (docs/performance.md); a trial of
# the full-width network holds about 1 GiB of the GPU's memory.
TRIALS_PER_GPU = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Distribution(_Strict):
    """One searched key: exactly one of `choice`, `uniform`, `loguniform`, `integer`.

    `by` and `ranges` make a numeric range depend on an earlier choice (learning rates
    per optimizer); `when` samples the key only when earlier keys take the listed values
    (label smoothing only for the losses that define it), else the base value stands.
    """

    choice: list[Any] | None = None
    uniform: tuple[FiniteFloat, FiniteFloat] | None = None
    loguniform: tuple[FiniteFloat, FiniteFloat] | None = None
    integer: tuple[int, int] | None = None  # inclusive bounds
    by: str | None = None
    ranges: dict[str, tuple[FiniteFloat, FiniteFloat]] | None = None
    when: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("choice", "uniform", "loguniform", "integer") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, integer")
        if self.choice is not None and (self.by or self.ranges):
            raise ValueError("by/ranges apply to numeric ranges, not to a choice")
        if bool(self.by) != bool(self.ranges):
            raise ValueError("by and ranges go together")
        ranges = [] if self.kind == "choice" else [self.bounds, *(self.ranges or {}).values()]
        for low, high in ranges:
            if not low < high:
                raise ValueError(f"range [{low}, {high}] must have low < high")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform range [{low}, {high}] must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "integer") if getattr(self, k))

    @property
    def bounds(self) -> tuple:
        return getattr(self, self.kind)

    def range_for(self, values: dict[str, Any]) -> tuple:
        """The numeric range given the values sampled so far."""
        if self.by is None:
            return self.bounds
        return (self.ranges or {}).get(str(values.get(self.by)), self.bounds)

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in (self.when or {}).items())

    def contains(self, value: Any, values: dict[str, Any]) -> bool:
        if self.kind == "choice":
            return value in self.choice
        low, high = self.range_for(values)
        return isinstance(value, int | float) and low <= value <= high


# Compare the values of one key on an equal footing: the study's question is the loss.
DEFAULT_STRATIFY = "loss.name"


class SearchConfig(_Strict):
    num_samples: int = Field(default=64, ge=1)
    # A choice key whose every value gets an equal share of num_samples, its own searcher
    # model over the other keys and its own ASHA rungs, so that the values are compared
    # on an equal footing. null: one joint search. Left out: loss.name when the space
    # chooses it, else null. The grid searcher runs every value anyway and ignores it.
    stratify: str | None = DEFAULT_STRATIFY
    # grid: every combination of the space's choices, num_samples times (no searcher).
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    seed: int = Field(default=0, ge=0)
    # ASHA on epochs; its maximum is training.epochs.
    grace_period: int = Field(default=2, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1, allow_inf_nan=False)
    # Retries of a failed trial, each from its latest checkpoint.
    max_failures: int = Field(default=3, ge=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    # null: 1/TRIALS_PER_GPU (0.25) when the study has GPUs (--gpus N), else 0. Fractions
    # pack trials on a GPU; 1 gives each trial a whole one.
    gpus_per_trial: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    space: dict[str, Distribution] = Field(default_factory=dict)
    # The notebook's configuration, evaluated first so every study has the baseline.
    baseline: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _resolve_stratify(cls, raw):
        """Left out, stratify follows the space: by loss.name where the space chooses it."""
        if not isinstance(raw, dict):
            return raw
        if raw.get("metric") == METRIC:
            # Study folders written when the metric was a setting (it had one allowed
            # value): every study ranks by val_accuracy, never a loss, whose values are
            # not comparable across losses.
            raw = {key: value for key, value in raw.items() if key != "metric"}
        if raw.get("searcher") == "grid":
            return {**raw, "stratify": None}
        if "stratify" not in raw:
            space = raw.get("space")
            entry = space.get(DEFAULT_STRATIFY) if isinstance(space, dict) else None
            chosen = (
                entry.get("choice") if isinstance(entry, dict) else getattr(entry, "choice", None)
            )
            return {**raw, "stratify": DEFAULT_STRATIFY if chosen is not None else None}
        return raw

    @property
    def strata(self) -> list:
        """The stratifying key's values, the baseline's first; [None] for a joint search."""
        if self.stratify is None:
            return [None]
        values = list(self.space[self.stratify].choice)
        first = self.baseline.get(self.stratify, values[0])
        return [first, *(value for value in values if value != first)]

    def shares(self) -> dict:
        """Trials per stratum: num_samples split as evenly as can be (shares differ by at
        most one, the earlier strata taking the remainder); the baseline is one of its own
        stratum's trials."""
        count, extra = divmod(self.num_samples, len(self.strata))
        return {value: count + (i < extra) for i, value in enumerate(self.strata)}

    @field_validator("gpus_per_trial")
    @classmethod
    def _one_gpu_at_most(cls, value):
        if value is not None and value > 1:
            raise ValueError(f"{value:g}; {ONE_GPU}")
        return value

    def largest(self, key: str, base_value):
        """The largest value of a numeric `key` that a trial may get: the base's, or the
        top of its search range or choice."""
        entry = self.space.get(key)
        if entry is None:
            return base_value
        values = entry.choice if entry.kind == "choice" else entry.bounds
        if entry.ranges:
            values = [*values, *(high for _, high in entry.ranges.values())]
        return max([base_value, *values])

    @property
    def trial_count(self) -> int:
        """The trials the study runs: num_samples, or num_samples times the grid."""
        if self.searcher != "grid":
            return self.num_samples
        return self.num_samples * math.prod(len(entry.choice) for entry in self.space.values())


class DefineByRun:
    """The Optuna define-by-run function for the space, in the config's order.

    `fixed` holds values set beforehand (a stratum's value), which conditions see. Returns
    every searched key: a value, or None where a condition leaves the key out.
    """

    def __init__(self, search: SearchConfig, fixed: dict[str, Any] | None = None):
        self.search = search
        self.fixed = dict(fixed or {})

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.fixed)
        for key, entry in self.search.space.items():
            if key in values:
                continue
            if not entry.active(values):
                values[key] = None
            elif entry.kind == "choice":
                values[key] = trial.suggest_categorical(key, entry.choice)
            elif entry.kind == "integer":
                low, high = entry.range_for(values)
                values[key] = trial.suggest_int(key, int(low), int(high))
            else:
                low, high = entry.range_for(values)
                values[key] = trial.suggest_float(key, low, high, log=entry.kind == "loguniform")
        return values


class StudyConfig(_Strict):
    trial: TrialConfig
    search: SearchConfig


def _check_space(trial: TrialConfig, search: SearchConfig) -> None:
    """Every searched value must make a valid trial config beside every other choice.

    Values are checked pairwise against each choice of the other keys (as far as `when`
    allows), which catches cross-field rules such as label smoothing with a hinge loss.
    """
    if not search.space:
        raise ConfigError("search.space: empty; list at least one key to search")
    base = trial.to_dict()
    seen: dict[str, Distribution] = {}
    for key, entry in search.space.items():
        where = f"search.space.{key}"
        # Values first (an unknown name reads best on its own); conditional keys are
        # checked with their conditions below.
        if not entry.when:
            for value in entry.choice if entry.kind == "choice" else entry.bounds:
                _validate_with(base, {key: value}, where)
        for ref in [entry.by, *(entry.when or {})]:
            if ref is not None and (ref not in seen or seen[ref].kind != "choice"):
                raise ConfigError(f"{where}: '{ref}' must be a choice listed earlier in the space")
        for ref, allowed in (entry.when or {}).items():
            if unknown := [v for v in allowed if v not in seen[ref].choice]:
                raise ConfigError(f"{where}: when {ref} in {unknown}, which it never takes")
        if entry.by and (unknown := set(entry.ranges) - {str(v) for v in seen[entry.by].choice}):
            raise ConfigError(f"{where}: ranges for {sorted(unknown)}, not choices of {entry.by}")
        seen[key] = entry
    for key, entry in search.space.items():
        for context in _contexts(key, entry, search.space):
            values = entry.choice if entry.kind == "choice" else entry.range_for(context)
            for value in values:
                _validate_with(base, {**context, key: value}, f"search.space.{key}")


def _contexts(key: str, entry: Distribution, space: dict[str, Distribution]):
    """One value of one other choice key at a time, as `when` and `by` allow; the keys of
    `when` always take a value for which this key is sampled."""
    required = {ref: allowed[0] for ref, allowed in (entry.when or {}).items()}
    yield required
    for other, other_entry in space.items():
        if other == key or other_entry.kind != "choice":
            continue
        for value in (entry.when or {}).get(other, other_entry.choice):
            yield {**required, other: value}


def _validate_with(base: dict, values: dict[str, Any], where: str) -> TrialConfig:
    """The config that `values` give over `base` (as a trial gets it), or what is wrong."""
    try:
        return from_params(values, base)
    except ConfigError as error:
        context = ", ".join(f"{k}={v}" for k, v in values.items())
        raise ConfigError(f"{where}: with {context}: {error}") from None


def _check_grid(search: SearchConfig) -> None:
    for key, entry in search.space.items():
        if entry.kind != "choice" or entry.when:
            raise ConfigError(
                f"search.space.{key}: the grid searcher takes plain choice lists only"
            )
    if search.baseline:
        raise ConfigError("search.baseline: the grid searcher runs every combination; drop it")


def _check_stratify(search: SearchConfig) -> None:
    if search.stratify is None:
        return
    entry = search.space.get(search.stratify)
    if entry is None or entry.kind != "choice" or entry.when:
        choices = [key for key, e in search.space.items() if e.kind == "choice" and not e.when]
        raise ConfigError(
            f"search.stratify: {search.stratify!r} is not a choice of search.space; "
            f"allowed: {', '.join(choices) or '(the space has no choice key)'}, or null"
        )
    if search.num_samples < len(entry.choice):
        raise ConfigError(
            f"search.num_samples: {search.num_samples} is fewer than the {len(entry.choice)} "
            f"values of search.stratify ({search.stratify}); each value needs a trial"
        )


def _check_baseline(trial: TrialConfig, search: SearchConfig) -> None:
    for key, value in search.baseline.items():
        entry = search.space.get(key)
        if entry is None:
            raise ConfigError(f"search.baseline.{key}: not a key of search.space")
        if not entry.contains(value, search.baseline):
            raise ConfigError(f"search.baseline.{key}: {value!r} lies outside its search space")
    _validate_with(trial.to_dict(), search.baseline, "search.baseline")


def load_study(
    path: str | Path | None = None, overrides=(), values=None, check_space: bool = True
) -> StudyConfig:
    """Reads a config file, applies `--set` overrides (trial or `search.` keys), validates.

    Without `check_space` (the local mode, which runs the trial sections only) the search
    section's form is checked, but not whether its values pair with this trial config.
    """
    raw = read_yaml(Path(path)) if path is not None else {}
    search_raw = raw.pop("search", None)
    search_raw = {} if search_raw is None else search_raw  # `search:` with nothing under it.
    if not isinstance(search_raw, dict):
        raise ConfigError("search: must be a mapping of keys to values")
    trial_overrides = []
    for assignment in overrides:
        dotted, value = parse_assignment(assignment)
        section, _, key = dotted.removeprefix("search.").partition(".")
        if dotted.startswith("search.") and section in ("space", "baseline") and key:
            # Space and baseline keys are dotted trial keys: the rest is one key.
            entries = search_raw.setdefault(section, {})
            if not isinstance(entries, dict):
                raise ConfigError(f"search.{section}: must be a mapping of keys to values")
            entries[key] = value
        elif dotted.startswith("search."):
            set_value(search_raw, dotted.removeprefix("search."), value)
        else:
            trial_overrides.append(assignment)
    trial = load_config_dict(raw, trial_overrides, values)
    try:
        search = SearchConfig.model_validate(search_raw)
    except ValidationError as error:
        raise ConfigError(format_error(error, SearchConfig, prefix="search.")) from None
    if search.searcher == "grid":
        _check_grid(search)
    if search.space:
        _check_stratify(search)
    if search.space and check_space:
        _check_space(trial, search)
        _check_baseline(trial, search)
    return StudyConfig(trial=trial, search=search)

"""The one place that turns a `search` config into Ray Tune and Optuna objects.

The space is Optuna define-by-run: keys are sampled in the order the config lists them,
so a learning-rate range can depend on the optimizer already chosen and label smoothing
can be sampled only for the losses that define it. A searched value that a condition
leaves out keeps the base config's value. Tune's `param_space` is the base config; each
trial receives it merged with the sampled dotted keys, which `trial_config` resolves.
Nothing else sees Tune or Optuna.
"""

import contextlib
import warnings
from pathlib import Path
from typing import Any

from study.config import TrialConfig, set_value, validate
from study.search_config import SearchConfig

OPTUNA_FILE = "optuna.db"
EPOCH = "epoch"  # ASHA's clock: the epochs a trial has reported.


def trial_config(params: dict[str, Any]) -> TrialConfig:
    """A trial's config from what Tune passes: the base config's sections, with the
    sampled dotted keys (`optimizer.learning_rate`) laid over them."""
    raw = {
        key: dict(v) if isinstance(v, dict) else v for key, v in params.items() if "." not in key
    }
    for key, value in params.items():
        if "." in key:
            set_value(raw, key, value)
    return validate(raw)


class DefineByRun:
    """The Optuna define-by-run function for the space, in the config's order.

    A class rather than a closure, because Tune pickles the searcher with its space.
    """

    def __init__(self, search: SearchConfig):
        self.search = search

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for key, entry in self.search.space.items():
            if not entry.active(values):
                continue
            if entry.kind == "choice":
                values[key] = trial.suggest_categorical(key, entry.choice)
                continue
            low, high = entry.range_for(values)
            if entry.kind == "integer":
                values[key] = trial.suggest_int(key, int(low), int(high))
            else:
                log = entry.kind == "loguniform"
                values[key] = trial.suggest_float(key, low, high, log=log)


def _optuna_search_class():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class StudyOptunaSearch(OptunaSearch):
        """OptunaSearch that takes metric and mode from TuneConfig for a define-by-run space
        (Ray's own ignores them there), and tells Optuna a diverged trial failed."""

        def __init__(self, define: "DefineByRun", **kwargs):
            # Without a space, OptunaSearch defers creating the study (and queueing the
            # baseline) until Tune passes metric and mode, below.
            super().__init__(space=None, **kwargs)
            self._define = define

        def set_search_properties(self, metric, mode, config, **spec):
            self._space, self._metric, self._mode = self._define, metric, mode
            self._setup_study(mode)
            return True

        def on_trial_result(self, trial_id, result):
            # After a resume, a trial that Optuna already saw finish (its SQLite study is
            # written at once, Tune's state every few seconds) may report again.
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if result and result.get("diverged"):
                result, error = None, True
            super().on_trial_complete(trial_id, result=result, error=error)

    return StudyOptunaSearch


def make_searcher(search: SearchConfig, experiment_dir: Path, study_name: str):
    """OptunaSearch with a seeded TPE (or random) sampler and an SQLite study file."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if search.searcher == "optuna":
        # multivariate + group model the conditional space jointly; constant_liar keeps
        # parallel trials from all proposing the same point.
        sampler = optuna.samplers.TPESampler(
            seed=search.seed, multivariate=True, group=True, constant_liar=True
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=search.seed)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{experiment_dir / OPTUNA_FILE}")
    # metric and mode are set once, in TuneConfig, which hands them to searcher and scheduler.
    return _optuna_search_class()(
        DefineByRun(search),
        points_to_evaluate=[dict(search.baseline)] if search.baseline else None,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
    )


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def make_scheduler(search: SearchConfig, max_epochs: int):
    """ASHA on epochs (grace period, reduction factor, max epochs), or run all to the end."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=EPOCH,
        max_t=max_epochs,
        grace_period=min(search.grace_period, max_epochs),
        reduction_factor=search.reduction_factor,
    )

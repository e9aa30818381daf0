"""The driver's Tune callbacks beside the study's tables: TensorBoard, MLflow and W&B (Ray's
own loggers, told what a trial trained with and what an epoch is), the progress line and
the time budget.

Tune pickles a study's callbacks when the study starts and restores exactly those on
`--resume`. So the list holds, beside the recorder and TensorBoard, one `ThisRun`, which
runs the callbacks that the driver running now gives it: a resumed study takes this run's
`--logger` and `--time-budget`, and prints its progress from this run's start.
"""

import contextlib
import importlib
import importlib.util
import signal
import sys
import time
from pathlib import Path
from typing import ClassVar

import pandas as pd
from ray.tune import Callback
from ray.tune.callback import CallbackList
from ray.tune.logger import TBXLoggerCallback

from study import packages_absent, statuses, trackers
from study.config import METRIC
from study.console import duration
from study.records import EPOCH_COLUMNS, TRIALS_FILE, error_file, error_reason
from study.statuses import DEAD, DONE

RUNNING = (statuses.RUNNING, statuses.RESTARTING)


def epoch_row(result: dict) -> dict | None:
    """The epoch a Tune result reports, as epochs.csv holds it; None for a report that is
    no new epoch: a diverged trial's last word, or an epoch that a restored trial reports
    again (study/trainable.py)."""
    if result.get("diverged") or result.get("replayed") or "epoch" not in result:
        return None
    return {key: result[key] for key in EPOCH_COLUMNS if key in result}


def tune_params(trial) -> dict:
    """What a study trial trained with: its Tune config, every config key once, dotted
    (None where a search condition left a key out)."""
    return dict(trial.config)


class Endings:
    """How each trial ended, in trials.csv's words: completed, early_stopped (before its
    `training.epochs`), diverged, dead or error."""

    def __init__(self):
        self.last_epoch: dict[str, int] = {}
        self.ended: dict[str, str] = {}  # Trial id -> diverged or dead, as its trial said.

    def saw(self, trial, result: dict) -> dict | None:
        """Notes a result; returns its epoch's row (see epoch_row)."""
        for status in ("diverged", DEAD):
            if result.get(status):
                self.ended[trial.trial_id] = status
        row = epoch_row(result)
        if row is not None:
            self.last_epoch[trial.trial_id] = int(row["epoch"])
        return row

    def status(self, trial, failed: bool, params: dict) -> str:
        if failed:
            return "error"
        if trial.trial_id in self.ended:
            return self.ended[trial.trial_id]
        finished = self.last_epoch.get(trial.trial_id, 0) >= params.get("training.epochs", 0)
        return "completed" if finished else "early_stopped"


def events_folder(trial) -> Path:
    """Where a trial's TensorBoard events go: its folder in the study where that is on this
    machine, written there at once. Ray's own loggers write to a staging folder under
    /tmp/ray that Ray copies to the study now and then; a driver killed in between lost
    the epochs since (and a resumed study does not log them again). On remote storage,
    that staging folder, which Ray uploads."""
    import pyarrow.fs

    if isinstance(trial.storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(trial.path)
    return Path(trial.local_path)


class TensorBoardLogger(TBXLoggerCallback):
    """Takes the place of Ray's TensorBoard logger, writing what a local run writes into
    each trial's folder: every epoch's metrics at step = epoch, and the trial's values as
    hyper-parameters from its start (Ray's writes them only when a trial ends)."""

    def __init__(self, params=tune_params):
        super().__init__()
        self.params = params
        self.runs: dict = {}
        self.endings = Endings()

    def log_trial_start(self, trial):
        if trial in self.runs:  # Restarted after a failure: a new events file.
            self.runs.pop(trial).close()
        trial.init_local_path()
        self.runs[trial] = trackers.TensorBoardRun(events_folder(trial), self.params(trial))

    def log_trial_result(self, iteration, trial, result):
        if (row := self.endings.saw(trial, result)) is None:
            return
        if trial not in self.runs:
            self.log_trial_start(trial)
        self.runs[trial].epoch(row)

    def log_trial_end(self, trial, failed=False):
        if run := self.runs.pop(trial, None):
            run.close(self.endings.status(trial, failed, self.params(trial)))

    def on_experiment_end(self, trials, **info):
        for run in self.runs.values():  # Interrupted: left open for --resume.
            run.close()


# Ray's telemetry counts a run's callbacks by importing the module of every tracker
# integration it knows (ray.air._internal.usage.tag_callbacks, at each Tuner.fit). Those
# import MLflow and W&B wherever they are installed: about 1.5 s of CPU at every study's
# start, whether or not the study logs to them. `tracker_loggers` imports the modules of
# the trackers a run does not log to first, with the tracker marked absent (None in
# sys.modules), so that Ray finds them loaded; a later run in the same process that logs
# to that tracker loads its module again, whole.
_INTEGRATIONS = {"mlflow": "ray.air.integrations.mlflow", "wandb": "ray.air.integrations.wandb"}


def _integration(name: str, without_tracker: bool = False):
    """Ray's integration module for tracker `name`; loaded without the tracker itself if
    `without_tracker` and it is not loaded yet."""
    module = sys.modules.get(_INTEGRATIONS[name])
    if module is None:
        with packages_absent(*([name] if without_tracker else [])):
            module = importlib.import_module(_INTEGRATIONS[name])
    elif not without_tracker and getattr(module, name) is None and importlib.util.find_spec(name):
        module = importlib.reload(module)  # Loaded without the tracker before.
    return module


def _mlflow_callback():
    class MLflowLogger(_integration("mlflow").MLflowLoggerCallback):
        """Ray's MLflow callback with one MLflow run per trial however often the study
        resumes (found again by its `ray_trial_id` tag), holding the trial's values as
        params, its per-epoch metrics (the epoch as the step) and how it ended."""

        def __init__(self, settings: trackers.Trackers, params=tune_params):
            super().__init__(settings.mlflow_uri, experiment_name=settings.mlflow_experiment)
            self.params = params
            self.endings = Endings()

        def setup(self, *args, **kwargs):
            import mlflow

            super().setup(*args, **kwargs)  # Creates the experiment if it is new.
            self.client = mlflow.MlflowClient(self.tracking_uri)
            self.experiment = trackers.mlflow_experiment(self.client, self.experiment_name)

        def log_trial_start(self, trial):
            if trial in self._trial_runs:  # Restarted after a failure: the same run.
                return
            found = self.client.search_runs(
                [self.experiment], f"tags.{trackers.TRIAL_TAG} = '{trial.trial_id}'"
            )
            if found:  # A resumed study: the trial goes on in its run.
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
            else:
                tags = {trackers.TRIAL_TAG: trial.trial_id}
                run_id = self.client.create_run(self.experiment, run_name=str(trial), tags=tags)
                run_id = run_id.info.run_id
                self.client.log_batch(run_id, params=trackers.mlflow_params(self.params(trial)))
            self._trial_runs[trial] = run_id

        def log_trial_result(self, iteration, trial, result):
            if (row := self.endings.saw(trial, result)) is not None:
                metrics = trackers.mlflow_metrics(row)
                self.client.log_batch(self._trial_runs[trial], metrics=metrics)

        def log_trial_end(self, trial, failed=False):
            run_id = self._trial_runs.pop(trial)
            status = self.endings.status(trial, failed, self.params(trial))
            self.client.set_tag(run_id, "status", status)
            self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

        def on_experiment_end(self, trials, **info):
            for run_id in self._trial_runs.values():  # Interrupted: --resume goes on.
                self.client.set_terminated(run_id, "KILLED")
            self._trial_runs.clear()

    return MLflowLogger


def _wandb_callback():
    ray_wandb = _integration("wandb")

    class WandbActor(ray_wandb._WandbLoggingActor):
        """Ray's W&B logging actor, which waits for W&B's service to write the run out:
        wandb.finish() returns before it has, and Ray kills the actor as soon as its run
        ends, which lost a trial's whole run file here (1 run in 6, offline)."""

        def run(self):
            try:
                super().run()
            finally:
                self._wandb.teardown()

    class WandbLogger(ray_wandb.WandbLoggerCallback):
        """Ray's W&B callback (one W&B run per trial, its id the trial's, logged from a
        Ray actor on the driver's node) with the trial's values as the run's config and
        only its epochs as history: each epoch's metrics, the epoch among them."""

        _logger_actor_cls = WandbActor

        def __init__(self, settings: trackers.Trackers, params=tune_params):
            super().__init__(**settings.wandb_init())
            self.params = params
            self.open: set = set()
            self.pending: dict = {}  # Trial -> its last result's put, not yet awaited.

        def log_trial_start(self, trial):
            # wandb.init's arguments end with these keywords: the config is the trial's.
            self.kwargs = {**self.kwargs, "config": self.params(trial)}
            self.open.add(trial)
            super().log_trial_start(trial)

        def log_trial_result(self, iteration, trial, result):
            if (row := epoch_row(result)) is None:
                return
            if trial not in self._trial_logging_actors:
                self.log_trial_start(trial)
            # Where the trial runs goes to the run's config (Ray's AUTO_CONFIG_KEYS).
            placement = {key: result[key] for key in self.AUTO_CONFIG_KEYS if key in result}
            # Ray's put waits until the trial's queue actor is up, so a trial's first epoch
            # held Tune's loop for a new worker's start-up (2 s here, and Ray warned). The
            # item is handed over without waiting, but the queue actor is async, so Ray does
            # not keep its calls in order: each put waits for the one before (an epoch ago),
            # and the run's end for the last, or W&B drops an epoch that arrives late (seen
            # on a busy machine: a run without its last epoch).
            self._await(trial)
            queue = self._trial_queues[trial]
            self.pending[trial] = queue.actor.put.remote(
                (ray_wandb._QueueItem.RESULT, {**row, **placement}), None
            )

        def _await(self, trial):
            import ray

            pending = self.pending.pop(trial, None)
            # A queue actor that died takes its run with it; the study goes on.
            if pending is not None:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.get(pending)

        def log_trial_end(self, trial, failed=False):
            self.open.discard(trial)
            self._await(trial)
            super().log_trial_end(trial, failed)

        def on_experiment_end(self, trials, **info):
            for trial in list(self.open):  # Interrupted: finish its run (it resumes).
                self.log_trial_end(trial)
            super().on_experiment_end(trials, **info)

    return WandbLogger


def tracker_loggers(settings: trackers.Trackers, params=tune_params) -> list:
    """Ray's own callbacks for the trackers the run logs to (--logger)."""
    for name in _INTEGRATIONS.keys() - set(settings.names):
        _integration(name, without_tracker=True)
    kinds = {"mlflow": _mlflow_callback, "wandb": _wandb_callback}
    return [kinds[name]()(settings, params) for name in settings.names]


class Progress(Callback):
    """One line, every `every` seconds and at each trial's end: trials done, running and
    waiting of the total, epochs done of the budget, the best validation accuracy so far
    (its trial and its value of `key`), the time since this run started and an estimate
    of the time left, from the epochs still to run at the rate this run has run them
    (with `asha`, an upper bound: ASHA may stop trials early). Read from trials.csv, so
    the line and the table agree. A trial that fails gets a line naming its traceback."""

    def __init__(self, folder, total, max_epochs, key, asha=True, started=None, every=30.0):
        self.folder, self.total, self.max_epochs = Path(folder), total, max_epochs
        self.key, self.asha, self.every = key, asha, every
        self.started = started or time.monotonic()

    def setup(self, **info):
        self.last = self.tuning_since = time.monotonic()
        self.epochs_before = self._trials().epochs_run.sum()  # Before a resume.

    def _trials(self) -> pd.DataFrame:
        try:
            return pd.read_csv(self.folder / TRIALS_FILE, dtype={"trial_id": str})
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return pd.DataFrame(columns=["trial_id", "status", "epochs_run"])

    def line(self) -> str:
        trials = self._trials()
        done = int(trials.status.isin(DONE).sum())
        running = trials[trials.status.isin(RUNNING)]
        waiting = max(self.total - done - len(running), 0)
        epochs = int(trials.epochs_run.sum())
        budget = self.total * self.max_epochs
        elapsed = time.monotonic() - self.started
        text = (
            f"progress: {done}/{self.total} trials done, {len(running)} running, "
            f"{waiting} waiting; {epochs}/{budget} epochs; {self._best(trials)}; "
            f"{duration(elapsed)} elapsed"
        )
        if done == self.total:
            return text
        left = int((self.max_epochs - running.epochs_run).clip(lower=0).sum())
        left += waiting * self.max_epochs
        rate = (epochs - self.epochs_before) / max(time.monotonic() - self.tuning_since, 1e-9)
        if rate <= 0:
            return f"{text}; time left unknown until an epoch ends"
        if self.asha:
            return (
                f"{text}; at most {duration(left / rate)} left at this rate "
                "(an upper bound: ASHA may stop trials early)"
            )
        return f"{text}; about {duration(left / rate)} left at this rate"

    def _best(self, trials: pd.DataFrame) -> str:
        best = f"best_{METRIC}"
        if best not in trials or trials[best].isna().all():
            return f"best {METRIC} none yet"
        row = trials.loc[trials[best].idxmax()]
        return f"best {METRIC} {row[best]:.4f} (trial {row.trial_id}, {row.get(self.key)})"

    def report(self) -> None:
        self.last = time.monotonic()
        print(self.line(), flush=True)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every:
            self.report()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.report()

    def _failure(self, trial, then: str) -> None:
        reason, where = error_reason(trial), error_file(trial)
        print(f"trial {trial.trial_id} failed: {reason}; {then} (traceback: {where})", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failure(trial, "retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._failure(trial, "no retries left")
        self.report()


class TimeBudget(Callback):
    """Stops the study once `seconds` have passed since `started` (time.monotonic), the
    way Ctrl-C does: through Tune's own SIGUSR1 handler, so that running trials stay
    unfinished in Tune's state and --resume continues them from their checkpoints. (With
    TuneConfig(time_budget_s) Tune ends every unfinished trial as terminated, and a
    resumed study would never run them again.)"""

    def __init__(self, seconds: float, started: float | None = None):
        self.seconds = seconds
        self.started = started or time.monotonic()
        self.spent = False

    def on_step_begin(self, iteration, trials, **info):
        if self.spent or time.monotonic() - self.started < self.seconds:
            return
        self.spent = True
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            # Tune runs elsewhere (Ray Client) and has no handler here: never kill this.
            print("warning: the time budget cannot stop Tune from here", file=sys.stderr)
            return
        print(f"time budget of {duration(self.seconds)} spent: stopping the study", flush=True)
        signal.raise_signal(signal.SIGUSR1)


class Mirrored(Callback):
    """Uploads the study's own files to its bucket after each event that rewrites them
    (study/storage.py's Mirror; it does nothing for a local folder). In ThisRun, after
    the recorder has written the tables."""

    def __init__(self, mirror):
        self.mirror = mirror

    def on_trial_start(self, iteration, trials, trial, **info):
        self.mirror.changed()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.mirror.changed()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.mirror.changed()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.mirror.changed()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.mirror.changed()

    def on_experiment_end(self, trials, **info):
        self.mirror.flush()


class ThisRun(CallbackList):
    """The callbacks of the driver running now (`ThisRun.callbacks`, set by it before
    Tune starts); see the module's docstring for why."""

    callbacks: ClassVar[list] = []

    def __init__(self):
        super().__init__([])

    def setup(self, **info):
        self._callbacks = list(ThisRun.callbacks)
        super().setup(**info)

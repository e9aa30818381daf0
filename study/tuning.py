"""Runs a study: many trials under Ray Tune, on a local Ray instance or an existing cluster.

The driver loads the data set once and hands it to every trial through Ray's object
store; it never imports TensorFlow, so it never touches a GPU. Results go to
`<storage>/<name>/`: the resolved config, trials.csv, epochs.csv, the Optuna study, and
Ray's experiment state (trial folders with checkpoints), from which `--resume` continues.
"""

import contextlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from study import backend, console, files, storage
from study import data as data_lib
from study.config import METRIC, MODE, ConfigError, flatten
from study.files import STUDY_FILES
from study.search_config import (
    CONFIG_FILE,
    ONE_GPU,
    TRIALS_PER_GPU,
    SearchConfig,
    StudyConfig,
    load_study,
)

# Ray's newer console output ignores a custom reporter; the classic one can be trimmed.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# A failed trial is one line on the console (study/callbacks.py) that names the file
# holding its traceback, not the traceback itself.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")

TOKEN_HINT = "log in with the token that `ray get-auth-token` prints (~/.ray/auth_token)"


@dataclass(frozen=True)
class StudyOptions:
    name: str
    storage_path: str = "results"
    address: str | None = None
    gpus: float = 0
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    resume: bool = False
    dashboard_host: str = "127.0.0.1"
    dashboard: bool = True
    loggers: tuple[str, ...] = ()  # --logger: mlflow, wandb
    time_budget: float | None = None  # --time-budget, in seconds
    num_samples: int | None = None  # --resume --num-samples: grow the study to this many

    @property
    def remote_storage(self) -> bool:
        return storage.is_uri(self.storage_path)

    @property
    def results_dir(self) -> Path:
        """The study's own files, on this machine (mirrored to a bucket: study/storage.py)."""
        if self.remote_storage:
            return storage.local_folder(self.experiment_path)
        return (Path(self.storage_path) / self.name).resolve()

    @property
    def experiment_path(self) -> str:
        """Where Ray keeps the study: a local folder or a URI."""
        if self.remote_storage:
            return storage.join(self.storage_path, self.name)
        return str(self.results_dir)

    def mirror(self, names=STUDY_FILES) -> storage.Mirror:
        """What uploads the study's own files to its bucket (nothing for a local folder)."""
        uri = self.experiment_path if self.remote_storage else None
        return storage.Mirror(self.results_dir, uri, names)

    def fetch(self, names=STUDY_FILES) -> None:
        """The study's own files from its bucket, where they are newer (a resume, a
        confirmation, on another machine)."""
        if self.remote_storage:
            storage.fetch(self.experiment_path, self.results_dir, names)


def check_options(options: StudyOptions) -> None:
    """Refuses impossible resource requests before Ray starts."""
    if options.gpus < 0:
        raise ConfigError(f"--gpus: {options.gpus:g} must be >= 0")
    if options.gpus_per_trial is not None and options.gpus_per_trial < 0:
        raise ConfigError("--gpus-per-trial: must be >= 0")
    if options.gpus_per_trial and options.gpus_per_trial > max(options.gpus, 0) and options.gpus:
        raise ConfigError(
            f"--gpus-per-trial: {options.gpus_per_trial:g} is more than the study's "
            f"--gpus {options.gpus:g}"
        )
    if options.gpus_per_trial and options.gpus_per_trial > 1:
        raise ConfigError(f"--gpus-per-trial: {options.gpus_per_trial:g}; {ONE_GPU}")
    if options.gpus_per_trial and not options.gpus:
        raise ConfigError("--gpus-per-trial: the study has no GPUs; pass --gpus N as well")
    if options.cpus_per_trial is not None and options.cpus_per_trial <= 0:
        raise ConfigError("--cpus-per-trial: must be > 0")
    if not options.name or "/" in options.name or options.name in (".", ".."):
        raise ConfigError(f"--name: {options.name!r} must be a plain folder name")
    if options.time_budget is not None and not options.time_budget > 0:
        raise ConfigError(f"--time-budget: {options.time_budget:g} s; it must be more than 0")
    if options.num_samples is not None and not options.resume:
        raise ConfigError("--num-samples: grows a study on --resume; a new study takes it")
    files.check_folder(options.results_dir)
    if options.remote_storage:
        storage.check(options.storage_path)
    check_address(options.address)


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """Refuses a cluster address where nothing answers, which Ray would retry for minutes.

    `auto` is Ray's to find; HOST:PORT (the head's GCS) and ray://HOST:PORT (Ray Client)
    must accept a TCP connection.
    """
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address: {address!r}; expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"--address: nothing answers at {host}:{port} ({reason}); is the cluster up "
            "(`ray start --head` on its head node) and the port right?"
        ) from None


def prepare(study: StudyConfig, options: StudyOptions) -> StudyConfig:
    """Checks a new study's folder and space; or reloads a resumed study's config."""
    config_file = options.results_dir / CONFIG_FILE
    if options.resume:
        options.fetch()
        if not config_file.exists():
            where = options.experiment_path
            raise ConfigError(f"--resume: no study at {where} (no {CONFIG_FILE})")
        return grown(load_study(config_file), options.num_samples)
    taken = options.results_dir.exists()
    if options.remote_storage:
        taken = taken or storage.exists(storage.join(options.experiment_path, CONFIG_FILE))
    if taken:
        raise ConfigError(
            f"--name: {options.experiment_path} already exists; --resume continues it, "
            "or choose another --name"
        )
    if not study.search.space:
        raise ConfigError("search.space: empty; list at least one key to search")
    return study


def grown(study: StudyConfig, num_samples: int | None) -> StudyConfig:
    """The study with `num_samples` trials (--resume --num-samples N): more trials, each
    stratum's share growing to its share of N; never fewer."""
    search = study.search
    if num_samples is None or num_samples == search.num_samples:
        return study
    if search.searcher == "grid":
        raise ConfigError("--num-samples: a grid study runs its grid num_samples times; no growing")
    if num_samples < search.num_samples:
        raise ConfigError(
            f"--num-samples: {num_samples} is fewer than the study's {search.num_samples} "
            "trials; a study grows, it does not shrink"
        )
    raw = {**search.model_dump(mode="json"), "num_samples": num_samples}
    return StudyConfig(trial=study.trial, search=SearchConfig.model_validate(raw))


def resources(study: StudyConfig, options: StudyOptions) -> tuple[dict, int | None]:
    """Per-trial resources and the number of trials that may run at once."""
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = study.search.gpus_per_trial
    if gpus is None:  # Packed: a share of a GPU each (search_config.TRIALS_PER_GPU).
        gpus = min(1.0 / TRIALS_PER_GPU, options.gpus) if options.gpus else 0.0
    if gpus > max(options.gpus, 0) > 0 or (gpus and not options.gpus):
        raise ConfigError(
            f"search.gpus_per_trial: {gpus:g} GPUs per trial, but the study may use "
            f"{options.gpus:g} (--gpus N)"
        )
    cpus = options.cpus_per_trial or study.search.cpus_per_trial
    concurrent = math.floor(options.gpus / gpus + 1e-9) if gpus else None
    return {"cpu": cpus, "gpu": gpus}, concurrent


def connect(options: StudyOptions):
    """Starts a local Ray (dashboard on 127.0.0.1, token auth on) or joins a cluster; every
    worker gets the driver's Keras backend."""
    if options.address and "RAY_AUTH_MODE" not in os.environ and _token_available():
        # Ray turns token auth on by itself only for address="auto"; for host:port and
        # ray:// it must be told before it is imported (it caches its config).
        os.environ["RAY_AUTH_MODE"] = "token"
    if not options.address:
        # The study's choice for its own Ray, said explicitly: Ray would choose the same
        # and warn on every start that it did.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # Ray starts a worker per core for the first driver, ahead of any task. Trials
        # start workers of their own (none of those ran a trial here), so each sat idle
        # for the whole study.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    import logging

    import ray

    from study.console import quiet_libraries

    quiet_libraries()
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    runtime_env = {"env_vars": {**backend.worker_env(), **storage.worker_env()}}
    if options.address:
        context = ray.init(address=options.address, runtime_env=runtime_env, **quiet)
    else:
        context = ray.init(
            include_dashboard=options.dashboard,
            dashboard_host=options.dashboard_host,
            runtime_env=runtime_env,
            **quiet,
        )
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}  ({TOKEN_HINT})")
    if options.dashboard_host not in ("127.0.0.1", "localhost"):
        print(
            f"warning: the dashboard listens on {options.dashboard_host}: anyone who can "
            "reach it and has the token can run code on this cluster",
            file=sys.stderr,
        )
    return context


def _token_available() -> bool:
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return "RAY_AUTH_TOKEN" in os.environ or token_file.is_file()


def check_cluster(options: StudyOptions, per_trial: dict) -> None:
    import ray

    available = ray.cluster_resources()
    gpus, cpus = available.get("GPU", 0), available.get("CPU", 0)
    if options.gpus > gpus:
        raise ConfigError(f"--gpus: asked for {options.gpus:g}, but the cluster has {gpus:g}")
    if per_trial["cpu"] > cpus:
        raise ConfigError(
            f"--cpus-per-trial: {per_trial['cpu']:g} is more than the cluster's {cpus:g} CPUs"
        )


# Trial id -> why the trial did not restore from the checkpoint Tune named; set in the
# trial's worker by `resilient`'s restore, read there by the trial (study/trainable.py).
RESTORE_NOTES: dict[str, str] = {}


def _checkpoints(folder: str, filesystem) -> list:
    """The checkpoints in a trial's folder on `filesystem`, newest first."""
    import pyarrow.fs
    from ray import tune

    found = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    names = sorted(
        (info.base_name for info in found if info.base_name.startswith("checkpoint_")
         and info.type == pyarrow.fs.FileType.Directory),
        reverse=True,
    )  # fmt: skip
    return [tune.Checkpoint(f"{folder}/{name}", filesystem) for name in names]


def _siblings(checkpoint) -> tuple[list, list]:
    """The checkpoints beside `checkpoint` in its trial's folder: newer, then older than it,
    each newest first."""
    folder, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    found = _checkpoints(folder, checkpoint.filesystem)
    return (
        [each for each in found if each.path.rsplit("/", 1)[1] > name],
        [each for each in found if each.path.rsplit("/", 1)[1] < name],
    )


def _first_recorded(checkpoints: list, recorded: int, read_state) -> list:
    """`checkpoints` (newest first) from the first whose epoch the study has recorded."""
    for number, checkpoint in enumerate(checkpoints):
        with contextlib.suppress(Exception), checkpoint.as_directory() as directory:
            if read_state(directory)["epoch"] <= recorded:
                return checkpoints[number:]
    return []


def restore_order(named, recorded: int | None, read_state, trial_folder: str | None = None):
    """Where a restored trial tries to continue from, in turn: the newest checkpoint in its
    folder whose epoch the study has recorded (`recorded`: the last epoch in epochs.csv
    when the study resumed), if newer than the one Tune named; then the named one; then
    older ones (the named one may be unreadable). Tune saves its state every few seconds,
    so it may name a checkpoint older than the last epoch the study recorded: continuing
    from that epoch's checkpoint runs no epoch twice and skips none. It may also hold a
    trial's last result but not yet the checkpoint that came with it, and name none: then
    the newest recorded one in `trial_folder` (a path or URI). `read_state` reads a local
    checkpoint's state.json."""
    if named is None:
        if not (recorded and trial_folder):
            return []
        import pyarrow.fs

        filesystem, folder = pyarrow.fs.FileSystem.from_uri(trial_folder)
        return _first_recorded(_checkpoints(folder.rstrip("/"), filesystem), recorded, read_state)
    newer, older = _siblings(named)
    return [*(_first_recorded(newer, recorded, read_state)[:1] if recorded else []), named, *older]


def recorded_epochs(results_dir: Path) -> dict[str, int]:
    """The last epoch the study recorded for each trial (its epochs.csv)."""
    import pandas as pd

    path = Path(results_dir) / "epochs.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    epochs = pd.read_csv(path, dtype={"trial_id": str})
    return {k: int(v) for k, v in epochs.groupby("trial_id").epoch.max().items()}


def resilient(function):
    """Tune's trainable class for `function`, except that a checkpoint which Tune's saved
    state names and which is gone from storage does not fail the trial: it restores from
    the newest checkpoint still in the trial's folder, or starts from scratch, warned.

    Tune deletes a trial's oldest checkpoint (beyond `num_to_keep`) when it registers a new
    one and writes its own state only later, so a driver killed in between leaves a state
    that names a deleted checkpoint; storage can lose files too. Ray's own restore then
    raises before the trial starts, on every retry, and the trial ends as an error.
    """
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable import wrap_function

    class Resilient(wrap_function(function)):
        def restore(self, checkpoint_path):
            try:
                return super().restore(checkpoint_path)
            except ValueError as error:
                if "does not exist on storage" not in str(error):
                    raise
                named = checkpoint_path.checkpoint
            standing = _siblings(named)[1]  # Its older ones: the newer are not Tune's.
            where = standing[0].path if standing else "nothing: restarted from scratch"
            note = f"checkpoint {named.path} is gone from storage; restored from {where}"
            print(f"warning: {note}", file=sys.stderr)
            # This class travels to the worker by value, with copies of its globals: the
            # trial reads the notes of the module as imported there.
            from study import tuning

            tuning.RESTORE_NOTES[self.trial_id] = note
            if standing:
                return super().restore(_TrainingResult(checkpoint=standing[0], metrics={}))

    Resilient.__name__ = Resilient.__qualname__ = function.__name__  # Tune's name for it.
    return Resilient


def resume_point(recorded: dict | None, experiment: str | None) -> dict:
    """For the trial running here, in its worker: `recorded`, the last epoch the study had
    recorded for it when it resumed (from the last epoch of each trial in epochs.csv), and
    `folder`, its folder in the study's storage (`experiment`, a path or URI)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    folder = f"{experiment}/trial_{trial_id}" if experiment else None
    return {"recorded": (recorded or {}).get(trial_id), "folder": folder}


def trial_function(params, data, base=None, recorded=None, experiment=None):
    """What each trial runs, in its Ray worker (where TensorFlow is imported): its values
    (`params`, Tune's config) laid over the study's base config; `recorded` and
    `experiment` as in `resume_point`."""
    from study.trainable import tune_trainable

    tune_trainable(params, data, base, **resume_point(recorded, experiment))


def param_space(study: StudyConfig) -> dict:
    """Tune's config for every trial: each key of the base config once, dotted, except the
    searched keys, which the searcher (or the grid) adds with the values trials run."""
    from ray import tune

    space = study.search.space
    fixed = {
        key: value for key, value in flatten(study.trial.to_dict()).items() if key not in space
    }
    if study.search.searcher == "grid":  # Every combination of the choices; no searcher.
        fixed |= {key: tune.grid_search(entry.choice) for key, entry in space.items()}
    return fixed


def this_run(study: StudyConfig, options: StudyOptions, settings, started, mirror) -> None:
    """Sets the callbacks this run of the driver adds (study/callbacks.py): the recorder of
    the study's tables (made here, in every run, so that a study resumed from another
    folder or machine writes its tables there), the upload of the study's files to its
    bucket, the progress line, the time budget, and the trackers of --logger."""
    from study.callbacks import Mirrored, Progress, ThisRun, TimeBudget, tracker_loggers
    from study.records import StudyRecorder
    from study.tables import compared_key

    search, epochs = study.search, study.trial.training.epochs
    recorder = StudyRecorder(options.results_dir, epochs, study.trial.to_dict())
    progress = Progress(
        options.results_dir, search.trial_count, epochs, compared_key(search),
        asha=search.scheduler == "asha", started=started,
    )  # fmt: skip
    budget = [TimeBudget(options.time_budget, started)] if options.time_budget else []
    extra = [progress, *budget, *tracker_loggers(settings)]
    ThisRun.callbacks = [recorder, Mirrored(mirror), *extra]


def study_folder(options: StudyOptions) -> str:
    """Where the study is: its folder, or its URI and the local folder of its tables."""
    if options.remote_storage:
        return f"{options.experiment_path} (its tables also in {options.results_dir})"
    return str(options.results_dir)


def run_config(name: str, storage_path: str, params=None, **more):
    """What every Tune run of the project shares: TensorBoard in each trial's folder, this
    run's callbacks (the recorder of the study's tables among them: `this_run`), and each
    trial's stdout and stderr in its folder (`log_to_file`; synced there with its
    checkpoints, so a failed trial's output is there)."""
    from ray import tune

    from study.callbacks import TensorBoardLogger, ThisRun, tune_params

    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        callbacks=[TensorBoardLogger(params or tune_params), ThisRun()],
        log_to_file=True,
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=1,
        **more,
    )


def storage_path(options: StudyOptions) -> str:
    if options.remote_storage:
        return options.storage_path
    return str(Path(options.storage_path).resolve())


def build_tuner(study: StudyConfig, options: StudyOptions, data):
    from ray import tune

    from study import search as search_lib
    from study.search import make_scheduler, make_searcher, trial_dirname, trial_generator

    per_trial, concurrent = resources(study, options)
    base = study.trial.to_dict()
    recorded = recorded_epochs(options.results_dir) if options.resume else {}
    trainable = tune.with_parameters(
        trial_function, data=data, base=base, recorded=recorded, experiment=options.experiment_path
    )
    trainable = tune.with_resources(resilient(trainable), per_trial)
    if options.resume:
        # The restored searcher's own paths are where the study began: it reads this one.
        search_lib.StudyGenerator.folder = options.results_dir
        return tune.Tuner.restore(
            options.experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    search, epochs = study.search, study.trial.training.epochs
    generator = None
    if search.searcher != "grid":
        searcher = make_searcher(search, options.results_dir, options.name, epochs)
        generator = trial_generator(searcher, options.results_dir, concurrent)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(study),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=generator,
            scheduler=make_scheduler(search, epochs),
            num_samples=search.num_samples,
            # The generator holds the searcher's limit; the grid's is Tune's.
            max_concurrent_trials=concurrent if generator is None else None,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
            # No actor reuse: a trial that ASHA stops finishes its epoch in the background,
            # and Tune cannot hand its worker to the next trial until then.
            reuse_actors=False,
        ),
        run_config=run_config(
            options.name,
            storage_path(options),
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=search.keep_checkpoints),
            progress_reporter=_reporter(study),
        ),
    )
    return tuner


def _reporter(study: StudyConfig):
    from ray import tune

    short = {"loss.name": "loss", "optimizer.name": "optimizer"}
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "val_accuracy": "val_acc"},
        parameter_columns={key: short.get(key, key.split(".")[-1]) for key in study.search.space},
        max_report_frequency=30,
        max_column_length=32,
        sort_by_metric=True,
    )


def final_table(study: StudyConfig, results_dir: Path) -> str:
    """The end-of-study table: each value of what the study compares, at the full budget."""
    import pandas as pd

    from study.tables import compared_key, comparison, format_comparison, format_dead

    key, epochs = compared_key(study.search), study.trial.training.epochs
    path = results_dir / "trials.csv"
    trials = pd.read_csv(path, dtype={"trial_id": str}) if path.is_file() else pd.DataFrame()
    if "best_val_accuracy" not in trials:  # Stopped (its time budget) before any epoch.
        return "No trial has reported an epoch yet."
    entry = study.search.space.get(key)
    values = entry.choice if entry is not None and entry.kind == "choice" else ()
    table = format_comparison(comparison(trials, key, epochs, values), key, epochs)
    dead = format_dead(trials)
    return f"{table}\n{dead}" if dead else table


def shares_line(study: StudyConfig) -> str | None:
    """What a stratified study promises each value, printed when it starts."""
    search = study.search
    if search.stratify is None or search.searcher == "grid":
        return None
    shares = ", ".join(f"{value} {count}" for value, count in search.shares().items())
    return f"trials per {search.stratify} ({search.num_samples} in all): {shares}"


def resume_command(options: StudyOptions, phase: str = "") -> str:
    """The command that continues the study (or its `--confirm` phase)."""
    storage = "" if options.storage_path == "results" else f" --storage-path {options.storage_path}"
    words = ["python -m study.run", phase, "--resume", f"--name {options.name}{storage}"]
    return " ".join(word for word in words if word)


def write_config(study: StudyConfig, results_dir: Path) -> None:
    raw = {**study.trial.to_dict(), "search": study.search.model_dump(mode="json")}
    files.write_text(results_dir / CONFIG_FILE, yaml.safe_dump(raw, sort_keys=False))


def time_line(folder: Path) -> str | None:
    """Where the trials' time went (starting, compiling, training), from the tables."""
    from study.tables import format_time_shares, read_table

    trials, epochs = read_table(folder / "trials.csv"), read_table(folder / "epochs.csv")
    return format_time_shares(trials, epochs) if not trials.empty else None


def failed_trials(folder: Path) -> list[str]:
    """A line for each trial that ended in an error, naming its traceback's file."""
    import pandas as pd

    path = Path(folder) / "trials.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    trials = pd.read_csv(path, dtype={"trial_id": str})
    failed = trials[trials.status == "error"]
    return [f"trial {row.trial_id} ended in an error: {row.message}" for row in failed.itertuples()]


def finished(grid, folder: Path, count: int) -> bool:
    """Whether all `count` trials have ended. After the time budget, from `folder`'s
    trials.csv: Tune stops the running trials' workers as it cleans up, and its results
    then call them terminated, while its saved state (what --resume reads) keeps them
    unfinished."""
    if not budget_spent():
        return grid.num_terminated + grid.num_errors >= count
    from study.callbacks import DONE

    path = Path(folder) / "trials.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return False
    import pandas as pd

    return int(pd.read_csv(path).status.isin(DONE).sum()) >= count


def budget_spent() -> bool:
    from study.callbacks import ThisRun, TimeBudget

    return any(isinstance(each, TimeBudget) and each.spent for each in ThisRun.callbacks)


def load_data(study: StudyConfig):
    """The study's data set, read once on the driver (Ray hands it to every trial)."""
    config = study.trial.data
    data_lib.resolve_path(config.dataset, config.data_dir)
    return data_lib.load_cifar(config.dataset, config.data_dir, config.label_mode)


@contextlib.contextmanager
def ray_session(options: StudyOptions, per_trial: dict):
    """Ray for one run of a study or its confirmation: started (or joined), the cluster
    checked against what a trial needs, shut down at the end whatever happens."""
    with console.native_stderr_filtered(console.RAY_NOISE):
        connect(options)
        import ray

        try:
            check_cluster(options, per_trial)
            yield
        finally:
            ray.shutdown()


def interrupted(options: StudyOptions, done: bool, phase: str = "") -> bool:
    """True (and the resume command said) when a run ended before its trials did, other
    than at its time budget: the caller exits 130."""
    if done or budget_spent():
        return False
    print(f"interrupted; continue with: {resume_command(options, phase)}", file=sys.stderr)
    return True


def run_study(study: StudyConfig, options: StudyOptions) -> int:
    """Runs (or resumes) a study to the end; returns the process exit code."""
    from study.trackers import check_trackers

    started = time.monotonic()
    check_options(options)
    study = prepare(study, options)
    settings = check_trackers(options.loggers, options.results_dir, options.name)
    data = load_data(study)
    config = study.trial.data
    splits = data_lib.split(data, config, seed=config.split_seed)  # Sizes checked up front,
    batch_size = study.search.largest("training.batch_size", study.trial.training.batch_size)
    data_lib.check_batch_size(splits, batch_size)  # before Ray starts.
    grid = _fit(study, options, data, settings, started)
    done = finished(grid, options.results_dir, study.search.trial_count)
    return _report(study, options, settings, done)


def _fit(study: StudyConfig, options: StudyOptions, data, settings, started):
    """Starts or joins Ray and runs the study's Tune experiment; returns Ray's results."""
    per_trial, _ = resources(study, options)
    mirror = options.mirror()
    with ray_session(options, per_trial):
        if not options.resume:
            options.results_dir.mkdir(parents=True)
            write_config(study, options.results_dir)
        else:
            print(
                "warning: --resume unpickles the experiment state in "
                f"{options.experiment_path}; only resume studies from folders you trust",
                file=sys.stderr,
            )
            if options.num_samples:  # Grown: the generator reads the new size there.
                write_config(study, options.results_dir)
        mirror.changed()
        this_run(study, options, settings, started, mirror)
        tuner = build_tuner(study, options, data)
        print(f"study folder: {study_folder(options)}")
        if line := shares_line(study):
            print(line)
        try:
            return tuner.fit()
        finally:
            mirror.flush()  # The bucket holds every table before the run ends.


def _report(study: StudyConfig, options: StudyOptions, settings, finished: bool) -> int:
    """The end of a run: the table, the failed trials, where to look; the exit code."""
    if interrupted(options, finished):
        return 130
    print("\n" + final_table(study, options.results_dir))
    shares = time_line(options.results_dir)
    failed = failed_trials(options.results_dir)
    for line in [*([shares] if shares else []), *failed, *settings.lines(options.experiment_path)]:
        print(line)
    if not finished:
        print(
            f"stopped at its time budget ({console.duration(options.time_budget)}); "
            f"continue with: {resume_command(options)}"
        )
    print(f"results: {study_folder(options)}")
    return 0

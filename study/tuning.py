"""Runs a study: many trials under Ray Tune, on a local Ray instance or an existing cluster.

The driver loads the data set once and hands it to every trial through Ray's object
store; it never imports TensorFlow, so it never touches a GPU. Results go to
`<storage>/<name>/`: the resolved config, trials.csv, epochs.csv, the Optuna study, and
Ray's experiment state (trial folders with checkpoints), from which `--resume` continues.
"""

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from study import backend, results
from study import data as data_lib
from study.config import MODE, ConfigError
from study.search_config import StudyConfig, load_study

# Ray's newer console output ignores a custom reporter; the classic one can be trimmed.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

CONFIG_FILE = "config.yaml"
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

    @property
    def remote_storage(self) -> bool:
        return "://" in self.storage_path

    @property
    def results_dir(self) -> Path:
        # Ray writes checkpoints to remote storage itself; our tables stay on the driver.
        root = Path("results") if self.remote_storage else Path(self.storage_path)
        return (root / self.name).resolve()

    @property
    def experiment_path(self) -> str:
        if self.remote_storage:
            return f"{self.storage_path.rstrip('/')}/{self.name}"
        return str(self.results_dir)


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
    if options.gpus_per_trial and not options.gpus:
        raise ConfigError("--gpus-per-trial: the study has no GPUs; pass --gpus N as well")
    if options.cpus_per_trial is not None and options.cpus_per_trial <= 0:
        raise ConfigError("--cpus-per-trial: must be > 0")
    if not options.name or "/" in options.name or options.name in (".", ".."):
        raise ConfigError(f"--name: {options.name!r} must be a plain folder name")


def prepare(study: StudyConfig, options: StudyOptions) -> StudyConfig:
    """Checks a new study's folder and space; or reloads a resumed study's config."""
    config_file = options.results_dir / CONFIG_FILE
    if options.resume:
        if not config_file.exists():
            raise ConfigError(f"--resume: no study at {options.results_dir} (no {CONFIG_FILE})")
        return load_study(config_file)
    if options.results_dir.exists():
        raise ConfigError(
            f"--name: {options.results_dir} already exists; --resume continues it, "
            "or choose another --name"
        )
    if not study.search.space:
        raise ConfigError("search.space: empty; list at least one key to search")
    return study


def resources(study: StudyConfig, options: StudyOptions) -> tuple[dict, int | None]:
    """Per-trial resources and the number of trials that may run at once."""
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = study.search.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if options.gpus else 0.0
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
    import ray

    runtime_env = {"env_vars": backend.worker_env()}
    if options.address:
        context = ray.init(address=options.address, log_to_driver=False, runtime_env=runtime_env)
    else:
        context = ray.init(
            include_dashboard=options.dashboard,
            dashboard_host=options.dashboard_host,
            log_to_driver=False,
            runtime_env=runtime_env,
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


def trial_function(params, data):
    """What each trial runs, in its Ray worker (where TensorFlow is imported)."""
    from study.trainable import tune_trainable

    tune_trainable(params, data)


def build_tuner(study: StudyConfig, options: StudyOptions, data):
    from ray import tune

    from study.records import StudyRecorder
    from study.search import make_scheduler, make_searcher, trial_dirname

    per_trial, concurrent = resources(study, options)
    trainable = tune.with_resources(tune.with_parameters(trial_function, data=data), per_trial)
    recorder = StudyRecorder(options.results_dir, study.trial.training.epochs)
    if options.resume:
        return tune.Tuner.restore(
            options.experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        ), recorder
    search = study.search
    # The base config: every trial gets it, with the searcher's choices laid over it.
    param_space = study.trial.to_dict()
    searcher = None
    if search.searcher == "grid":  # Every combination of the choices; no searcher.
        param_space |= {key: tune.grid_search(entry.choice) for key, entry in search.space.items()}
    else:
        searcher = make_searcher(search, options.results_dir, options.name)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=MODE,
            search_alg=searcher,
            scheduler=make_scheduler(search, study.trial.training.epochs),
            num_samples=search.num_samples,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
            # No actor reuse: a trial that ASHA stops finishes its epoch in the background,
            # and Tune cannot hand its worker to the next trial until then.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=options.name,
            storage_path=str(Path(options.storage_path).resolve())
            if not options.remote_storage
            else options.storage_path,
            callbacks=[recorder],
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=search.keep_checkpoints),
            progress_reporter=_reporter(study),
            verbose=1,
        ),
    )
    return tuner, recorder


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


def best_per_loss(results_dir: Path) -> str:
    """The final table: the best trial of each loss by validation accuracy."""
    import pandas as pd

    trials = pd.read_csv(results_dir / "trials.csv", dtype={"trial_id": str})
    if "best_val_accuracy" not in trials or trials["best_val_accuracy"].isna().all():
        return "no trial reported a result"
    ranked = trials.dropna(subset=["best_val_accuracy"]).sort_values(
        "best_val_accuracy", ascending=False
    )
    best = ranked.groupby("loss.name", sort=False).head(1)
    columns = [
        "loss.name",
        "trial_id",
        "best_val_accuracy",
        "epochs_run",
        "status",
        "optimizer.name",
        "optimizer.learning_rate",
    ]
    return best[[c for c in columns if c in best]].to_string(index=False)


def resume_command(options: StudyOptions, phase: str = "") -> str:
    """The command that continues the study (or its `--confirm` phase)."""
    storage = "" if options.storage_path == "results" else f" --storage-path {options.storage_path}"
    words = ["python -m study.run", phase, "--resume", f"--name {options.name}{storage}"]
    return " ".join(word for word in words if word)


def run_study(study: StudyConfig, options: StudyOptions) -> int:
    """Runs (or resumes) a study to the end; returns the process exit code."""
    check_options(options)
    study = prepare(study, options)
    config = study.trial.data
    data_lib.resolve_path(config.dataset, config.data_dir)
    data = data_lib.load_cifar(config.dataset, config.data_dir, config.label_mode)
    data_lib.split(data, config, seed=config.split_seed)  # Sizes checked before Ray starts.
    per_trial, _ = resources(study, options)
    connect(options)
    import ray

    try:
        check_cluster(options, per_trial)
        if not options.resume:
            options.results_dir.mkdir(parents=True)
            raw = {**study.trial.to_dict(), "search": study.search.model_dump(mode="json")}
            results.write_text(
                options.results_dir / CONFIG_FILE, yaml.safe_dump(raw, sort_keys=False)
            )
        else:
            print(
                "warning: --resume unpickles the experiment state in "
                f"{options.experiment_path}; only resume studies from folders you trust",
                file=sys.stderr,
            )
        tuner, _ = build_tuner(study, options, data)
        print(f"study folder: {options.results_dir}")
        grid = tuner.fit()
    finally:
        ray.shutdown()
    if grid.num_terminated + grid.num_errors < study.search.trial_count:
        print(f"interrupted; continue with: {resume_command(options)}", file=sys.stderr)
        return 130
    print(f"\nBest trial of each loss, by best {study.search.metric}:")
    print(best_per_loss(options.results_dir))
    print(f"results: {options.results_dir}")
    return 0

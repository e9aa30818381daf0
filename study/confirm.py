"""The confirmation phase: re-train each loss's best configurations over seeds, then test.

A search ranks trials by one noisy run each, on the validation split. For every loss in a
finished study this takes its best full-budget configurations by validation accuracy,
re-trains each with several seeds at the full epoch budget as Ray Tune trials (same
resources, checkpoints, retries and resume as the search) and evaluates each once on the
test set, which nothing before has touched. Results go beside the study's own files:
`confirm.csv` (one row per run) and `confirm/` (Ray's experiment, its trials and epochs).
"""

import sys
import time
from pathlib import Path

import pandas as pd

from study import files, storage
from study.calibration import RELIABILITY, RUN_FIGURES
from study.config import METRIC, MODE, ConfigError, config_values, flatten, from_params, validate
from study.confirmation import (
    NO_SPLIT,
    calibration_summary,
    format_calibration,
    format_summary,
    read_confirm,
    reference_value,
    summary,
)
from study.files import CONFIRM_DIR, CONFIRM_FILE, EPOCHS_TO_90, TRIALS_FILE
from study.search_config import StudyConfig, load_study
from study.tables import compared_key, compared_values
from study.tuning import (
    CONFIG_FILE,
    StudyOptions,
    check_options,
    failed_trials,
    finished,
    interrupted,
    load_data,
    ray_session,
    recorded_epochs,
    resilient,
    resources,
    resume_command,
    resume_point,
    run_config,
)

RUN_COLUMNS = [
    "config_id",
    "seed",
    "trial_id",
    "status",
    "epochs",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "test_loss",
    *RUN_FIGURES,  # Calibration on the test set (study/calibration.py).
    EPOCHS_TO_90,
    RELIABILITY,
]


def compared(study: StudyConfig) -> tuple[str, list]:
    """The key the confirmation compares (what the study stratified by, else the loss) and
    the values the space gives it."""
    return compared_key(study.search), compared_values(study.search)


def select(study: StudyConfig, results_dir: Path, top_per_loss: int) -> tuple[list[dict], list]:
    """Each compared value's best `top_per_loss` full-budget trials by validation accuracy,
    as candidates {value, config_id, config}; and a note on each value left out, and why."""
    from study.tables import comparison, ended_without_result, full_budget

    trials_file = results_dir / TRIALS_FILE
    if not trials_file.is_file():
        raise ConfigError(f"--confirm: {results_dir} holds no trials.csv; run the study first")
    trials = pd.read_csv(trials_file, dtype={"trial_id": str})
    epochs = study.trial.training.epochs
    key, values = compared(study)
    notes = []
    unfinished = trials.status.isin(["pending", "running", "restarting"]).sum()
    if unfinished:
        notes.append(f"{unfinished} trials of the study had not finished; resume it first?")
    base = study.trial.to_dict()
    full = full_budget(trials, epochs)
    candidates = []
    for row in comparison(trials, key, epochs, values).to_dict("records"):
        value = row[key]
        if not row["full_budget_trials"]:
            why = f"none of its {row['trials']} trials ran all {epochs} epochs"
            if lost := ended_without_result(row):
                why += f" ({lost})"
            if not row["trials"]:
                why = "no trial in the study"
            notes.append(f"{key}={value}: {why}; not confirmed")
            continue
        ranked = full[full[key] == value].sort_values(f"best_{METRIC}", ascending=False)
        for _, trial in ranked.head(top_per_loss).iterrows():
            config = from_params(config_values(trial, base), base).to_dict()
            candidates.append({"value": value, "config_id": trial.trial_id, "config": config})
    if not candidates:
        raise ConfigError(f"--confirm: no trial in {results_dir} ran the full {epochs} epochs")
    return candidates, notes


def confirm_function(params, data, recorded=None, experiment=None):
    """One confirmation run, in its Ray worker: a candidate's config with a new seed
    (`recorded` and `experiment` as in `study.tuning.resume_point`)."""
    from study.trainable import run_tune_trial

    raw = {**params["candidate"]["config"], "seed": params["seed"]}
    run_tune_trial(validate(raw), data, evaluate_test=True, **resume_point(recorded, experiment))


def confirm_params(trial) -> dict:
    """What a confirmation run trained with (for TensorBoard and the trackers): its
    candidate's config, dotted, with the run's seed, and the study trial it repeats."""
    candidate = trial.config["candidate"]
    config = {**flatten(candidate["config"]), "seed": trial.config["seed"]}
    return {**config, "config_id": candidate["config_id"]}


def _recorder_class():
    from study.records import StudyRecorder

    class ConfirmRecorder(StudyRecorder):
        """The study's recorder, keyed by candidate and seed; also keeps confirm.csv, whose
        first column is the compared key (`loss.name`, or what the study stratified by)."""

        def __init__(self, results_dir: Path, max_epochs: int, key: str):
            super().__init__(results_dir, max_epochs)
            self.key = key

        def _row(self, trial) -> dict:
            if trial.trial_id not in self.trials:
                candidate = trial.config["candidate"]
                self.trials[trial.trial_id] = {
                    "trial_id": trial.trial_id,
                    self.key: candidate["value"],
                    "config_id": candidate["config_id"],
                    "seed": trial.config["seed"],
                    "status": "pending",
                    "epochs_run": 0,
                    "restarts": 0,
                }
            return self.trials[trial.trial_id]

        # Tune saves its experiment state every few seconds, so after a killed driver it
        # may run a finished run's last epochs again: the first result recorded stands.
        def _finished(self, trial) -> bool:
            return "test_accuracy" in self.trials.get(trial.trial_id, {})

        def on_trial_start(self, iteration, trials, trial, **info):
            if not self._finished(trial):
                super().on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not self._finished(trial):
                super().on_trial_result(iteration, trials, trial, result, **info)

        def _save(self) -> None:
            super()._save()
            for trial_id, row in self.trials.items():
                row[EPOCHS_TO_90] = epochs_to_reach(self.epochs, trial_id)
            rows = confirm_rows(self.trials, self.key)
            files.write_csv(self.results_dir.parent / CONFIRM_FILE, rows)

    return ConfirmRecorder


def epochs_to_reach(epochs: list[dict], trial_id: str, share: float = 0.9) -> int | None:
    """The first epoch at which a run's validation accuracy reached `share` of its own
    last epoch's (once each epoch, its first run of it); None before it has an epoch."""
    rows = sorted(
        (row for row in epochs if row["trial_id"] == trial_id and not row.get("rerun")),
        key=lambda row: row["epoch"],
    )
    if not rows:
        return None
    target = share * rows[-1][METRIC]
    return next(int(row["epoch"]) for row in rows if row[METRIC] >= target)


def confirm_rows(trials: dict[str, dict], key: str) -> list[dict]:
    renamed = {
        "epochs_run": "epochs",
        "last_val_accuracy": "val_accuracy",
        "last_val_loss": "val_loss",
    }
    rows = []
    for trial in trials.values():
        row = {renamed.get(name, name): value for name, value in trial.items()}
        rows.append({column: row.get(column) for column in [key, *RUN_COLUMNS]})
    return rows


def run_confirm(options: StudyOptions, seeds: int, top_per_loss: int) -> int:
    """Runs (or resumes) the confirmation of the finished study `options.name`."""
    from study.trackers import check_trackers

    started = time.monotonic()
    check_options(options)
    if seeds < 2:
        raise ConfigError(f"--seeds: {seeds}; at least 2 for a confidence interval")
    if top_per_loss < 1:
        raise ConfigError(f"--top-per-loss: {top_per_loss}; must be >= 1")
    results_dir = options.results_dir
    options.fetch()  # From its bucket, where the study lives in one.
    if not (results_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--name: no study at {options.experiment_path} (no {CONFIG_FILE})")
    study = load_study(results_dir / CONFIG_FILE)
    confirm_dir = results_dir / CONFIRM_DIR
    if options.resume and not confirm_dir.is_dir():
        raise ConfigError(f"--resume: {results_dir} has no confirmation to continue")
    if not options.resume and confirm_dir.exists():
        raise ConfigError(f"--confirm: {confirm_dir} exists; add --resume to continue it")
    candidates, notes = select(study, results_dir, top_per_loss)
    group = f"{options.name}-{CONFIRM_DIR}"
    settings = check_trackers(options.loggers, results_dir, options.name, group)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    data = load_data(study)
    per_trial, _ = resources(study, options)
    mirror = options.mirror()
    with ray_session(options, per_trial):
        _this_run(study, options, len(candidates) * seeds, settings, started, mirror)
        tuner = _tuner(study, options, data, candidates, list(range(1, seeds + 1)), per_trial)
        where = storage.join(options.experiment_path, CONFIRM_DIR)
        print(f"confirming {len(candidates)} configurations x {seeds} seeds in {where}")
        try:
            grid = tuner.fit()
        finally:
            mirror.flush()
    done = finished(grid, confirm_dir, len(candidates) * seeds)
    if interrupted(options, done, "--confirm"):
        return 130
    command = resume_command(options, "--confirm")
    key = compared(study)[0]
    confirm = read_confirm(results_dir / CONFIRM_FILE)
    tables = summary(confirm, key, reference_value(study, key))
    print("\n" + format_summary(*tables, key))
    if beside := format_calibration(
        *calibration_summary(confirm, key, reference_value(study, key)), key
    ):
        print(beside)
        if study.trial.data.validation == "test":
            print(f"  (no temperature: {NO_SPLIT})")
    for note in notes:  # Again, under the table: what the comparison leaves out.
        print(f"note: {note}")
    for line in failed_trials(confirm_dir):
        print(line)
    for line in settings.lines(f"{options.experiment_path}/{CONFIRM_DIR}"):
        print(line)
    if not done:
        print(f"stopped at its time budget; continue with: {command}")
    bucket = f" (and {storage.join(options.experiment_path, CONFIRM_FILE)})"
    print(f"results: {results_dir / CONFIRM_FILE}{bucket if options.remote_storage else ''}")
    return 0


def _this_run(
    study: StudyConfig, options: StudyOptions, total: int, settings, started, mirror
) -> None:
    """This run's callbacks (study/callbacks.py): the recorder of the confirmation's tables
    (made in every run, as the study's is), the bucket's copy, progress, time budget,
    trackers."""
    from study.callbacks import Mirrored, Progress, ThisRun, TimeBudget, tracker_loggers

    key, folder = compared(study)[0], options.results_dir / CONFIRM_DIR
    epochs = study.trial.training.epochs
    recorder = _recorder_class()(folder, epochs, key)
    progress = Progress(folder, total, epochs, key, False, started)
    budget = [TimeBudget(options.time_budget, started)] if options.time_budget else []
    trackers = tracker_loggers(settings, confirm_params)
    ThisRun.callbacks = [recorder, Mirrored(mirror), progress, *budget, *trackers]


def _tuner(study: StudyConfig, options: StudyOptions, data, candidates, seeds, per_trial):
    from ray import tune

    from study.search import trial_dirname

    concurrent = resources(study, options)[1]
    confirm_dir = options.results_dir / CONFIRM_DIR
    recorded = recorded_epochs(confirm_dir) if options.resume else {}
    trainable = tune.with_parameters(
        confirm_function, data=data, recorded=recorded,
        experiment=f"{options.experiment_path}/{CONFIRM_DIR}",
    )  # fmt: skip
    trainable = tune.with_resources(resilient(trainable), per_trial)
    # Beside the study's own experiment: <storage>/<name>/confirm.
    storage = options.experiment_path
    if options.resume:
        return tune.Tuner.restore(
            f"{storage}/{CONFIRM_DIR}",
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    return tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(candidates), "seed": tune.grid_search(seeds)},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
            reuse_actors=False,
        ),
        run_config=run_config(
            CONFIRM_DIR,
            storage,
            confirm_params,
            failure_config=tune.FailureConfig(max_failures=study.search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=study.search.keep_checkpoints),
            progress_reporter=tune.CLIReporter(
                metric_columns={"epoch": "epoch", METRIC: "val_acc", "test_accuracy": "test_acc"},
                parameter_columns={
                    "candidate/value": compared(study)[0],
                    "candidate/config_id": "config",
                    "seed": "seed",
                },
                max_report_frequency=30,
                max_column_length=32,
            ),
        ),
    )

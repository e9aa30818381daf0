"""The one place that turns a `search` config into Ray Tune and Optuna objects.

A study stratified by a choice key (by default the loss) compares that key's values on an
equal footing: each value gets an equal share of the trials, its own Optuna study
(`<study>/<value>` in the study's optuna.db) that models the other keys, and its own ASHA
rungs; trials of every value interleave in one Tune run. Without stratification one
Optuna study models the whole space.

The space is Optuna define-by-run: keys are sampled in the order the config lists them,
so a learning-rate range can depend on the optimizer already chosen and label smoothing
can be sampled only for the losses that define it. Each trial's Tune config holds every
config key once, dotted, with the value the trial trains with; a searched key that a
condition left out is None there (empty in every table) and the trial trains with the
base value (`study.config.from_params`). Nothing else sees Tune or Optuna.
"""

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, ClassVar

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

from study.config import METRIC, MODE
from study.files import EPOCHS_FILE
from study.search_config import CONFIG_FILE, OPTUNA_FILE, DefineByRun, SearchConfig
from study.statuses import DEAD, ORPHANED

EPOCH = "epoch"  # ASHA's clock: the epochs a trial has reported.
RAY_TRIAL_ID = "ray_trial_id"  # The user attribute that ties an Optuna trial to Tune's.


def study_name(name: str, stratum) -> str:
    """The Optuna study of one stratum: `<study>/<value>`; the study's own name if joint."""
    return name if stratum is None else f"{name}/{stratum}"


class StudySearcher(Searcher):
    """Optuna's TPE (or random) sampler behind Tune's searcher API, one study per stratum.

    Optuna's record tells the truth: a trial that ran the full budget is COMPLETE with its
    best validation accuracy, one that ASHA stopped is PRUNED (its epochs are its
    intermediate values), a dead one PRUNED too with the user attribute status "dead"
    (see `on_trial_complete`), a diverged or failed one FAIL; each carries its Tune trial
    id.
    """

    def __init__(self, search: SearchConfig, storage: str, name: str, max_epochs: int):
        super().__init__(metric=METRIC, mode=MODE)
        self.search, self.storage, self.name, self.max_epochs = search, storage, name, max_epochs
        self.shares = search.shares()
        self.suggested = dict.fromkeys(self.shares, 0)
        # Tune trial id -> (stratum, the Optuna trial's id in the storage): ids, not Optuna's
        # Trial objects, which pickle the storage's path and would reopen it on a resume.
        self.trials: dict[str, tuple[Any, int]] = {}
        self.best: dict[str, float] = {}
        self.last_epoch: dict[str, int] = {}
        self.done: set[str] = set()
        self._studies: dict[str, Any] = {}

    def _trial(self, trial_id: str):
        """The Optuna trial of Tune's trial `trial_id`, in this searcher's storage."""
        import optuna

        stratum, stored = self.trials[trial_id]
        return optuna.trial.Trial(self.study(stratum), stored)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # The metric and mode are the study's constants.

    def study(self, stratum):
        import optuna

        name = study_name(self.name, stratum)
        if name not in self._studies:
            study = optuna.create_study(
                storage=self.storage,
                sampler=self._sampler(list(self.shares).index(stratum)),
                study_name=name,
                direction="maximize",
                load_if_exists=True,
            )
            if not study.trials:  # A new study: say what it is, queue the baseline.
                study.set_metric_names([METRIC])
                if self.search.stratify is not None:
                    study.set_user_attr("stratify", {self.search.stratify: stratum})
                if self._holds_baseline(stratum):
                    fixed = {self.search.stratify} if self.search.stratify else set()
                    study.enqueue_trial(
                        {k: v for k, v in self.search.baseline.items() if k not in fixed}
                    )
            self._studies[name] = study
        return self._studies[name]

    def _holds_baseline(self, stratum) -> bool:
        baseline = self.search.baseline
        return bool(baseline) and baseline.get(self.search.stratify, stratum) == stratum

    def _sampler(self, index: int):
        import optuna

        seed = self.search.seed + index  # Each stratum draws its own values.
        if self.search.searcher == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # multivariate + group model the conditional space jointly; constant_liar keeps
        # parallel trials from all proposing the same point.
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        )

    def suggest(self, trial_id: str) -> dict | None:
        waiting = [s for s in self.shares if self.suggested[s] < self.shares[s]]
        if not waiting:
            return Searcher.FINISHED
        # The stratum furthest from its share goes next: strata interleave.
        stratum = min(waiting, key=lambda s: self.suggested[s] / self.shares[s])
        self.suggested[stratum] += 1
        trial = self.study(stratum).ask()
        trial.set_user_attr(RAY_TRIAL_ID, trial_id)
        fixed = {} if self.search.stratify is None else {self.search.stratify: stratum}
        self.trials[trial_id] = (stratum, trial._trial_id)
        return DefineByRun(self.search, fixed)(trial)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.trials or trial_id in self.done or result.get("diverged"):
            return
        epoch, value = int(result[EPOCH]), float(result[METRIC])
        self.best[trial_id] = max(value, self.best.get(trial_id, value))
        self.last_epoch[trial_id] = epoch
        with warnings.catch_warnings(), contextlib.suppress(_finished_error()):
            warnings.simplefilter("ignore")  # An epoch run again after a restore.
            self._trial(trial_id).report(value, epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False) -> None:
        import optuna

        if trial_id not in self.trials or trial_id in self.done:
            return
        if result and not result.get("diverged"):
            self.on_trial_result(trial_id, result)
        if error:
            self._report_recorded(trial_id)
        self.done.add(trial_id)
        state, values = optuna.trial.TrialState.COMPLETE, self.best.get(trial_id)
        stratum, trial = self.trials[trial_id][0], self._trial(trial_id)
        if error or (result or {}).get("diverged") or values is None:
            state, values = optuna.trial.TrialState.FAIL, None
        elif (result or {}).get(DEAD):
            # PRUNED, not FAIL: TPE leaves failed trials out of its model, but ranks a
            # pruned one by its last reported accuracy (chance, here) below the others,
            # so it learns that this region of the space kills the network.
            state, values = optuna.trial.TrialState.PRUNED, None
            trial.set_user_attr("status", DEAD)
        elif self.last_epoch.get(trial_id, 0) < self.max_epochs:
            state, values = optuna.trial.TrialState.PRUNED, None
        # After a resume, a trial that Optuna already saw finish (SQLite is written at once,
        # Tune's own state every few seconds) may finish again.
        self.study(stratum).tell(trial, values, state=state, skip_if_finished=True)

    def _report_recorded(self, trial_id: str) -> None:
        """The epochs of a failed trial that the study's epochs.csv holds and Optuna does
        not. Tune hands a searcher no result of the epoch at which ASHA stops a trial (its
        last, at the full budget), only the trial's end; a worker that dies while Tune
        saves that epoch's checkpoint ends the trial in an error, with no result at all,
        and its last epoch reached Optuna only through the study's own table."""
        import pandas as pd

        path = Path(self.storage.removeprefix("sqlite:///")).parent / EPOCHS_FILE
        if not path.is_file() or path.stat().st_size == 0:
            return
        epochs = pd.read_csv(path, dtype={"trial_id": str})
        mine = epochs[(epochs.trial_id == trial_id) & (epochs.get("rerun", 0) == 0)]
        for row in mine.sort_values("epoch").itertuples():
            if int(row.epoch) > self.last_epoch.get(trial_id, 0):
                self.on_trial_result(trial_id, {EPOCH: row.epoch, METRIC: getattr(row, METRIC)})

    def close_orphans(self) -> list[str]:
        """After a resume: closes, as FAIL with the status "orphaned", each Optuna trial
        still running that this searcher (as Tune saved it) never proposed. The driver
        died after proposing it and before Tune saved its state, so Tune does not know the
        trial and will not run it on; its share goes to a new trial. Returns their Tune
        ids."""
        import optuna

        known = set(self.trials)
        closed = []
        for stratum in self.shares:
            study = self.study(stratum)
            for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
                ray_id = trial.user_attrs.get(RAY_TRIAL_ID)
                if ray_id in known:
                    continue
                study._storage.set_trial_user_attr(trial._trial_id, "status", ORPHANED)
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                closed.append(ray_id)
        return closed

    def grow(self, search: SearchConfig) -> None:
        """A study grown to search.num_samples trials: each stratum's share grows to its
        share of the new total; its Optuna study goes on from the trials it holds."""
        self.search, self.shares = search, search.shares()
        self.suggested = {stratum: self.suggested.get(stratum, 0) for stratum in self.shares}

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "_studies"}
        with open(checkpoint_path, "wb") as file:
            pickle.dump(state, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
        self._studies = {}


def _finished_error():
    import optuna

    return optuna.exceptions.UpdateFinishedTrialError


class StudyGenerator(SearchGenerator):
    """Tune's generator of trials from a searcher, whose number of trials follows the
    study's config.yaml when Tune restores it: `--resume --num-samples N` writes N there
    before Tune starts, and the restored study grows to N trials, its searcher going on
    from what it has learned. (Tune restores a generator with the trial count it began
    with; growing an experiment in place is outside what Tuner.restore offers.)"""

    # The study's folder in the driver running now, set before Tune restores a study: the
    # pickled paths are where the study began (another folder, or another machine).
    folder: ClassVar[Path | None] = None

    def __init__(self, searcher: Searcher, config_file: Path):
        super().__init__(searcher)
        self.config_file = str(config_file)

    def restore_from_dir(self, dirpath: str) -> None:
        from study.search_config import load_study

        super().restore_from_dir(dirpath)
        base = self.searcher
        while not isinstance(base, StudySearcher):
            base = base.searcher  # Through a ConcurrencyLimiter.
        if StudyGenerator.folder is not None:
            self.config_file = str(StudyGenerator.folder / CONFIG_FILE)
            base.storage = f"sqlite:///{StudyGenerator.folder / OPTUNA_FILE}"
        base.close_orphans()
        if not Path(self.config_file).is_file():  # A study folder moved since it began.
            return
        search = load_study(self.config_file, check_space=False).search
        if search.num_samples > base.search.num_samples:
            base.grow(search)
            state = self.get_state()
            self.set_state({**state, "total_samples": search.num_samples, "finished": False})


def make_searcher(search: SearchConfig, experiment_dir: Path, name: str, max_epochs: int):
    """The study's searcher, its Optuna studies in `experiment_dir/optuna.db`."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    return StudySearcher(search, f"sqlite:///{experiment_dir / OPTUNA_FILE}", name, max_epochs)


def trial_generator(searcher: StudySearcher, experiment_dir: Path, concurrent=None):
    """What Tune draws trials from: the searcher behind a limit of `concurrent` trials at
    once (if any), its size following `experiment_dir/config.yaml` on a resume."""
    if concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    return StudyGenerator(searcher, experiment_dir / CONFIG_FILE)


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


class StratifiedASHA(FIFOScheduler):
    """One ASHA per value of the stratifying key: a trial is compared at each rung only with
    trials of its own stratum, so a slow-starting loss is not stopped by a fast one."""

    def __init__(self, key: str, **asha):
        super().__init__()
        self.key, self.asha, self.schedulers = key, asha, {}
        self._metric, self._mode = None, None

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric, mode
        for scheduler in self.schedulers.values():
            scheduler.set_search_properties(metric, mode, **spec)
        return True

    def of(self, trial) -> ASHAScheduler:
        stratum = str(trial.config.get(self.key))
        if stratum not in self.schedulers:
            scheduler = ASHAScheduler(**self.asha)
            scheduler.set_search_properties(self._metric, self._mode)
            self.schedulers[stratum] = scheduler
        return self.schedulers[stratum]

    def on_trial_add(self, tune_controller, trial):
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self.of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self.of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        lines = [f"ASHA per {self.key}:"]
        for stratum, scheduler in self.schedulers.items():
            lines.append(f"  {stratum}: {scheduler.debug_string()}")
        return "\n".join(lines)


def make_scheduler(search: SearchConfig, max_epochs: int):
    """ASHA on epochs (per stratum in a stratified study), or every trial to the end."""
    if search.scheduler == "fifo":
        return FIFOScheduler()
    asha = {
        "time_attr": EPOCH,
        "max_t": max_epochs,
        "grace_period": min(search.grace_period, max_epochs),
        "reduction_factor": search.reduction_factor,
    }
    if search.stratify is None:
        return ASHAScheduler(**asha)
    return StratifiedASHA(search.stratify, **asha)

"""The search space: validation, define-by-run sampling, and resolving trial configs."""

import math

import optuna
import pytest
import yaml

from study.config import ConfigError, from_params
from study.search import DefineByRun, StratifiedASHA, make_scheduler, make_searcher
from study.search_config import load_study
from study.tuning import StudyOptions, check_options, resources

from .conftest import REPO

DEFAULT = REPO / "configs" / "default.yaml"


def _sample(search, count=200, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define = DefineByRun(search)
    trials = []
    for _ in range(count):
        trial = study.ask()
        define(trial)
        trials.append(trial.params)
        study.tell(trial, 0.0)
    return trials


def test_default_space_searches_what_the_study_promises():
    search = load_study(DEFAULT).search
    assert set(search.space["loss.name"].choice) == {
        "categorical_crossentropy",
        "focal",
        "mean_squared_error",
        "rescaled_square",
        "mean_squared_logarithmic_error",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
    }
    assert set(search.space["optimizer.name"].choice) == {"rmsprop", "adam", "adamw", "sgd"}
    for key in (
        "optimizer.learning_rate",
        "model.conv_dropout",
        "model.dense_dropout",
        "optimizer.weight_decay",
        "loss.label_smoothing",
        "model.batch_norm",
        "model.augment",
    ):
        assert key in search.space


def test_learning_rate_range_follows_the_optimizer_and_smoothing_the_loss():
    search = load_study(DEFAULT).search
    trials = _sample(search)
    for params in trials:
        low, high = search.space["optimizer.learning_rate"].ranges[params["optimizer.name"]]
        assert low <= params["optimizer.learning_rate"] <= high
        smoothed = params["loss.name"] in ("categorical_crossentropy", "focal")
        assert ("loss.label_smoothing" in params) == smoothed
    sgd = [p["optimizer.learning_rate"] for p in trials if p["optimizer.name"] == "sgd"]
    adam = [p["optimizer.learning_rate"] for p in trials if p["optimizer.name"] == "adam"]
    assert max(sgd) > 0.05 and max(adam) <= 3e-3


def test_every_sample_is_a_valid_trial_config():
    study = load_study(DEFAULT)
    base = study.trial.to_dict()
    for params in _sample(study.search, count=100, seed=1):
        config = from_params(params, base)
        assert config.loss.name == params["loss.name"]
        assert config.optimizer.learning_rate == params["optimizer.learning_rate"]
        if "loss.label_smoothing" not in params:
            assert config.loss.label_smoothing == 0.0  # The base value stands.


def test_searcher_queues_the_baseline_first_and_stores_its_study(tmp_path):
    study = load_study(DEFAULT, ["search.stratify=null"])
    searcher = make_searcher(study.search, tmp_path, "baseline-test", max_epochs=3)
    first = searcher.suggest("t1")
    assert {k: first[k] for k in study.search.baseline} == study.search.baseline
    second = searcher.suggest("t2")
    assert second != first
    assert set(first) == set(second) == set(study.search.space)  # Every key, once.
    stored = optuna.load_study(
        study_name="baseline-test", storage=f"sqlite:///{tmp_path}/optuna.db"
    )
    assert stored.direction == optuna.study.StudyDirection.MAXIMIZE
    assert stored.metric_names == ["val_accuracy"]
    searcher.on_trial_complete("t1", {"val_accuracy": 0.5, "epoch": 3})
    searcher.on_trial_complete("t2", {"val_accuracy": 0.0, "epoch": 1, "diverged": "nan"})
    states = [t.state.name for t in stored.get_trials()]
    assert states == ["COMPLETE", "FAIL"]
    assert [t.user_attrs["ray_trial_id"] for t in stored.get_trials()] == ["t1", "t2"]


def test_stratified_searcher_shares_models_and_optuna_states(tmp_path):
    """Every loss gets its share of the trials, interleaved, from its own Optuna study
    (so hinge's learning rate is not chosen from cross-entropy's results), and Optuna's
    record says how each trial ended: PRUNED when stopped early, FAIL when diverged."""
    study = load_study(DEFAULT, ["search.num_samples=27"])
    search = study.search
    assert search.stratify == "loss.name"
    shares = search.shares()
    assert list(shares)[0] == "categorical_crossentropy"  # The baseline's stratum first.
    assert sum(shares.values()) == 27 and sorted(set(shares.values())) == [3, 4]
    searcher = make_searcher(search, tmp_path, "strata", max_epochs=4)
    suggested = [searcher.suggest(f"t{i}") for i in range(27)]
    assert searcher.suggest("t27") is searcher.FINISHED
    losses = [params["loss.name"] for params in suggested]
    assert {loss: losses.count(loss) for loss in shares} == shares
    assert set(losses[:8]) == set(shares)  # Interleaved: each loss once before any twice.
    assert {k: suggested[0][k] for k in search.baseline} == search.baseline
    for params in suggested:  # Label smoothing only where the loss defines it; else empty.
        smoothed = params["loss.name"] in ("categorical_crossentropy", "focal")
        assert (params["loss.label_smoothing"] is not None) == smoothed
        assert from_params(params, study.trial.to_dict()).loss.name == params["loss.name"]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    names = sorted(optuna.study.get_all_study_names(storage))
    assert names == sorted(f"strata/{loss}" for loss in shares)
    hinge = optuna.load_study(study_name="strata/hinge", storage=storage)
    assert hinge.user_attrs["stratify"] == {"loss.name": "hinge"}
    assert "loss.name" not in hinge.trials[0].params  # Fixed by the stratum, not sampled.
    # How trials end: full budget, stopped by ASHA after 2 epochs, diverged.
    hinge_ids = [f"t{i}" for i, loss in enumerate(losses) if loss == "hinge"]
    for epoch, value in enumerate([0.2, 0.4, 0.3, 0.35], start=1):
        searcher.on_trial_result(hinge_ids[0], {"epoch": epoch, "val_accuracy": value})
    searcher.on_trial_complete(hinge_ids[0], {"epoch": 4, "val_accuracy": 0.35})
    searcher.on_trial_result(hinge_ids[1], {"epoch": 1, "val_accuracy": 0.1})
    searcher.on_trial_complete(hinge_ids[1], {"epoch": 2, "val_accuracy": 0.15})
    searcher.on_trial_complete(hinge_ids[2], {"epoch": 1, "val_accuracy": 0.0, "diverged": "x"})
    trials = {t.user_attrs["ray_trial_id"]: t for t in hinge.get_trials()}
    full, stopped, diverged = (trials[trial_id] for trial_id in hinge_ids[:3])
    assert full.state.name == "COMPLETE" and full.value == 0.4  # Its best epoch.
    assert full.intermediate_values == {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.35}
    assert stopped.state.name == "PRUNED" and stopped.intermediate_values == {1: 0.1, 2: 0.15}
    assert diverged.state.name == "FAIL"


def test_a_resumed_searcher_keeps_its_shares(tmp_path):
    search = load_study(DEFAULT, ["search.num_samples=8"]).search
    searcher = make_searcher(search, tmp_path, "resume", max_epochs=4)
    first = [searcher.suggest(f"t{i}")["loss.name"] for i in range(3)]
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher(search, tmp_path, "resume", max_epochs=4)
    restored.restore(str(tmp_path / "searcher.pkl"))
    rest = [restored.suggest(f"t{i}")["loss.name"] for i in range(3, 8)]
    assert sorted(first + rest) == sorted(search.space["loss.name"].choice)
    assert restored.suggest("t8") is restored.FINISHED
    restored.on_trial_complete("t0", {"epoch": 4, "val_accuracy": 0.5})  # Known after restore.
    stored = optuna.load_study(
        study_name="resume/categorical_crossentropy", storage=f"sqlite:///{tmp_path}/optuna.db"
    )
    assert [t.state.name for t in stored.trials] == ["COMPLETE"]


class _Trial:
    """What a scheduler reads of a Tune trial."""

    def __init__(self, trial_id, loss):
        self.trial_id, self.config = trial_id, {"loss.name": loss}

    def __repr__(self):
        return self.trial_id


def _decisions(scheduler, max_epochs=8) -> dict:
    """Feeds a scheduler four fast cross-entropy trials and two slow hinge trials, epoch by
    epoch (cross-entropy first, the better hinge trial before the worse one)."""
    scheduler.set_search_properties("val_accuracy", "max")
    fast = [(_Trial(f"ce{i}", "categorical_crossentropy"), 0.5 + 0.1 * i) for i in range(4)]
    slow = [(_Trial("hinge_good", "hinge"), 0.06), (_Trial("hinge_bad", "hinge"), 0.05)]
    for trial, _ in fast + slow:
        scheduler.on_trial_add(None, trial)
    decisions = {}
    for epoch in (1, 2, 4, 8):
        for trial, value in fast + slow:
            if "STOP" in (decisions.get((trial.trial_id, e)) for e in (1, 2, 4)):
                continue
            result = {"epoch": epoch, "val_accuracy": value}
            decisions[(trial.trial_id, epoch)] = scheduler.on_trial_result(None, trial, result)
    return decisions


def test_asha_compares_a_trial_only_within_its_stratum():
    """A slow-starting loss (hinge) is not stopped by a fast one (cross-entropy): each loss
    has its own rungs, at the epochs that grace period and reduction factor give."""
    overrides = ["search.grace_period=1", "search.reduction_factor=2"]
    stratified = make_scheduler(load_study(DEFAULT, overrides).search, max_epochs=8)
    assert isinstance(stratified, StratifiedASHA)
    decisions = _decisions(stratified)
    rungs = stratified.of(_Trial("x", "hinge"))._brackets[0]._rungs
    assert sorted(milestone for milestone, _ in rungs) == [1, 2, 4, 8]  # grace 1, x2, to 8.
    # The better hinge trial runs to the end although cross-entropy trials are far ahead;
    # the worse one is stopped at the first rung by the better hinge trial.
    assert [decisions[("hinge_good", e)] for e in (1, 2, 4)] == ["CONTINUE"] * 3
    assert decisions[("hinge_bad", 1)] == "STOP"
    # One ASHA for all (no stratification) stops both hinge trials at the first rung.
    joint = make_scheduler(load_study(DEFAULT, [*overrides, "search.stratify=null"]).search, 8)
    assert type(joint).__name__ == "AsyncHyperBandScheduler"
    decisions = _decisions(joint)
    assert decisions[("hinge_good", 1)] == decisions[("hinge_bad", 1)] == "STOP"


def test_stratify_defaults_follow_the_space_and_bad_keys_are_refused():
    assert load_study(DEFAULT).search.stratify == "loss.name"
    without_loss = load_study(REPO / "configs" / "seed.yaml").search
    assert without_loss.searcher == "grid" and without_loss.stratify is None
    space_only = load_study(
        None, ["search.space.optimizer.name={choice: [adam, sgd]}", "search.num_samples=2"]
    )
    assert space_only.search.stratify is None  # No loss choice: a joint search.
    by_optimizer = load_study(DEFAULT, ["search.stratify=optimizer.name"]).search
    assert list(by_optimizer.shares()) == ["rmsprop", "adam", "adamw", "sgd"]
    for override, expected in [
        ("search.stratify=model.conv_dropout", "search.stratify: 'model.conv_dropout' is not"),
        ("search.stratify=loss.label_smoothing", "is not a choice of search.space"),
        ("search.stratify=nope.key", "allowed: loss.name, optimizer.name"),
        ("search.num_samples=7", "search.num_samples: 7 is fewer than the 8 values"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_study(DEFAULT, [override])


def test_scheduler_runs_on_epochs():
    overrides = ["search.grace_period=3", "search.reduction_factor=2", "search.stratify=null"]
    asha = make_scheduler(load_study(DEFAULT, overrides).search, max_epochs=20)
    assert (asha._time_attr, asha._max_t) == ("epoch", 20)
    milestones = sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
    assert milestones == [3, 6, 12]  # grace 3, then x2, below the maximum of 20.
    fifo = make_scheduler(load_study(DEFAULT, ["search.scheduler=fifo"]).search, 20)
    assert type(fifo).__name__ == "FIFOScheduler"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("search.num_samples=0", "search.num_samples"),
        ("search.metric=val_loss", "unknown key 'search.metric'"),
        ("search.searcher=grid", "search.space.optimizer.learning_rate: the grid searcher"),
        ("search.searcher=annealing", "search.searcher"),
        ("search.space.model.width={uniform: [0, 1]}", "search.space.model.width"),
        ("search.space.model.depth={choice: [1, 2]}", "unknown key 'model.depth'"),
        ("search.space.optimizer.name={choice: [adagrad]}", "unknown optimizer 'adagrad'"),
        ("search.space.model.conv_dropout={uniform: [0.5, 0.1]}", "low < high"),
        ("search.space.optimizer.learning_rate={loguniform: [0, 1]}", "must be positive"),
        ("search.space.model.width={choice: [1], uniform: [0.1, 1]}", "exactly one of"),
        (
            "search.space.loss.label_smoothing={uniform: [0, 0.2]}",
            "with loss.name=mean_squared_error",
        ),
        ("search.baseline.optimizer.learning_rate=0.9", "lies outside its search space"),
        ("search.baseline.model.width=0.5", "search.baseline.model.width: not a key"),
        ("search.grace_period=0", "search.grace_period"),
    ],
)
def test_bad_search_entries_are_refused(override, expected):
    with pytest.raises(ConfigError) as error:
        load_study(DEFAULT, [override])
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_resources_and_concurrency():
    study = load_study(DEFAULT)
    # Packed by default: 4 trials share each GPU.
    assert resources(study, StudyOptions("x", gpus=4)) == ({"cpu": 1.0, "gpu": 0.25}, 16)
    assert resources(study, StudyOptions("x", gpus=0.5)) == ({"cpu": 1.0, "gpu": 0.25}, 2)
    assert resources(study, StudyOptions("x", gpus=0.1))[0]["gpu"] == 0.1  # All it has.
    whole = StudyOptions("x", gpus=4, gpus_per_trial=1)  # A GPU each, as asked.
    assert resources(study, whole) == ({"cpu": 1.0, "gpu": 1.0}, 4)
    per_trial, concurrent = resources(study, StudyOptions("x", gpus=4, gpus_per_trial=0.5))
    assert per_trial["gpu"] == 0.5 and concurrent == 8
    per_trial, concurrent = resources(study, StudyOptions("x", gpus=1, gpus_per_trial=0.25))
    assert concurrent == 4
    assert resources(study, StudyOptions("x")) == ({"cpu": 1.0, "gpu": 0.0}, None)
    assert math.isclose(resources(study, StudyOptions("x", cpus_per_trial=3))[0]["cpu"], 3)
    packed = load_study(DEFAULT, ["search.gpus_per_trial=0.25"])
    assert resources(packed, StudyOptions("x", gpus=2)) == ({"cpu": 1.0, "gpu": 0.25}, 8)
    with pytest.raises(ConfigError, match="search.gpus_per_trial: 0.25 GPUs per trial"):
        resources(packed, StudyOptions("x"))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (StudyOptions("x", gpus=-1), "--gpus"),
        (StudyOptions("x", gpus=1, gpus_per_trial=2), "--gpus-per-trial: 2 is more than"),
        (StudyOptions("x", gpus_per_trial=1), "pass --gpus N"),
        (StudyOptions("x", cpus_per_trial=0), "--cpus-per-trial"),
        (StudyOptions("a/b"), "--name"),
    ],
)
def test_bad_resource_options(options, expected):
    with pytest.raises(ConfigError, match=expected):
        check_options(options)


def test_cluster_launcher_config_is_valid():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "configs" / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"])
    assert any("pip install" in c and "[gpu]" in c for c in config["setup_commands"])


def test_the_driver_never_imports_tensorflow():
    """The driver must not touch a GPU: it imports no TensorFlow at all."""
    import subprocess
    import sys

    code = (
        "import sys, study.run, study.tuning, study.records, study.search, study.data; "
        "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_conditional_keys_are_checked_under_their_condition():
    """With hinge as the base loss, label smoothing is still accepted in the space: it is
    only sampled beside cross-entropy or focal (its `when`). The same range without that
    condition is refused, since it would pair smoothing with hinge."""
    study = load_study(DEFAULT, ["loss.name=hinge"])
    for params in _sample(study.search, count=50):
        config = from_params(params, study.trial.to_dict())
        if params["loss.name"] not in ("categorical_crossentropy", "focal"):
            assert config.loss.label_smoothing == 0.0
    unconditional = "search.space.loss.label_smoothing={uniform: [0.0, 0.2]}"
    with pytest.raises(ConfigError, match="label_smoothing > 0 is not defined for loss 'hinge'"):
        load_study(DEFAULT, ["loss.name=hinge", unconditional])


def test_a_dead_trial_goes_to_optuna_as_pruned_and_the_sampler_models_it(tmp_path):
    """A dead trial (study/health.py) is PRUNED with status "dead" and its epochs as
    intermediate values, not FAIL: TPE's split of the trials into good and bad reads
    COMPLETE and PRUNED trials and leaves FAIL out, so only thus does it learn from it."""
    from optuna.samplers._tpe.sampler import _split_trials

    study = load_study(DEFAULT, ["search.num_samples=7", "search.stratify=null"])
    searcher = make_searcher(study.search, tmp_path, "dead", max_epochs=4)
    for trial_id in ("t0", "t1"):
        searcher.suggest(trial_id)
    for epoch in (1, 2):
        searcher.on_trial_result("t0", {"epoch": epoch, "val_accuracy": 0.01})
    searcher.on_trial_complete("t0", {"epoch": 2, "val_accuracy": 0.01, "dead": "learned nothing"})
    for epoch in range(1, 5):
        searcher.on_trial_result("t1", {"epoch": epoch, "val_accuracy": 0.1 * epoch})
    searcher.on_trial_complete("t1", {"epoch": 4, "val_accuracy": 0.4})
    optuna_study = optuna.load_study(study_name="dead", storage=f"sqlite:///{tmp_path}/optuna.db")
    dead, finished = sorted(optuna_study.get_trials(), key=lambda t: t.number)
    assert dead.state.name == "PRUNED" and dead.user_attrs["status"] == "dead"
    assert dead.intermediate_values == {1: 0.01, 2: 0.01}
    below, above = _split_trials(optuna_study, optuna_study.get_trials(), 1)
    assert [t.number for t in below] == [finished.number]
    assert [t.number for t in above] == [dead.number]  # Modelled, as a bad region.

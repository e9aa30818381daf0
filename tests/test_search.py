"""The search space: validation, define-by-run sampling, and resolving trial configs."""

import math

import optuna
import pytest
import yaml

from study.config import ConfigError
from study.search import DefineByRun, make_scheduler, make_searcher, trial_config
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
        config = trial_config({**base, **params})
        assert config.loss.name == params["loss.name"]
        assert config.optimizer.learning_rate == params["optimizer.learning_rate"]
        if "loss.label_smoothing" not in params:
            assert config.loss.label_smoothing == 0.0  # The base value stands.


def test_searcher_queues_the_baseline_first_and_stores_its_study(tmp_path):
    study = load_study(DEFAULT)
    searcher = make_searcher(study.search, tmp_path, "baseline-test")
    searcher.set_search_properties("val_accuracy", "max", study.trial.to_dict())
    first = searcher.suggest("t1")
    assert {k: first[k] for k in study.search.baseline} == study.search.baseline
    second = searcher.suggest("t2")
    assert second != first
    assert (tmp_path / "optuna.db").exists()
    stored = optuna.load_study(
        study_name="baseline-test", storage=f"sqlite:///{tmp_path}/optuna.db"
    )
    assert stored.direction == optuna.study.StudyDirection.MAXIMIZE
    searcher.on_trial_complete("t1", {"val_accuracy": 0.5, "epoch": 3})
    searcher.on_trial_complete("t2", {"val_accuracy": 0.0, "epoch": 1, "diverged": "nan"})
    states = [t.state.name for t in stored.get_trials()]
    assert states == ["COMPLETE", "FAIL"]


def test_scheduler_runs_on_epochs():
    search = load_study(DEFAULT, ["search.grace_period=3", "search.reduction_factor=2"]).search
    asha = make_scheduler(search, max_epochs=20)
    assert (asha._time_attr, asha._max_t) == ("epoch", 20)
    fifo = make_scheduler(load_study(DEFAULT, ["search.scheduler=fifo"]).search, 20)
    assert type(fifo).__name__ == "FIFOScheduler"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("search.num_samples=0", "search.num_samples"),
        ("search.metric=val_loss", "search.metric: unknown metric 'val_loss'"),
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
    assert resources(study, StudyOptions("x", gpus=4)) == ({"cpu": 1.0, "gpu": 1.0}, 4)
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
    # The base loss is hinge, but label smoothing is only sampled with CE or focal.
    study = load_study(DEFAULT, ["loss.name=hinge"])
    assert study.trial.loss.name == "hinge"

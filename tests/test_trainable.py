"""One trial end to end: local mode files, resume, divergence, and learning on real images."""

import csv
import json
import math

import numpy as np
import pytest

from study import calibration
from study import data as data_lib
from study.config import load_config
from study.local import run_local
from study.losses import LOSSES
from study.trainable import (
    CheckpointCadence,
    compile_model,
    restore_checkpoint,
    save_checkpoint,
    train_and_evaluate,
)

from .conftest import run_cli, shared_sample

TINY = [
    "data.dataset=cifar10",
    "model.width=0.125",
    "data.validation_size=50",
    "training.batch_size=32",
    # The narrow network learns fast and safely at 1e-3; the default, 3e-4, suits the full
    # width (configs/default.yaml).
    "optimizer.learning_rate=1e-3",
]


class RecordingSink:
    def __init__(self):
        self.reports = []

    def report(self, metrics, checkpoint):
        self.reports.append((metrics, checkpoint))


@pytest.fixture(scope="module")
def cifar10(cifar10_tarball):
    return data_lib.load_cifar("cifar10", cifar10_tarball)


def test_local_run_writes_its_folder_and_learns(tmp_path, cifar10):
    config = load_config(None, [*TINY, "training.epochs=3"])
    lines = []
    run_local(config, cifar10, tmp_path / "run", echo=lines.append)
    run_dir = tmp_path / "run"
    assert load_config(run_dir / "config.yaml") == config
    with open(run_dir / "epochs.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    for key in (
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
        "images_per_second",
        "epoch_seconds",
    ):
        assert all(np.isfinite(float(row[key])) for row in rows), key
    # The default cosine schedule over 3 epochs, read at each epoch's end.
    rates = [float(row["learning_rate"]) for row in rows]
    peak = config.optimizer.learning_rate
    expected = [peak * 0.5 * (1 + math.cos(math.pi * epoch / 3)) for epoch in (1, 2, 3)]
    np.testing.assert_allclose(rates, expected, rtol=1e-4, atol=1e-9)
    # Images per second count the 350 training images (400 less 50 for validation), timed
    # over training alone, which is part of the epoch.
    for row in rows:
        assert float(row["images_per_second"]) * float(row["epoch_seconds"]) >= 350
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_run"] == 3
    assert result["best_val_accuracy"] == max(float(row["val_accuracy"]) for row in rows)
    assert result["test"]["test_accuracy"] > 0.5  # 10 learnable classes; chance is 0.1
    assert len(lines) == 3 and lines[0].startswith("epoch   1/3")
    import keras

    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 10)


def test_checkpoint_restores_weights_and_optimizer_state(tmp_path, cifar10):
    config = load_config(None, [*TINY, "training.epochs=4", "optimizer.name=sgd"])
    model = compile_model(config, steps_per_epoch=7, jit_compile=False)
    x = cifar10.x_train[:64]
    y = np.eye(10)[cifar10.y_train[:64]]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    save_checkpoint(model, 1, tmp_path / "checkpoint")
    restored = compile_model(config, steps_per_epoch=7, jit_compile=False)
    assert restore_checkpoint(restored, tmp_path / "checkpoint") == 1
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 2
    for a, b in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every optimizer slot, each in its place (and the momenta really moved).
    pairs = list(zip(model.optimizer.variables, restored.optimizer.variables, strict=True))
    for saved, loaded in pairs:
        assert saved.path.split("/", 1)[1] == loaded.path.split("/", 1)[1]
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
    assert any(np.abs(np.asarray(v)).sum() > 0 for v, _ in pairs if "momentum" in v.path)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_new_trial_traces_its_training_step_once(cifar10, optimizer):
    """The optimizer's variables exist before the first step: TensorFlow traces a step
    that creates variables twice, which cost every trial's start about 0.8 s of CPU."""
    config = load_config(None, [*TINY, "training.epochs=1", f"optimizer.name={optimizer}"])
    model = compile_model(config, steps_per_epoch=2, jit_compile=False)
    traced = []
    step = model.train_step
    model.train_step = lambda data: traced.append(1) or step(data)
    model.fit(cifar10.x_train[:64], np.eye(10)[cifar10.y_train[:64]], batch_size=32, verbose=0)
    assert len(traced) == 1


def test_resume_continues_at_the_right_epoch(cifar10):
    config = load_config(None, [*TINY, "training.epochs=4", "training.checkpoint_every=2"])
    first = RecordingSink()
    train_and_evaluate(config, cifar10, first)
    epochs = [metrics["epoch"] for metrics, _ in first.reports]
    assert epochs == [1, 2, 3, 4]
    assert [checkpoint is not None for _, checkpoint in first.reports] == [False, True, False, True]
    checkpoint = first.reports[1][1]
    resumed = RecordingSink()
    outcome = train_and_evaluate(config, cifar10, resumed, checkpoint)
    assert [metrics["epoch"] for metrics, _ in resumed.reports] == [3, 4]
    # The schedule resumes with the optimizer's step count: same learning rate as before.
    assert resumed.reports[0][0]["learning_rate"] == pytest.approx(
        first.reports[2][0]["learning_rate"], rel=1e-6
    )
    assert outcome.status == "completed" and "test_accuracy" in resumed.reports[-1][0]


def test_checkpoint_cadence_by_time_or_by_epochs():
    times = [25, 50, 75, 100, 125, 150, 175, 190, 200, 210]  # Each epoch's end, in seconds.

    def saved(*overrides):
        training = load_config(None, ["training.epochs=10", *overrides]).training
        now = [0.0]  # The fake clock; the trial starts at 0.
        cadence, epochs = CheckpointCadence(training, clock=lambda: now[0]), []
        for epoch, seconds in enumerate(times, start=1):
            now[0] = seconds
            if cadence.due(epoch):
                epochs.append(epoch)
                cadence.start()
        return epochs

    # At the first epoch end 60 s after the start or the last checkpoint, and at the end.
    assert saved() == [3, 6, 10]
    assert saved("training.checkpoint_seconds=20") == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert saved("training.checkpoint_seconds=1000") == [10]
    assert saved("training.checkpoint_every=3") == [3, 6, 9, 10]
    assert saved("training.checkpoint_every=1") == list(range(1, 11))


@pytest.mark.parametrize(
    ("seconds", "expected"), [(1e-3, [True] * 3), (3600, [False, False, True])]
)
def test_checkpoints_by_time_in_a_trial(cifar10, seconds, expected):
    config = load_config(
        None, [*TINY, "training.epochs=3", f"training.checkpoint_seconds={seconds}"]
    )
    assert config.training.checkpoint_every == "auto"
    sink = RecordingSink()
    train_and_evaluate(config, cifar10, sink, evaluate_test=False)
    assert [checkpoint is not None for _, checkpoint in sink.reports] == expected


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_unreadable_checkpoint_warns_and_restarts_from_scratch(tmp_path, cifar10, damage, capfd):
    config = load_config(None, [*TINY, "training.epochs=2", "training.checkpoint_every=1"])
    first = RecordingSink()
    train_and_evaluate(config, cifar10, first)
    checkpoint = first.reports[0][1]
    model_file = checkpoint / "model.keras"
    if damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:1000])
    else:
        model_file.unlink()
        (checkpoint / "state.json").unlink()
    again = RecordingSink()
    outcome = train_and_evaluate(config, cifar10, again, checkpoint)
    assert outcome.status == "completed"
    reports = [metrics for metrics, _ in again.reports]
    assert [metrics["epoch"] for metrics in reports] == [1, 2]  # From scratch, once.
    assert "restarted from scratch" in reports[0]["warning"] and "warning" not in reports[1]
    assert "warning: checkpoint" in capfd.readouterr().err


def test_divergence_ends_the_trial_with_a_status(cifar10):
    config = load_config(
        None,
        [
            *TINY,
            "training.epochs=5",
            "optimizer.name=sgd",
            "optimizer.learning_rate=10",
            "optimizer.schedule=constant",
            "loss.name=mean_squared_error",
        ],
    )
    sink = RecordingSink()
    outcome = train_and_evaluate(config, cifar10, sink)
    assert outcome.status == "diverged"
    assert outcome.message.startswith("non-finite loss in epoch 1")
    assert sink.reports == [] and outcome.test == {}


def test_steps_per_execution_changes_no_result(cifar10):
    """Several steps per call into TensorFlow is a speed setting: same seed, same metrics,
    and a divergence is still caught in its epoch."""
    runs = {}
    for steps in (1, 4):
        config = load_config(
            None, [*TINY, "training.epochs=2", f"training.steps_per_execution={steps}"]
        )
        sink = RecordingSink()
        train_and_evaluate(config, cifar10, sink, evaluate_test=False)
        runs[steps] = [metrics for metrics, _ in sink.reports]
    for one, four in zip(runs[1], runs[4], strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert four[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    diverging = load_config(
        None,
        [
            *TINY,
            "training.steps_per_execution=4",
            "optimizer.name=sgd",
            "optimizer.learning_rate=10",
            "optimizer.schedule=constant",
            "loss.name=mean_squared_error",
        ],
    )
    outcome = train_and_evaluate(diverging, cifar10, RecordingSink())
    assert outcome.status == "diverged"
    assert outcome.message.startswith("non-finite loss in epoch 1")


def _study_run(*args):
    return run_cli("study.run", "--local", *args)


def test_command_line_smoke_run(tmp_path, cifar100_tarball):
    result = _study_run(
        "--config",
        "configs/smoke.yaml",
        "--data-dir",
        str(cifar100_tarball),
        "--set",
        "data.train_subset=400",
        "--set",
        "data.test_subset=150",
        "--storage-path",
        str(tmp_path),
        "--name",
        "smoke",
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "smoke"
    assert f"run folder: {run_dir}" in result.stdout
    assert "epoch   2/2" in result.stdout
    names = {p.name for p in run_dir.iterdir()}
    events = {name for name in names if name.startswith("events.out.tfevents.")}  # TensorBoard
    assert len(events) == 1
    assert names - events == {"config.yaml", "epochs.csv", "result.json", "model.keras"}


def test_command_line_divergence_exits_3(tmp_path, cifar10_tarball):
    result = _study_run(
        "--data-dir",
        str(cifar10_tarball),
        *(arg for o in TINY for arg in ("--set", o)),
        "--set",
        "optimizer.name=sgd",
        "--set",
        "optimizer.learning_rate=10",
        "--set",
        "optimizer.schedule=constant",
        "--set",
        "loss.name=mean_squared_error",
        "--set",
        "training.epochs=2",
        "--storage-path",
        str(tmp_path),
        "--name",
        "boom",
    )
    assert result.returncode == 3
    assert "diverged: non-finite loss in epoch 1" in result.stderr
    assert json.loads((tmp_path / "boom" / "result.json").read_text())["status"] == "diverged"


def test_bad_sizes_fail_before_the_run_folder_exists(tmp_path, cifar100_tarball):
    result = _study_run(
        "--config",
        "configs/smoke.yaml",
        "--data-dir",
        str(cifar100_tarball),
        "--set",
        "data.train_subset=5000",
        "--storage-path",
        str(tmp_path),
        "--name",
        "big",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: data.train_subset: 5000 is more than the 500")
    assert not (tmp_path / "big").exists()


@pytest.mark.slow
def test_learns_real_cifar10_images(tmp_path):
    """Trained as a new user would, on real photographs: far above the 10% of chance."""
    path = shared_sample("cifar-10-sample.tar.gz")
    config = load_config(
        None,
        [
            "data.dataset=cifar10",
            f"data.data_dir={path}",
            "model.width=0.125",
            "training.epochs=6",
            "training.batch_size=64",
            # The narrow network's own rate: the default, 3e-4, is the full width's.
            "optimizer.learning_rate=1e-3",
        ],
    )
    data = data_lib.load_cifar("cifar10", path)
    summary = run_local(config, data, tmp_path / "real", echo=print)
    assert summary["status"] == "completed" and summary["epochs_run"] == 6
    assert summary["test"]["test_accuracy"] > 0.35  # 0.46 when written; chance is 0.1.


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_well_above_chance(name, cifar10):
    """Each loss, with its own head and targets, learns the 10 synthetic classes (chance
    is 0.1) in a few epochs: a loss wired to the wrong head or targets would not."""
    config = load_config(None, [*TINY, "data.validation_size=100", "training.epochs=4",
                                f"loss.name={name}"])  # fmt: skip
    sink = RecordingSink()
    outcome = train_and_evaluate(config, cifar10, sink, evaluate_test=False)
    assert outcome.status == "completed"
    assert max(metrics["val_accuracy"] for metrics, _ in sink.reports) >= 0.5


def test_an_unreadable_checkpoint_falls_back_to_an_older_one(tmp_path, cifar10, capfd):
    """Given the trial's checkpoints newest first, the first that loads is used: the epochs
    after it run again; only when none loads does the trial start from scratch."""
    config = load_config(None, [*TINY, "training.epochs=4", "training.checkpoint_every=1"])
    first = RecordingSink()
    train_and_evaluate(config, cifar10, first)
    second, third = first.reports[1][1], first.reports[2][1]  # After epochs 2 and 3.
    (third / "model.keras").write_bytes((third / "model.keras").read_bytes()[:1000])
    again = RecordingSink()
    outcome = train_and_evaluate(config, cifar10, again, [third, second])
    assert outcome.status == "completed"
    reports = [metrics for metrics, _ in again.reports]
    assert [metrics["epoch"] for metrics in reports] == [3, 4]  # From epoch 2's checkpoint.
    assert reports[0]["warning"].startswith(f"checkpoint {third} unreadable (")
    assert reports[0]["warning"].endswith("; continued from epoch 2")
    assert "warning: checkpoint" in capfd.readouterr().err


def test_a_checkpoint_of_the_last_epoch_reports_it_and_trains_nothing(cifar10, capfd):
    """A trial whose driver died after its last epoch, restored: it reports that epoch
    again, marked replayed (the study records it once), and does not train again."""
    config = load_config(None, [*TINY, "training.epochs=2"])
    first = RecordingSink()
    train_and_evaluate(config, cifar10, first, evaluate_test=False)
    last_metrics, last = first.reports[-1]
    again = RecordingSink()
    outcome = train_and_evaluate(config, cifar10, again, last, evaluate_test=True)
    assert outcome.status == "completed"
    assert "checkpoint holds the last epoch (2): nothing to train" in capfd.readouterr().out
    [(replayed, checkpoint)] = again.reports
    assert checkpoint is None and replayed.pop("replayed") is True
    assert replayed.pop("test_accuracy") > 0.5 and "test_loss" in replayed  # Asked for.
    replayed.pop("test_loss")
    for key in (*calibration.RUN_FIGURES, calibration.RELIABILITY):  # With the test metrics.
        replayed.pop(key)
    assert replayed == last_metrics  # The epoch as it was reported, not a new one.


@pytest.mark.slow
def test_hinge_on_linear_scores_trains_far_above_hinge_on_softmax():
    """The notebook's 8.97% for hinge, reproduced on real images: the same hinge loss on
    softmax outputs learns far less than on the raw class scores it is meant for (see
    test_losses.py for why). CIFAR-10 sample, RMSprop, 6 epochs of a narrow model."""
    path = shared_sample("cifar-10-sample.tar.gz")
    data = data_lib.load_cifar("cifar10", path)
    best = {}
    for head in ("auto", "softmax"):  # auto: hinge's own linear head.
        config = load_config(
            None,
            [
                "data.dataset=cifar10", "data.validation_size=500", "model.width=0.125",
                "training.epochs=6", "training.batch_size=64", "loss.name=hinge",
                f"loss.head={head}", "optimizer.name=rmsprop", "optimizer.learning_rate=1e-3",
            ],
        )  # fmt: skip
        sink = RecordingSink()
        train_and_evaluate(config, data, sink, evaluate_test=False)
        best[head] = max(metrics["val_accuracy"] for metrics, _ in sink.reports)
    assert best["auto"] >= best["softmax"] + 0.08, best
    assert best["auto"] > 0.3, best  # Three times chance.


def _real_sample_args(*overrides: str) -> list[str]:
    """A narrow model on the real CIFAR-10 sample (3,500 training and 500 validation
    images), batch 32: 109 steps an epoch, so that the dead-trial rule (200 steps) judges
    at the end of epoch 2."""
    values = [
        "data.dataset=cifar10", "data.train_subset=null", "data.test_subset=null",
        "data.validation_size=500", "model.width=0.125", "training.batch_size=32",
        "optimizer.schedule=constant", *overrides,
    ]  # fmt: skip
    return [arg for value in values for arg in ("--set", value)]


@pytest.mark.slow
def test_a_blown_up_network_is_named_dead_and_stopped(tmp_path):
    """Adam at 0.05: the first epoch's loss is in the thousands and the network predicts
    one class from then on, with a finite loss. It is named dead after epoch 2 (both
    accuracies at chance for two epochs, 218 steps), stopped there rather than run to its
    10 epochs, and the command exits 3 as for a diverged trial."""
    path = shared_sample("cifar-10-sample.tar.gz")
    result = _study_run(
        "--config", "configs/smoke.yaml", "--data-dir", path,
        *_real_sample_args("training.epochs=10", "optimizer.learning_rate=0.05"),
        "--storage-path", tmp_path, "--name", "blown",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    assert "dead: learned nothing: training accuracy" in result.stderr
    summary = json.loads((tmp_path / "blown" / "result.json").read_text())
    assert summary["status"] == "dead" and summary["epochs_run"] == 2
    assert summary["message"].endswith("in epochs 1-2, after 218 steps")
    assert summary["test"] == {}  # A dead network is not tested.
    with open(tmp_path / "blown" / "epochs.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["dead"] for row in rows] == ["", summary["message"]]
    assert all(math.isfinite(float(row["loss"])) for row in rows)  # Not a divergence.
    assert "dead: wrote config.yaml, epochs.csv, result.json to" in result.stdout  # No model.


@pytest.mark.slow
def test_a_slow_starter_that_learns_is_not_called_dead(tmp_path):
    """Adam at 1e-5 (the bottom of the default space): its training accuracy is still at
    chance after two epochs, but its validation accuracy has left the band; it runs on."""
    path = shared_sample("cifar-10-sample.tar.gz")
    result = _study_run(
        "--config", "configs/smoke.yaml", "--data-dir", path,
        *_real_sample_args("training.epochs=3", "optimizer.learning_rate=1e-5"),
        "--storage-path", tmp_path, "--name", "slow",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "slow" / "epochs.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 and "dead" not in rows[0]
    band = 0.1 + 3 * math.sqrt(0.1 * 0.9 / 3488)  # Training images trained each epoch.
    assert float(rows[1]["accuracy"]) <= band  # As slow as a dead one in training ...
    assert max(float(row["val_accuracy"]) for row in rows) > 0.14  # ... but learning.


@pytest.mark.slow
def test_the_rescaled_square_loss_learns_real_images(tmp_path):
    """Hui & Belkin's square loss as configured for CIFAR-10 (their 10-class setting, k and
    M 1, summed over classes) on the real sample: validation accuracy at least twice
    chance after a few epochs of a narrow network."""
    path = shared_sample("cifar-10-sample.tar.gz")
    config = load_config(
        None,
        [
            "data.dataset=cifar10", "data.validation_size=500", "model.width=0.125",
            "training.epochs=4", "training.batch_size=64", "loss.name=rescaled_square",
            "loss.square_k=1", "loss.square_m=1", "optimizer.learning_rate=1e-3",
        ],
    )  # fmt: skip
    sink = RecordingSink()
    outcome = train_and_evaluate(
        config, data_lib.load_cifar("cifar10", path), sink, evaluate_test=False
    )
    assert outcome.status == "completed"
    assert max(metrics["val_accuracy"] for metrics, _ in sink.reports) >= 0.2

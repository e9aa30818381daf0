"""The trainable under Ray Tune: per-epoch reports, checkpoints, and resuming after a crash."""

import json
import sys
from pathlib import Path

import pytest

from study import data as data_lib
from study.config import METRIC, MODE, load_config
from study.trainable import tune_trainable

ray = pytest.importorskip("ray")
from ray import cloudpickle, tune  # noqa: E402

# Ray workers cannot import this test module; ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def crash_once_after_first_report(config, data, marker):
    """Runs the real trainable, but the first attempt dies right after epoch 1's report."""
    from study import trainable

    original = trainable.TuneSink.report

    def report_then_crash(self, metrics, checkpoint):
        original(self, metrics, checkpoint)
        if not Path(marker).exists():
            Path(marker).touch()
            raise RuntimeError("injected crash after epoch 1")

    trainable.TuneSink.report = report_then_crash
    try:
        trainable.tune_trainable(config, data)
    finally:
        trainable.TuneSink.report = original


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# Both cadences: every epoch, and by time with a tiny interval (a checkpoint at each
# epoch end too, through the time-based path).
@pytest.mark.parametrize(
    "cadence",
    [
        ["training.checkpoint_every=1"],
        ["training.checkpoint_every=auto", "training.checkpoint_seconds=0.001"],
    ],
    ids=["every-epoch", "auto"],
)
def test_tune_trial_reports_every_epoch_and_resumes_from_its_checkpoint(
    tmp_path, local_ray, cifar10_tarball, cadence
):
    config = load_config(
        None,
        [
            "data.dataset=cifar10",
            "model.width=0.125",
            "data.validation_size=50",
            "training.epochs=3",
            "training.batch_size=32",
            *cadence,
        ],
    )
    data = data_lib.load_cifar("cifar10", cifar10_tarball)
    marker = tmp_path / "crashed"
    tuner = tune.Tuner(
        tune.with_parameters(crash_once_after_first_report, data=data, marker=str(marker)),
        param_space=config.to_dict(),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=1),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "ray"),
            name="resume",
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )
    result = tuner.fit()[0]
    assert marker.exists(), "the injected crash did not happen"
    assert result.error is None
    history = result.metrics_dataframe
    # After the crash the trial resumed at epoch 2, not at epoch 1. (Whether Ray's own
    # progress file kept the epoch-1 row reported just before the crash varies.)
    epochs = history["epoch"].tolist()
    assert epochs in ([1, 2, 3], [2, 3]), epochs
    # The last reported accuracy is the final checkpoint's, recomputed here on the split.
    import keras

    splits = data_lib.split(data, config.data, seed=config.data.split_seed)
    with result.checkpoint.as_directory() as directory:
        model = keras.models.load_model(Path(directory) / "model.keras", compile=False)
    predicted = model.predict(splits.x_val, verbose=0).argmax(axis=1)
    assert result.metrics[METRIC] == pytest.approx((predicted == splits.y_val).mean(), abs=1e-6)
    assert {
        "loss",
        "accuracy",
        "val_loss",
        "learning_rate",
        "images_per_second",
        "epoch_seconds",
    } <= set(history.columns)
    # A search's trial never looks at the test set; only the confirmation phase does.
    assert "test_accuracy" not in result.metrics
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / "state.json").read_text())
        assert state["epoch"] == state["metrics"]["epoch"] == 3  # Its last epoch's report.
        assert state["metrics"][METRIC] == result.metrics[METRIC]
        assert (Path(directory) / "model.keras").stat().st_size > 0


def test_tune_trainable_refuses_a_bad_config():
    with pytest.raises(ValueError, match="model.width"):
        tune_trainable({"model": {"width": -1}}, data=None)


def test_a_restore_order_starts_from_the_newest_checkpoint_the_study_recorded(tmp_path):
    """Tune's saved state can hold a trial's last result without its checkpoint, and name
    none (seen under load, after Ctrl-C and after a kill): the trial then goes on from the
    newest checkpoint in its folder whose epoch the study recorded, not from scratch."""
    from study.trainable import read_state
    from study.tuning import restore_order

    folder = tmp_path / "trial_a"
    for index in range(3):  # Epochs 1, 2, 3; the study recorded 2 (3 was being written).
        (folder / f"checkpoint_{index:06d}").mkdir(parents=True)
        (folder / f"checkpoint_{index:06d}" / "state.json").write_text(f'{{"epoch": {index + 1}}}')

    def names(order):
        return [Path(checkpoint.path).name for checkpoint in order]

    assert names(restore_order(None, 2, read_state, str(folder))) == [
        "checkpoint_000001", "checkpoint_000000",
    ]  # fmt: skip
    assert restore_order(None, None, read_state, str(folder)) == []  # A trial never recorded.
    assert restore_order(None, 2, read_state, str(tmp_path / "trial_b")) == []  # No folder.
    # Named: a newer recorded checkpoint first, then the named one and the older ones.
    named = tune.Checkpoint(str(folder / "checkpoint_000000"))
    assert names(restore_order(named, 2, read_state, str(folder))) == [
        "checkpoint_000001", "checkpoint_000000",
    ]  # fmt: skip
    named = tune.Checkpoint(str(folder / "checkpoint_000001"))
    assert names(restore_order(named, None, read_state)) == [
        "checkpoint_000001", "checkpoint_000000",
    ]  # fmt: skip

"""One trial: config -> data -> model -> compile -> `model.fit`, reporting every epoch.

`train_and_evaluate` is the library function; where each epoch's metrics and checkpoints
go is up to a `sink`: `LocalSink` (study/local.py) writes a run folder, `TuneSink` hands
them to Ray Tune. `tune_trainable` is the function Ray Tune runs.
"""

import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import keras

from study import backend, calibration, health
from study import data as data_lib
from study.config import (
    COMPILE_SECONDS,
    METRIC,
    STARTUP_SECONDS,
    TrainingConfig,
    TrialConfig,
    from_params,
)
from study.files import MODEL_FILE
from study.losses import build_loss, target_table
from study.model import build_model
from study.optimizers import build_optimizer
from study.pipeline import Batches

STATE_FILE = "state.json"


@dataclass
class Outcome:
    """How a trial ended; `history` holds every reported epoch's metrics."""

    status: str  # "completed", "diverged" or "dead"
    history: list[dict] = field(default_factory=list)
    test: dict = field(default_factory=dict)
    message: str = ""


def configure_devices(config: TrialConfig) -> dict:
    """GPU memory as needed (trials may share a GPU); mixed precision, compilation and
    several steps per execution on GPUs unless the config says otherwise."""
    devices = backend.configure()
    chosen = config.training.resolve(gpu=devices.gpus > 0, backend=devices.backend)
    policy = backend.mixed_policy(devices.capability) if chosen["mixed_precision"] else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return {"backend": devices.backend, "gpus": devices.gpus, "policy": policy, **chosen}


def compile_model(
    config: TrialConfig, steps_per_epoch: int, jit_compile: bool, steps_per_execution: int = 1
) -> keras.Model:
    model = build_model(config)
    model.compile(
        optimizer=build_optimizer(config.optimizer, steps_per_epoch, config.training.epochs),
        loss=build_loss(config.loss),
        # Weighted: evaluation's padding images weigh 0 (study.pipeline.Batches).
        weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    # Built now, not inside the first training step: TensorFlow traces a step that creates
    # variables twice (about 0.8 s of CPU per trial at any width).
    model.optimizer.build(model.trainable_variables)
    return model


def compile_for_devices(config: TrialConfig, steps_per_epoch: int, devices: dict) -> keras.Model:
    """`compile_model` with what `configure_devices` chose."""
    return compile_model(
        config, steps_per_epoch, devices["jit_compile"], devices["steps_per_execution"]
    )


# Marks a report of an epoch that a restored trial had already reported before its driver
# died: the study records it once (study/records.py).
REPLAYED = "replayed"


def save_checkpoint(model: keras.Model, epoch: int, directory: Path, metrics=None) -> Path:
    """model.keras (weights and optimizer state) and state.json: the epochs done and the
    last epoch's metrics, which a trial restored after its last epoch reports again."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    state = {"epoch": epoch, "metrics": metrics or {}}
    (directory / STATE_FILE).write_text(json.dumps(state))
    return directory


def read_state(directory: Path) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def restore_checkpoint(model: keras.Model, directory: Path) -> int:
    """Loads weights and optimizer state into a compiled model; returns the epochs done."""
    if not model.optimizer.built:  # compile_model built it; a model compiled elsewhere may not
        model.optimizer.build(model.trainable_variables)
    model.load_weights(directory / MODEL_FILE)
    return read_state(directory)["epoch"]


class CheckpointCadence:
    """Which epoch ends save a checkpoint: every `checkpoint_every` epochs, or under
    "auto" the first epoch end at least `checkpoint_seconds` after the start or the last
    checkpoint; the last epoch always."""

    def __init__(self, training: TrainingConfig, clock=time.monotonic):
        self.every, self.seconds = training.checkpoint_every, training.checkpoint_seconds
        self.epochs, self.clock = training.epochs, clock
        self.start()

    def start(self) -> None:
        self.last = self.clock()

    def due(self, epochs_done: int) -> bool:
        if epochs_done == self.epochs:
            return True
        if self.every == "auto":
            return self.clock() - self.last >= self.seconds
        return epochs_done % self.every == 0


def process_started() -> float | None:
    """When this process started (time.time()'s clock), if psutil can tell."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # Not installed, or no such record on this system: not timed.
        return None


class EpochReporter(keras.callbacks.Callback):
    """Times each epoch, stops at a non-finite loss or a dead network (study/health.py),
    checkpoints and hands metrics on. The first report carries the trial's start-up (this
    process's start to its first training step), the second its compilation (the first
    epoch's time beyond the second's: the programs compiled, or read from the cache)."""

    # Keras then runs the per-step hook on a helper thread, so that reading the loss never
    # makes the training loop wait for the device; it waits for the hooks at epoch end.
    async_safe = True

    def __init__(self, sink, setup: "TrialSetup", warning: str | None = None):
        super().__init__()
        self.warning = warning  # Goes out with the next report, into trials.csv.
        self.sink = sink
        self.setup = setup
        self.config = setup.config
        self.train_images = setup.train.images_per_pass
        self.history: list[dict] = []
        self.diverged_at: tuple[int, int] | None = None
        self.dead: str | None = None
        self.final: tuple[dict, Path | None] | None = None
        self.cadence = CheckpointCadence(self.config.training)
        self.startup_seconds: float | None = None

    def on_train_begin(self, logs=None):
        self.cadence.start()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.started = time.perf_counter()
        self.train_seconds = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.startup_seconds is None:
            began = process_started()
            self.startup_seconds = time.time() - began if began else math.nan
        if self.diverged_at is not None:
            # Stopped here, on the training loop's own thread, not from the per-step hook:
            # on JAX, `self.model` syncs the model's state, and from the hook's thread that
            # raced the next step, which had taken its buffers ("Array has been deleted").
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            # JAX dispatches steps ahead of the device: wait for the last one to finish.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self.train_seconds = time.perf_counter() - self.started

    def on_train_batch_end(self, batch, logs=None):
        # On a helper thread (async_safe): it reads the logs and never touches the model.
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.diverged_at is None:
            self.diverged_at = (self.epoch + 1, batch + 1)

    def _timings(self, elapsed: float) -> dict:
        """Start-up with the first epoch run here, compilation with the second."""
        if not self.history:
            return {STARTUP_SECONDS: self.startup_seconds}
        if len(self.history) == 1:
            return {COMPILE_SECONDS: max(self.history[0]["epoch_seconds"] - elapsed, 0.0)}
        return {}

    def _check_health(self, metrics: dict) -> None:
        steps = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.dead = health.dead_message(
            [*self.history, metrics],
            self.config.data.num_classes,
            self.train_images,
            self.setup.validation.images_per_pass,
            steps,
            self.config.training.dead_patience,
        )
        if self.dead:
            metrics[health.DEAD] = self.dead
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged_at is not None:
            return  # A diverged epoch is not a result; the trial ends with that status.
        done = epoch + 1
        elapsed = time.perf_counter() - self.started
        train_seconds = self.train_seconds or elapsed
        metrics = {
            "epoch": done,
            **{key: float(logs[key]) for key in ("loss", "accuracy", "val_loss", "val_accuracy")},
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "images_per_second": self.train_images / train_seconds,
            "epoch_seconds": elapsed,
            **self._timings(elapsed),
        }
        if self.warning:
            metrics["warning"], self.warning = self.warning, None
        self._check_health(metrics)
        self.history.append(metrics)
        last = done == self.config.training.epochs and not self.dead
        checkpoint = None
        if self.cadence.due(done) and not self.dead:
            directory = Path(tempfile.mkdtemp()) / "checkpoint"
            checkpoint = save_checkpoint(self.model, done, directory, metrics)
            self.cadence.start()
        if last:
            self.final = (metrics, checkpoint)  # Reported with the test metrics, after fit.
        else:
            self.sink.report(metrics, checkpoint)


def trial_batches(config: TrialConfig, splits: data_lib.Splits) -> tuple[Batches, Batches, Batches]:
    """The trial's training, validation and test batches: training shuffled by the trial's
    seed and the epoch, evaluation in order."""
    targets = target_table(config.loss, config.data.num_classes)
    train = Batches(
        splits.x_train, splits.y_train, config.training.batch_size, targets, seed=config.seed
    )

    def evaluation(images, labels):
        return Batches(images, labels, config.training.eval_batch_size, targets)

    return train, evaluation(splits.x_val, splits.y_val), evaluation(splits.x_test, splits.y_test)


@dataclass
class TrialSetup:
    """What a trial trains on: the devices as configured, its batches, and its model."""

    config: TrialConfig
    devices: dict  # What `configure_devices` chose.
    train: Batches
    validation: Batches
    test: Batches

    def compile(self) -> keras.Model:
        """A fresh model, compiled for the devices, its schedule as long as the training."""
        return compile_for_devices(self.config, len(self.train), self.devices)


def prepare_trial(config: TrialConfig, data: data_lib.CifarData) -> TrialSetup:
    """What a trial does before it builds its model: a fresh Keras session seeded by the
    config, the devices configured, the data split (by the config's split seed) and
    batched. The benchmark (study/bench/) times a bare `model.fit` from the same setup."""
    keras.backend.clear_session()  # A reused Ray worker starts each trial afresh.
    keras.utils.set_random_seed(config.seed)
    devices = configure_devices(config)
    splits = data_lib.split(data, config.data, seed=config.data.split_seed)
    train, validation, test = trial_batches(config, splits)
    return TrialSetup(config, devices, train, validation, test)


def _restore_first(config: TrialConfig, build, checkpoints):
    """The model from the first of `checkpoints` that loads, its epoch and the checkpoint;
    a fresh model, epoch 0 and None if none does. Also what could not be read, and why."""
    model, failed = build(), []
    for checkpoint in checkpoints:
        try:
            return model, restore_checkpoint(model, checkpoint), checkpoint, failed
        except Exception as error:  # Truncated, corrupt or missing: any of them, go on.
            text = str(error).splitlines()[0] if str(error) else ""
            failed.append(
                f"checkpoint {checkpoint} unreadable ({type(error).__name__}: {text})"[:300]
            )
            # A half-loaded model is neither the checkpoint nor a fresh start: rebuild it.
            keras.backend.clear_session()
            keras.utils.set_random_seed(config.seed)
            model = build()
    return model, 0, None, failed


def _scores(model: keras.Model, batches: Batches):
    """The model's class scores for each image of evaluation `batches`, in order (the
    padding left out)."""
    import numpy as np

    scores = model.predict(backend.fit_input(batches)[0], verbose=0)
    return np.asarray(scores, dtype="float64")[: len(batches.labels)]


def _evaluate(model: keras.Model, setup: TrialSetup) -> dict:
    """Test loss and accuracy, and the calibration of the scores' softmax on the test set
    (study/calibration.py), with a temperature fitted on the validation split where there
    is one (a config that validates on the test set has none to fit it on)."""
    logs = model.evaluate(backend.fit_input(setup.test)[0], verbose=0, return_dict=True)
    test = {"test_loss": float(logs["loss"]), "test_accuracy": float(logs["accuracy"])}
    split = setup.config.data.validation == "split"
    validation = (_scores(model, setup.validation), setup.validation.labels) if split else ()
    figures = calibration.run_figures(_scores(model, setup.test), setup.test.labels, *validation)
    return test | figures


def train_and_evaluate(
    config: TrialConfig,
    data: data_lib.CifarData,
    sink,
    checkpoint: Path | Iterable[Path] | None = None,
    evaluate_test: bool = True,
    warning: str | None = None,
    reporter_class: Callable[..., EpochReporter] = EpochReporter,
) -> Outcome:
    """Trains one configuration, reporting each epoch to `sink`; resumes from `checkpoint`
    (or from the first of several that loads, newest first: a trial's older checkpoints
    stand in for one that is unreadable), else from scratch, with a warning either way.

    With `evaluate_test`, the finished model is evaluated once on the test set and the
    last report carries `test_loss` and `test_accuracy`. A search's trials leave the test
    set alone: only the confirmation phase (study/confirm.py) measures it. `warning` goes
    out with the first report (into trials.csv).

    `reporter_class` makes the callback that reports each epoch, called as `EpochReporter`
    is: the benchmark (study/bench/) passes a subclass that also times its own work.
    """
    setup = prepare_trial(config, data)
    checkpoints = [checkpoint] if isinstance(checkpoint, Path) else checkpoint or []
    model, initial_epoch, restored, failed = _restore_first(config, setup.compile, checkpoints)
    if failed:
        where = (
            f"continued from epoch {initial_epoch}" if initial_epoch else "restarted from scratch"
        )
        failed = "; ".join(failed) + f"; {where}"
        warning = f"{warning}; {failed}" if warning else failed
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if initial_epoch >= config.training.epochs:
        # Its driver died after the trial's last epoch: report that epoch again (the study
        # records it once), train nothing.
        print(f"checkpoint holds the last epoch ({initial_epoch}): nothing to train")
        final = read_state(restored).get("metrics")
        test = _evaluate(model, setup) if evaluate_test else {}
        if final:
            sink.report({**final, **test, REPLAYED: True}, None)
        return Outcome("completed", [final] if final else [], test=test)
    reporter = reporter_class(sink, setup, warning)
    train_input, callbacks = backend.fit_input(setup.train)
    model.fit(
        train_input,
        validation_data=backend.fit_input(setup.validation)[0],
        epochs=config.training.epochs,
        initial_epoch=initial_epoch,
        callbacks=[*callbacks, reporter],
        shuffle=False,  # The batches shuffle, by seed and epoch.
        verbose=0,
    )
    if reporter.diverged_at is not None:
        epoch, step = reporter.diverged_at
        message = f"non-finite loss in epoch {epoch}, step {step}"
        return Outcome("diverged", reporter.history, message=message)
    if reporter.dead:  # Its last epoch went out with the verdict; no test for it.
        return Outcome(health.DEAD, reporter.history, message=reporter.dead)
    test_metrics = _evaluate(model, setup) if evaluate_test else {}
    if reporter.final is not None:
        metrics, final_checkpoint = reporter.final
        metrics.update(test_metrics)
        sink.report(metrics, final_checkpoint)
    return Outcome("completed", reporter.history, test=test_metrics)


class TuneSink:
    """Reports to Ray Tune; Ray copies each checkpoint into the trial's storage."""

    def __init__(self, placement: dict | None = None):
        self.placement = placement or {}  # Where the trial runs, for trials.csv.

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        from ray import tune

        tune_checkpoint = tune.Checkpoint.from_directory(checkpoint) if checkpoint else None
        try:
            tune.report({**metrics, **self.placement}, checkpoint=tune_checkpoint)
        finally:
            if checkpoint:
                shutil.rmtree(checkpoint.parent, ignore_errors=True)


def _placement() -> dict:
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids()),
        "keras_backend": keras.backend.backend(),
    }


def tune_trainable(
    params: dict,
    data: data_lib.CifarData,
    base: dict | None = None,
    evaluate_test=False,
    recorded: int | None = None,
    reporter_class: Callable[..., EpochReporter] = EpochReporter,
    folder: str | None = None,
) -> None:
    """The function Ray Tune runs: build the trial's config, resume if asked, train.

    `params` is Tune's config for the trial (dotted keys, see study/search.py), laid over
    the study's `base` config. A diverged trial reports once more with `diverged` set, so
    the study records it and the searcher marks it failed, and ends without an error (a
    retry would diverge again). `reporter_class` as in `train_and_evaluate`; `recorded` and
    `folder` as in `run_tune_trial`.
    """
    run_tune_trial(from_params(params, base), data, evaluate_test, recorded, reporter_class, folder)


def run_tune_trial(
    config: TrialConfig,
    data: data_lib.CifarData,
    evaluate_test: bool,
    recorded=None,
    reporter_class: Callable[..., EpochReporter] = EpochReporter,
    folder: str | None = None,
) -> None:
    """One Tune trial; `recorded` is the last epoch the study had recorded for it when it
    resumed, `folder` the trial's folder in the study's storage (see
    `study.tuning.restore_order`); `reporter_class` as in `train_and_evaluate`."""
    from ray import tune

    from study.tuning import RESTORE_NOTES, restore_order

    sink = TuneSink(_placement())
    # Set by the trainable's restore where Tune's named checkpoint was gone from storage.
    note = RESTORE_NOTES.pop(tune.get_context().get_trial_id(), None)
    with contextlib.ExitStack() as stack:
        # Downloaded one at a time, only as far as they are needed.
        local = (
            Path(stack.enter_context(checkpoint.as_directory()))
            for checkpoint in restore_order(tune.get_checkpoint(), recorded, read_state, folder)
        )
        outcome = train_and_evaluate(
            config, data, sink, local, evaluate_test, warning=note, reporter_class=reporter_class
        )
    if outcome.status == "diverged":
        epoch = (outcome.history[-1]["epoch"] if outcome.history else 0) + 1
        sink.report({"epoch": epoch, METRIC: 0.0, "diverged": outcome.message}, None)

"""One trial: config -> data -> model -> compile -> `model.fit`, reporting every epoch.

`train_and_evaluate` is the library function; where each epoch's metrics and checkpoints
go is up to a `sink`: `LocalSink` (study/local.py) writes a run folder, `TuneSink` hands
them to Ray Tune. `tune_trainable` is the function Ray Tune runs.
"""

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras

from study import backend
from study import data as data_lib
from study.config import METRIC, TrainingConfig, TrialConfig
from study.losses import build_loss, target_table
from study.model import build_model
from study.optimizers import build_optimizer
from study.pipeline import Batches

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"


@dataclass
class Outcome:
    """How a trial ended; `history` holds every reported epoch's metrics."""

    status: str  # "completed" or "diverged"
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
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def compile_for_devices(config: TrialConfig, steps_per_epoch: int, devices: dict) -> keras.Model:
    """`compile_model` with what `configure_devices` chose."""
    return compile_model(
        config, steps_per_epoch, devices["jit_compile"], devices["steps_per_execution"]
    )


def save_checkpoint(model: keras.Model, epoch: int, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    return directory


def restore_checkpoint(model: keras.Model, directory: Path) -> int:
    """Loads weights and optimizer state into a compiled model; returns the epochs done."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(directory / MODEL_FILE)
    return json.loads((directory / STATE_FILE).read_text())["epoch"]


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


class EpochReporter(keras.callbacks.Callback):
    """Times each epoch, stops at a non-finite loss, checkpoints and hands metrics on."""

    # Keras then runs the per-step hook on a helper thread, so that reading the loss never
    # makes the training loop wait for the device; it waits for the hooks at epoch end.
    async_safe = True

    def __init__(self, sink, config: TrialConfig, train_images: int, warning: str | None = None):
        super().__init__()
        self.warning = warning  # Goes out with the next report, into trials.csv.
        self.sink = sink
        self.config = config
        self.train_images = train_images
        self.history: list[dict] = []
        self.diverged_at: tuple[int, int] | None = None
        self.final: tuple[dict, Path | None] | None = None
        self.cadence = CheckpointCadence(config.training)

    def on_train_begin(self, logs=None):
        self.cadence.start()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.started = time.perf_counter()
        self.train_seconds = None

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            # JAX dispatches steps ahead of the device: wait for the last one to finish.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self.train_seconds = time.perf_counter() - self.started

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.diverged_at is None:
            self.diverged_at = (self.epoch + 1, batch + 1)
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
        }
        if self.warning:
            metrics["warning"], self.warning = self.warning, None
        self.history.append(metrics)
        last = done == self.config.training.epochs
        checkpoint = None
        if self.cadence.due(done):
            checkpoint = save_checkpoint(self.model, done, Path(tempfile.mkdtemp()) / "checkpoint")
            self.cadence.start()
        if last:
            self.final = (metrics, checkpoint)  # Reported with the test metrics, after fit.
        else:
            self.sink.report(metrics, checkpoint)


def _datasets(config: TrialConfig, splits: data_lib.Splits):
    """Training batches shuffled by the trial's seed and the epoch; evaluation in order."""
    targets = target_table(config.loss, config.data.num_classes)
    train = Batches(
        splits.x_train, splits.y_train, config.training.batch_size, targets, seed=config.seed
    )

    def evaluation(images, labels):
        return Batches(images, labels, config.training.eval_batch_size, targets)

    return train, evaluation(splits.x_val, splits.y_val), evaluation(splits.x_test, splits.y_test)


def train_and_evaluate(
    config: TrialConfig,
    data: data_lib.CifarData,
    sink,
    checkpoint: Path | None = None,
    evaluate_test: bool = True,
) -> Outcome:
    """Trains one configuration, reporting each epoch to `sink`; resumes from `checkpoint`.

    With `evaluate_test`, the finished model is evaluated once on the test set and the
    last report carries `test_loss` and `test_accuracy`. A search's trials leave the test
    set alone: only the confirmation phase (study/confirm.py) measures it.
    """
    keras.backend.clear_session()  # A reused Ray worker starts each trial afresh.
    keras.utils.set_random_seed(config.seed)
    devices = configure_devices(config)
    splits = data_lib.split(data, config.data, seed=config.data.split_seed)
    train, validation, test = _datasets(config, splits)
    steps_per_epoch = len(train)
    model = compile_for_devices(config, steps_per_epoch, devices)
    initial_epoch, warning = 0, None
    if checkpoint:
        try:
            initial_epoch = restore_checkpoint(model, checkpoint)
        except Exception as error:  # Truncated, corrupt or missing: any of them, start over.
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warning = f"checkpoint {checkpoint} unreadable ({reason[:200]}); restarted from scratch"
            print(f"warning: {warning}", file=sys.stderr)
            # A half-loaded model is neither the checkpoint nor a fresh start: rebuild it.
            keras.backend.clear_session()
            keras.utils.set_random_seed(config.seed)
            model = compile_for_devices(config, steps_per_epoch, devices)
    reporter = EpochReporter(sink, config, len(splits.y_train), warning)
    train_input, callbacks = backend.fit_input(train)
    model.fit(
        train_input,
        validation_data=backend.fit_input(validation)[0],
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
    test_metrics = {}
    if evaluate_test:
        test_loss, test_accuracy = model.evaluate(backend.fit_input(test)[0], verbose=0)
        test_metrics = {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy)}
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


def tune_trainable(params: dict, data: data_lib.CifarData, evaluate_test: bool = False) -> None:
    """The function Ray Tune runs: build the trial's config, resume if asked, train.

    `params` is the base config with the sampled dotted keys (see study/search.py).
    A diverged trial reports once more with `diverged` set, so the study records it and
    the searcher marks it failed, and ends without an error (a retry would diverge again).
    """
    from study.search import trial_config

    run_tune_trial(trial_config(params), data, evaluate_test)


def run_tune_trial(config: TrialConfig, data: data_lib.CifarData, evaluate_test: bool) -> None:
    from ray import tune

    sink = TuneSink(_placement())
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        outcome = train_and_evaluate(config, data, sink, evaluate_test=evaluate_test)
    else:
        with checkpoint.as_directory() as directory:
            outcome = train_and_evaluate(config, data, sink, Path(directory), evaluate_test)
    if outcome.status == "diverged":
        epoch = (outcome.history[-1]["epoch"] if outcome.history else 0) + 1
        sink.report({"epoch": epoch, METRIC: 0.0, "diverged": outcome.message}, None)

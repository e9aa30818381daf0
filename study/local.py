"""Local single-trial mode: one trial in this process, no Ray, results in a run folder.

The folder holds `config.yaml` (the resolved config), `epochs.csv` (one row per epoch),
`result.json` (how it ended, best and final metrics, test metrics), `model.keras`, and
TensorBoard's event files (each epoch's metrics, the config as hyper-parameters); with
--logger, the run is also an MLflow or W&B run (study/trackers.py).
"""

import os
import shutil
import time
from pathlib import Path

from study import files
from study.config import METRIC, TIMINGS, TrialConfig, dump_yaml, flatten
from study.data import CifarData
from study.files import CONFIG_FILE, EPOCHS_FILE, MODEL_FILE, RESULT_FILE
from study.trackers import LocalTrackers, Trackers
from study.trainable import EpochReporter, Outcome, train_and_evaluate


class LocalSink:
    """Writes each epoch to epochs.csv and to the run's trackers, keeps the latest model,
    prints a progress line."""

    def __init__(self, run_dir: Path, epochs: int, echo=print, trackers=None):
        self.run_dir = run_dir
        self.epochs = epochs
        self.rows: list[dict] = []
        self.echo = echo
        self.trackers = trackers

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        self.rows.append(metrics)
        files.write_csv(self.run_dir / EPOCHS_FILE, self.rows)
        if checkpoint:
            os.replace(checkpoint / MODEL_FILE, self.run_dir / MODEL_FILE)
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
        if self.trackers:
            self.trackers.epoch(metrics)
        self.echo(progress_line(metrics, self.epochs))


def progress_line(metrics: dict, epochs: int) -> str:
    line = (
        f"epoch {metrics['epoch']:>3}/{epochs}  loss {metrics['loss']:.4f}  "
        f"accuracy {metrics['accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
        f"val_accuracy {metrics['val_accuracy']:.4f}  lr {metrics['learning_rate']:.2e}  "
        f"{metrics['images_per_second']:,.0f} img/s  {metrics['epoch_seconds']:.1f} s"
    )
    if "test_accuracy" in metrics:
        line += f"  test_accuracy {metrics['test_accuracy']:.4f}"
    return line


def summarise(outcome: Outcome, seconds: float) -> dict:
    """What result.json holds: how the trial ended and its best, final and test metrics."""
    best = max(outcome.history, key=lambda row: row[METRIC], default=None)
    return {
        "status": outcome.status,
        "message": outcome.message,
        "epochs_run": len(outcome.history),
        "best_epoch": best["epoch"] if best else None,
        f"best_{METRIC}": best[METRIC] if best else None,
        "best": best,
        "final": outcome.history[-1] if outcome.history else None,
        "test": outcome.test,
        "seconds": seconds,
        # Start-up (process start to first step) and compilation (the first epoch's time
        # beyond the second's), as the first two epochs reported them.
        **{key: row[key] for row in outcome.history for key in TIMINGS if key in row},
    }


def run_local(
    config: TrialConfig,
    data: CifarData,
    run_dir: Path,
    echo=print,
    trackers: Trackers = None,
    reporter_class=EpochReporter,
) -> dict:
    """Trains one trial into `run_dir` (which must not exist yet), logging it to TensorBoard
    and `trackers` (study.trackers.check_trackers); returns result.json. `reporter_class` as
    in `study.trainable.train_and_evaluate`."""
    run_dir.mkdir(parents=True)
    files.write_text(run_dir / CONFIG_FILE, dump_yaml(config))
    tracked = LocalTrackers(
        trackers or Trackers(folder=run_dir), run_dir.name, flatten(config.to_dict())
    )
    sink = LocalSink(run_dir, config.training.epochs, echo, tracked)
    started = time.perf_counter()
    try:
        outcome = train_and_evaluate(config, data, sink, reporter_class=reporter_class)
    except BaseException:
        tracked.close("error")
        raise
    summary = summarise(outcome, time.perf_counter() - started)
    files.write_json(run_dir / RESULT_FILE, summary)
    tracked.close(outcome.status)
    return summary

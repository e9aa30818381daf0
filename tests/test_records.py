"""The study's tables as the driver's recorder writes them (study/records.py), fed Tune's
callback calls by hand: how each way of ending lands in trials.csv and epochs.csv."""

from types import SimpleNamespace

import pandas as pd

from study.callbacks import Endings
from study.records import StudyRecorder


def _trial(trial_id: str):
    values = {"loss.name": "categorical_crossentropy", "optimizer.learning_rate": 3e-3}
    return SimpleNamespace(trial_id=trial_id, config=values, error_file=None)


def _epoch(epoch: int, accuracy: float, **more) -> dict:
    return {"epoch": epoch, "loss": 14.49, "accuracy": accuracy, "val_loss": 14.49,
            "val_accuracy": accuracy, **more}  # fmt: skip


def test_a_dead_trial_keeps_its_epochs_and_ends_dead_with_its_message(tmp_path):
    recorder = StudyRecorder(tmp_path, max_epochs=30)
    trial = _trial("dead1")
    recorder.on_trial_start(0, [], trial)
    recorder.on_trial_result(0, [], trial, _epoch(1, 0.01, startup_seconds=12.5))
    message = "learned nothing: training accuracy 0.0100 and validation accuracy 0.0100"
    recorder.on_trial_result(0, [], trial, _epoch(2, 0.01, compile_seconds=8.0, dead=message))
    recorder.on_trial_complete(0, [], trial)
    trials = pd.read_csv(tmp_path / "trials.csv")
    row = trials.iloc[0]
    assert (row.status, row.message, row.epochs_run) == ("dead", message, 2)
    assert (row.startup_seconds, row.compile_seconds) == (12.5, 8.0)
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert epochs.epoch.tolist() == [1, 2]  # Its epochs are results: they stay.
    endings = Endings()
    for result in (_epoch(1, 0.01), _epoch(2, 0.01, dead=message)):
        endings.saw(trial, result)
    assert endings.status(trial, False, {"training.epochs": 30}) == "dead"

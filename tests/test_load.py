"""Load: a study of 200 trials of a tiny model on 2 CPUs completes, with the driver's
memory bounded and every reported epoch in epochs.csv exactly once.

About 15 minutes on 2 cores (each trial starts its own worker process with TensorFlow),
so it is marked `load` and left out of the default run: `pytest -m load`. The driver's
peak RSS is printed; the README quotes it.
"""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from .conftest import REPO, read_trials, study_args, write_study_config

pytestmark = pytest.mark.load

TRIALS = 200
PEAK_RSS_LIMIT_MIB = 1500

# The driver, run as `python -m study.run` would, then its own peak RSS (not Ray's).
DRIVER = (
    "import json, resource, sys\n"
    "from study.run import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "print(json.dumps({'peak_rss_mib': peak}))\n"
    "sys.exit(code)\n"
)


def test_two_hundred_trials(tmp_path, cifar10_tarball, ray_env):
    config = write_study_config(tmp_path / "load.yaml", num_samples=TRIALS, grace_period=1)
    args = [
        *study_args(config, cifar10_tarball, tmp_path, "load"),
        "--no-dashboard",
        "--set", "model.width=0.03125", "--set", "data.train_subset=100",
        "--set", "training.epochs=2",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        env=ray_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    print(f"\ndriver peak RSS: {peak:.0f} MiB for {TRIALS} trials")
    assert peak < PEAK_RSS_LIMIT_MIB

    folder = tmp_path / "load"
    trials = read_trials(folder)
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(trials) == TRIALS and trials.trial_id.is_unique
    assert set(trials.status) <= {"completed", "early_stopped"}
    assert (
        len(epochs) == trials.epochs_run.sum()
        and not epochs.duplicated(["trial_id", "epoch"]).any()
    )
    # Exactly the epochs each trial reported to Ray (its own progress.csv), no more, no less.
    for trial in trials.itertuples():
        progress = pd.read_csv(folder / f"trial_{trial.trial_id}" / "progress.csv")
        ours = epochs[epochs.trial_id == trial.trial_id].epoch.tolist()
        assert ours == progress.epoch.tolist() == list(range(1, trial.epochs_run + 1))
    assert os.path.getsize(folder / "trials.csv") > 0

"""Shared fixtures: small CIFAR tarballs in the official format, and the real samples."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from study import synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(module: str, *args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Runs `python -m MODULE ARGS` from the repository root, as a user would."""
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def study_args(config, data, storage, name) -> list[str]:
    """The arguments that point a study at its config, data and results folder."""
    return [
        "--config", str(config), "--data-dir", str(data),
        "--storage-path", str(storage), "--name", name,
    ]  # fmt: skip


def shared_sample(name: str) -> Path:
    """A real CIFAR sample from ../shared/data; skips where a clone has no ../shared."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(
            f"{path} is absent: the real CIFAR samples live in ../shared/data beside the repo"
        )
    return path


@pytest.fixture(scope="session")
def cifar100_tarball(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar100")
    return synthetic.write_cifar(folder / "cifar-100-python.tar.gz", "cifar100", 5, 2)


@pytest.fixture(scope="session")
def cifar10_tarball(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar10")
    return synthetic.write_cifar(folder / "cifar-10-python.tar.gz", "cifar10", 40, 10)


# 4 epochs of a tiny model on 200 images; ASHA may stop trials after epoch 1 or 2.
TINY_STUDY = {
    "data": {"dataset": "cifar10", "train_subset": 200, "test_subset": 50, "validation_size": 50},
    "model": {"width": 0.0625},
    "training": {"epochs": 4, "batch_size": 50, "eval_batch_size": 100},
    "search": {
        "num_samples": 6,
        "grace_period": 1,
        "reduction_factor": 2,
        "space": {
            "loss.name": {
                "choice": ["categorical_crossentropy", "hinge", "mean_squared_logarithmic_error"]
            },
            "optimizer.name": {"choice": ["adam", "sgd"]},
            "optimizer.learning_rate": {
                "loguniform": [1e-4, 3e-3],
                "by": "optimizer.name",
                "ranges": {"sgd": [1e-3, 0.1]},
            },
        },
        "baseline": {
            "loss.name": "categorical_crossentropy",
            "optimizer.name": "adam",
            "optimizer.learning_rate": 1e-3,
        },
    },
}


def write_study_config(path: Path, **search) -> Path:
    """TINY_STUDY as a config file, with `search` keys replaced."""
    config = {**TINY_STUDY, "search": {**TINY_STUDY["search"], **search}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # Space order matters.
    return path


@contextlib.contextmanager
def isolated_ray():
    """An environment whose Ray processes live under their own RAY_TMPDIR; on exit every
    process that inherited it is killed, and no other Ray on the machine is touched."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Short: Ray's socket paths are limited.
    try:
        yield {**os.environ, "RAY_TMPDIR": temp}
    finally:
        marker = f"RAY_TMPDIR={temp}\0".encode()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_env():
    with isolated_ray() as env:
        yield env

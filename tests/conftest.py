"""Shared fixtures: small CIFAR tarballs in the official format, and the real samples."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from study import synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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

"""Writes CIFAR tarballs in the official python-version format, for tests and benchmarks.

The files match the real downloads byte for byte in structure: gzip tarballs of Python 2
protocol-2 pickles whose arrays go through `numpy.core.multiarray._reconstruct`. The
images are learnable: each class has a blocky colour template, blurred by noise.
"""

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from study.data import DATASETS


class _Python2Pickler(pickle._Pickler):
    """Pickles `bytes` as Python 2 `str` (BINSTRING), as the official files do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def pickle_python2(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # NumPy 2 names its module numpy._core; the official files (NumPy 1) say numpy.core.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_tarball(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def make_images(labels: np.ndarray, num_classes: int, seed: int, noise=0.5) -> np.ndarray:
    """uint8 images (N, 32, 32, 3): a per-class 4x4 colour template, upscaled, plus noise."""
    templates = np.random.default_rng(1234).uniform(0, 255, (num_classes, 4, 4, 3))
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)
    pixels = np.random.default_rng(seed).uniform(0, 255, (len(labels), 32, 32, 3))
    return ((1 - noise) * templates[labels] + noise * pixels).astype(np.uint8)


def _batch(images: np.ndarray, labels: dict[str, np.ndarray], name: str) -> dict:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # Channel planes per row.
    batch = {b"batch_label": name.encode(), b"data": rows}
    batch |= {key.encode(): [int(v) for v in values] for key, values in labels.items()}
    batch[b"filenames"] = [f"image_{i:05d}.png".encode() for i in range(len(images))]
    return batch


def write_cifar(
    path: Path, dataset="cifar100", train_per_class=5, test_per_class=2, seed=0, noise=0.5
) -> Path:
    """Writes a small (or, for benchmarks, full-size) CIFAR tarball at `path`."""
    source = DATASETS[dataset]
    fine = source.num_classes["fine"]
    rng = np.random.default_rng(seed)

    def labelled(per_class, offset):
        fine_labels = rng.permutation(np.repeat(np.arange(fine), per_class))
        images = make_images(fine_labels, fine, seed + offset, noise)
        if dataset == "cifar10":
            return images, {"labels": fine_labels}
        return images, {"fine_labels": fine_labels, "coarse_labels": fine_labels % 20}

    members = {}
    train_images, train_labels = labelled(train_per_class, 1)
    parts = np.array_split(np.arange(len(train_images)), len(source.train_members))
    for name, part in zip(source.train_members, parts, strict=True):
        labels = {key: values[part] for key, values in train_labels.items()}
        members[name] = _batch(train_images[part], labels, name)
    test_images, test_labels = labelled(test_per_class, 2)
    members[source.test_member] = _batch(test_images, test_labels, "testing batch")
    if dataset == "cifar10":
        members[source.meta_member] = {
            b"label_names": [f"class_{i}".encode() for i in range(fine)],
            b"num_cases_per_batch": len(parts[0]),
            b"num_vis": 3072,
        }
    else:
        members[source.meta_member] = {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(fine)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        }
    blobs = {f"{source.folder}/{name}": pickle_python2(obj) for name, obj in members.items()}
    return write_tarball(Path(path), blobs)

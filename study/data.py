"""CIFAR-10/100 from the official python-version tarballs: safe reading and splits.

The driver calls `load_cifar` once; trials get the arrays through Ray's object store and
call `split`, then batch them with study/pipeline.py. Images stay uint8 all the way to
the model, which scales them on the device (study/model.py).
"""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def one_line(text: str) -> str:
    """Escapes what would break a message over lines: file names and keys come from users."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


class DataError(ValueError):
    """A data file that cannot be used; the message is one line naming the file."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


@dataclass(frozen=True)
class Source:
    """Where one official CIFAR tarball comes from and what it holds."""

    url: str
    sha256: str
    folder: str  # the top folder inside the tarball
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_keys: dict[str, str]  # label_mode -> key in each batch
    name_keys: dict[str, str]  # label_mode -> key in meta
    num_classes: dict[str, int]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


DATASETS = {
    "cifar100": Source(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        folder="cifar-100-python",
        train_members=("train",),
        test_member="test",
        meta_member="meta",
        label_keys={"fine": "fine_labels", "coarse": "coarse_labels"},
        name_keys={"fine": "fine_label_names", "coarse": "coarse_label_names"},
        num_classes={"fine": 100, "coarse": 20},
    ),
    "cifar10": Source(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        meta_member="batches.meta",
        label_keys={"fine": "labels", "coarse": "labels"},
        name_keys={"fine": "label_names", "coarse": "label_names"},
        num_classes={"fine": 10, "coarse": 10},
    ),
}


@dataclass(frozen=True)
class CifarData:
    """A whole data set as loaded from disk: uint8 images (N, 32, 32, 3), int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    """What one trial trains, validates and finally tests on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


# --- Reading the files -----------------------------------------------------------------

# The only globals that the official files use: numpy's array reconstruction. Both module
# names resolve to the same function; NumPy 2 writes the second one.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed numpy constructors."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global except the numpy array constructors, so a file cannot run code."""

    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise RefusedGlobal(f"refused global {module}.{name}")
        return allowed


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        batch = _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except RefusedGlobal as error:
        raise DataError(f"{where}: not a CIFAR batch, refused to unpickle ({error})") from None
    except Exception as error:  # A damaged pickle can fail in many ways; none are usable.
        raise DataError(f"{where}: corrupt pickle ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a dict, found {type(batch).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: v for key, v in batch.items()}


def _read_members(path: Path, source: Source) -> dict[str, bytes]:
    """Reads the needed members from a tarball or an extracted folder, by member name."""
    names = (*source.train_members, source.test_member, source.meta_member)
    if path.is_dir():
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)} of the {source.folder} set")
        try:
            return {name: (path / name).read_bytes() for name in names}
        except OSError as error:
            raise DataError(f"{error.filename}: cannot read ({error.strerror})") from None
    blobs = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for name in names:
                try:
                    info = archive.getmember(f"{source.folder}/{name}")
                except KeyError:
                    raise DataError(
                        f"{path}: no member {source.folder}/{name}; is it the official "
                        f"{source.filename}?"
                    ) from None
                # Links could point anywhere; the official files hold regular files only.
                if not info.isfile():
                    raise DataError(f"{path}: {info.name} is not a regular file")
                blobs[name] = archive.extractfile(info).read()
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: truncated or not a gzip tarball ({error})") from None
    except OSError as error:  # Unreadable: permissions, a device error.
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    return blobs


def _images(batch: dict, where: str) -> np.ndarray:
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: images have {data.shape[1]} values, expected 3072 (32x32x3)")
    # Rows hold the red, green and blue planes in turn; Keras wants channels last.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(batch: dict, key: str, count: int, num_classes: int, where: str) -> np.ndarray:
    if key not in batch:
        raise DataError(f"{where}: no '{key}' in the batch")
    labels = np.asarray(batch[key])
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: '{key}' must be {count} integers, one per image")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise DataError(f"{where}: labels must lie in [0, {num_classes}), found {outside[0]}")
    return labels.astype(np.int32)


def _decode(blobs: dict[str, bytes], source: Source, label_mode: str, where: Path):
    def batch(name):
        return _unpickle(blobs[name], f"{where}: {name}")

    def images_and_labels(name):
        contents = batch(name)
        images = _images(contents, f"{where}: {name}")
        labels = _labels(
            contents,
            source.label_keys[label_mode],
            len(images),
            source.num_classes[label_mode],
            f"{where}: {name}",
        )
        return images, labels

    train = [images_and_labels(name) for name in source.train_members]
    x_test, y_test = images_and_labels(source.test_member)
    names = batch(source.meta_member).get(source.name_keys[label_mode])
    if not isinstance(names, list) or len(names) != source.num_classes[label_mode]:
        raise DataError(f"{where}: meta must list {source.num_classes[label_mode]} class names")
    # Latin-1 decodes any bytes; the official names are ASCII.
    class_names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    return CifarData(
        x_train=np.concatenate([images for images, _ in train]),
        y_train=np.concatenate([labels for _, labels in train]),
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
    )


def _locate(data_dir: Path, source: Source) -> Path:
    """Finds the tarball or extracted folder from what the user pointed at."""
    if not data_dir.exists():
        raise DataError(f"--data-dir: {data_dir} does not exist")
    if data_dir.is_file():
        return data_dir
    if (data_dir / source.test_member).is_file():
        return data_dir  # The extracted folder itself.
    for candidate in (data_dir / source.folder, data_dir / source.filename):
        if candidate.exists():
            return candidate
    # Renamed tarballs, such as cifar-100-sample.tar.gz; CIFAR-10's prefix is a prefix of
    # CIFAR-100's, so filter those out for CIFAR-10.
    prefix = source.filename.removesuffix("python.tar.gz")
    tarballs = sorted(
        p
        for p in data_dir.glob(f"{prefix}*.tar.gz")
        if source.folder == "cifar-100-python" or not p.name.startswith("cifar-100")
    )
    if len(tarballs) == 1:
        return tarballs[0]
    if tarballs:
        names = ", ".join(p.name for p in tarballs)
        raise DataError(f"--data-dir: {data_dir} holds several tarballs ({names}); name one")
    raise DataError(
        f"--data-dir: {data_dir} holds neither {source.filename} nor its {source.folder} folder"
    )


def cache_dir() -> Path:
    """Where downloads are kept: Keras's own cache (`$KERAS_HOME/datasets`, by default
    `~/.keras/datasets`), so that a tarball Keras fetched before is found there."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "datasets"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, folder: Path) -> Path:
    """Downloads `url` into a hidden temporary file in `folder`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".download-")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(handle, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def _download(source: Source) -> Path:
    """Returns the cached official tarball, downloading it (and checking its hash) once.

    Standard library only: the driver, which calls this, never imports TensorFlow.
    """
    path = cache_dir() / source.filename
    if path.is_file() and _sha256(path) == source.sha256:
        return path
    print(f"downloading {source.url} to {path}", file=sys.stderr)
    try:
        temporary = _fetch(source.url, path.parent)
    except (OSError, ValueError) as error:  # URLError, timeouts and HTTP errors are OSErrors.
        reason = str(getattr(error, "reason", "") or error).splitlines()[0][:160]
        raise DataError(
            f"could not download {source.url} ({reason}); without network access pass "
            f"--data-dir PATH to {source.filename} or its extracted folder"
        ) from None
    got = _sha256(temporary)
    if got != source.sha256:
        temporary.unlink()
        raise DataError(
            f"{source.url}: the download's SHA-256 is {got}, not the official "
            f"{source.sha256}; nothing was kept (a proxy or a broken transfer?)"
        )
    os.replace(temporary, path)
    return path


def resolve_path(dataset: str, data_dir: str | Path | None) -> Path | None:
    """Checks a --data-dir cheaply (before any training work); None means the download
    cache."""
    return None if data_dir is None else _locate(Path(data_dir).expanduser(), DATASETS[dataset])


def load_cifar(dataset: str, data_dir: str | Path | None = None, label_mode="fine") -> CifarData:
    """Loads CIFAR-10 or CIFAR-100 from `data_dir`, or from the download cache (downloading
    the official tarball once)."""
    source = DATASETS[dataset]
    path = resolve_path(dataset, data_dir) or _download(source)
    return _decode(_read_members(path, source), source, label_mode, path)


# --- Splits ----------------------------------------------------------------------------


def _stratified_take(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `count` examples with class shares as in `labels` (largest remainder)."""
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / len(labels)
    take = np.floor(quota).astype(int)
    shortfall = count - take.sum()
    take[np.argsort(take - quota, kind="stable")[:shortfall]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == cls))[:n]
        for cls, n in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def _subset(x, y, count, rng, field):
    if count is None or count == len(y):
        return x, y
    if count > len(y):
        raise DataError(f"{field}: {count} is more than the {len(y)} images available")
    keep = _stratified_take(y, count, rng)
    return x[keep], y[keep]


def split(data: CifarData, config, seed: int) -> Splits:
    """Carves a seeded, stratified validation split (or uses the test set, if asked)."""
    rng = np.random.default_rng(seed)
    x_train, y_train = _subset(
        data.x_train, data.y_train, config.train_subset, rng, "data.train_subset"
    )
    x_test, y_test = _subset(data.x_test, data.y_test, config.test_subset, rng, "data.test_subset")
    if config.validation == "test":
        x_val, y_val = x_test, y_test
    else:
        size = config.validation_size
        count = round(size * len(y_train)) if isinstance(size, float) else size
        if not 1 <= count < len(y_train):
            raise DataError(
                f"data.validation_size: {size} gives {count} validation images, but it must "
                f"leave training images out of the {len(y_train)} available"
            )
        val = _stratified_take(y_train, count, rng)
        is_train = np.ones(len(y_train), dtype=bool)
        is_train[val] = False
        x_val, y_val = x_train[val], y_train[val]
        x_train, y_train = x_train[is_train], y_train[is_train]
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, data.class_names)


def check_batch_size(splits: Splits, batch_size: int) -> None:
    """Refuses a batch larger than the training split: a trial trains on whole batches."""
    if batch_size > len(splits.y_train):
        raise DataError(
            f"training.batch_size: {batch_size} is more than the {len(splits.y_train)} "
            "training images; a trial trains on whole batches"
        )

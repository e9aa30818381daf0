"""Reading the official files safely, and splitting."""

import hashlib
import io
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace

import numpy as np
import pytest

from study import data as data_lib
from study import synthetic
from study.config import DataConfig

from .conftest import REPO, free_port, http_server, shared_sample
from .hostile import member, replace_member


def _globals(blob: bytes) -> set:
    return {arg for op, arg, _ in pickletools.genops(blob) if "GLOBAL" in op.name}


def _trusted_decode(path, name, label_key):
    """An independent reading of one batch, as the CIFAR website describes it."""
    batch = pickle.loads(member(path, name), encoding="bytes")
    images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.array(batch[label_key])


# --- The real samples ------------------------------------------------------------------


def test_reads_real_cifar100_sample():
    path = shared_sample("cifar-100-sample.tar.gz")
    data = data_lib.load_cifar("cifar100", path)
    assert data.x_train.shape == (716, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (200, 32, 32, 3)
    images, labels = _trusted_decode(path, "cifar-100-python/train", b"fine_labels")
    np.testing.assert_array_equal(data.x_train, images)
    np.testing.assert_array_equal(data.y_train, labels)
    images, labels = _trusted_decode(path, "cifar-100-python/test", b"fine_labels")
    np.testing.assert_array_equal(data.x_test, images)
    np.testing.assert_array_equal(data.y_test, labels)
    assert len(data.class_names) == 100
    assert data.class_names[:3] == ("apple", "aquarium_fish", "baby")
    coarse = data_lib.load_cifar("cifar100", path, label_mode="coarse")
    assert len(coarse.class_names) == 20 and coarse.y_train.max() < 20
    np.testing.assert_array_equal(coarse.x_train, data.x_train)


def test_reads_real_cifar10_sample():
    path = shared_sample("cifar-10-sample.tar.gz")
    data = data_lib.load_cifar("cifar10", path)
    assert data.x_train.shape == (4000, 32, 32, 3) and data.x_test.shape == (500, 32, 32, 3)
    batches = [
        _trusted_decode(path, f"cifar-10-batches-py/data_batch_{i}", b"labels") for i in range(1, 6)
    ]
    np.testing.assert_array_equal(data.x_train, np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(data.y_train, np.concatenate([b[1] for b in batches]))
    assert data.class_names == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    # Real photographs: every class present, pixel statistics of natural images.
    assert set(np.unique(data.y_train)) == set(range(10))
    assert 80 < data.x_train.mean() < 160


def test_synthetic_files_use_the_real_files_globals():
    real = shared_sample("cifar-100-sample.tar.gz")
    fake = synthetic.pickle_python2({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})
    assert _globals(fake) == _globals(member(real, "cifar-100-python/train"))


# --- Where the files are ----------------------------------------------------------------


def test_reads_tarball_folder_and_extracted_folder(tmp_path, cifar100_tarball):
    from_tarball = data_lib.load_cifar("cifar100", cifar100_tarball)
    assert from_tarball.x_train.shape == (500, 32, 32, 3)
    assert from_tarball.class_names[7] == "fine_7"
    from_folder = data_lib.load_cifar("cifar100", cifar100_tarball.parent)
    with tarfile.open(cifar100_tarball) as archive:
        archive.extractall(tmp_path, filter="data")
    for folder in (tmp_path, tmp_path / "cifar-100-python"):
        extracted = data_lib.load_cifar("cifar100", folder)
        np.testing.assert_array_equal(extracted.x_train, from_tarball.x_train)
    np.testing.assert_array_equal(from_folder.y_test, from_tarball.y_test)


def test_ambiguous_folder_names_the_candidates(tmp_path):
    for name in ("cifar-10-a.tar.gz", "cifar-10-b.tar.gz"):
        synthetic.write_cifar(tmp_path / name, "cifar10", 2, 1)
    with pytest.raises(data_lib.DataError, match="several tarballs .*cifar-10-a.tar.gz"):
        data_lib.load_cifar("cifar10", tmp_path)


@pytest.fixture
def served(tmp_path, cifar100_tarball, monkeypatch):
    """The small CIFAR-100 tarball served on 127.0.0.1 as if it were the official one (its
    URL and hash put in the registry), and an empty Keras cache folder."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(cifar100_tarball, site / "cifar-100-python.tar.gz")
    digest = hashlib.sha256(cifar100_tarball.read_bytes()).hexdigest()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with http_server(site) as url:
        source = replace(
            data_lib.DATASETS["cifar100"], url=f"{url}/cifar-100-python.tar.gz", sha256=digest
        )
        monkeypatch.setitem(data_lib.DATASETS, "cifar100", source)
        yield source


def test_the_registry_holds_the_official_urls_and_hashes():
    cifar100, cifar10 = data_lib.DATASETS["cifar100"], data_lib.DATASETS["cifar10"]
    assert cifar100.url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert cifar100.sha256 == "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    assert cifar10.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar10.sha256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


def test_download_checks_the_hash_and_caches_where_keras_does(served, tmp_path, capsys):
    data = data_lib.load_cifar("cifar100")
    assert data.x_train.shape == (500, 32, 32, 3) and len(data.class_names) == 100
    cached = tmp_path / "keras" / "datasets" / "cifar-100-python.tar.gz"
    assert cached.read_bytes() == (tmp_path / "site" / "cifar-100-python.tar.gz").read_bytes()
    assert f"downloading {served.url}" in capsys.readouterr().err
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # No leftovers.
    # Once cached, no download: the site can go.
    (tmp_path / "site" / "cifar-100-python.tar.gz").unlink()
    assert data_lib.load_cifar("cifar100").x_train.shape == (500, 32, 32, 3)
    assert "downloading" not in capsys.readouterr().err


def test_a_download_with_the_wrong_hash_is_refused_and_not_kept(served, tmp_path, monkeypatch):
    monkeypatch.setitem(data_lib.DATASETS, "cifar100", replace(served, sha256="0" * 64))
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_cifar("cifar100")
    message = str(error.value)
    assert "SHA-256" in message and "0" * 64 in message and "\n" not in message
    folder = tmp_path / "keras" / "datasets"
    assert not folder.exists() or not any(folder.iterdir())


def test_download_failure_says_use_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    official = data_lib.DATASETS["cifar100"]
    nowhere = replace(official, url=f"http://127.0.0.1:{free_port()}/{official.filename}")
    monkeypatch.setitem(data_lib.DATASETS, "cifar100", nowhere)
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_cifar("cifar100")
    message = str(error.value)
    assert message.startswith(f"could not download {nowhere.url}")
    assert "cifar-100-python.tar.gz" in message and "--data-dir" in message
    assert "\n" not in message


def test_the_driver_downloads_without_tensorflow(served, tmp_path):
    """`python -m study.run` without --data-dir, up to the Tuner: the download goes through
    the standard library, and TensorFlow is never imported by the driver."""
    script = f"""
import sys
from dataclasses import replace
from study import data, tuning
data.DATASETS["cifar100"] = replace(data.DATASETS["cifar100"], url={served.url!r},
                                    sha256={served.sha256!r})
tuning.connect = tuning.check_cluster = lambda *args: None

def build_tuner(study, options, loaded):
    print("tuner for", len(loaded.y_train), "images;",
          "tensorflow imported" if "tensorflow" in sys.modules else "no tensorflow")
    raise SystemExit(0)

tuning.build_tuner = build_tuner
from study import run
sys.exit(run.main(["--config", "configs/smoke.yaml", "--storage-path", {str(tmp_path)!r},
                   "--name", "driver", "--set", "data.train_subset=400"]))
"""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tuner for 500 images; no tensorflow" in done.stdout
    assert (tmp_path / "keras" / "datasets" / "cifar-100-python.tar.gz").is_file()


# --- Hostile and damaged files ----------------------------------------------------------


def test_corrupt_pickle_member(tmp_path, cifar100_tarball):
    blob = member(cifar100_tarball, "cifar-100-python/test")
    path = replace_member(
        cifar100_tarball, tmp_path / "bad.tar.gz", "cifar-100-python/test", blob[: len(blob) // 3]
    )
    with pytest.raises(data_lib.DataError, match="test: corrupt pickle"):
        data_lib.load_cifar("cifar100", path)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]}, "expected 3072"),
        ({b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]}, "must be a uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, r"\[0, 100\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]}, "one per image"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'fine_labels'"),
    ],
)
def test_malformed_batches(tmp_path, cifar100_tarball, batch, expected):
    path = replace_member(
        cifar100_tarball,
        tmp_path / "bad.tar.gz",
        "cifar-100-python/train",
        synthetic.pickle_python2(batch),
    )
    with pytest.raises(data_lib.DataError, match=expected):
        data_lib.load_cifar("cifar100", path)


def test_tarball_with_wrong_members(tmp_path, cifar10_tarball):
    with pytest.raises(data_lib.DataError, match="no member cifar-100-python/train"):
        data_lib.load_cifar("cifar100", cifar10_tarball)


# --- Splits -----------------------------------------------------------------------------


def _data(per_class=20, classes=10):
    labels = np.repeat(np.arange(classes), per_class)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 32, 32, 3), np.uint8
    )
    return data_lib.CifarData(images, labels, images[:30], labels[:30], tuple("abcdefghij"))


def test_validation_split_is_stratified_disjoint_and_seeded():
    data = _data()
    splits = data_lib.split(data, DataConfig(validation_size=0.25), seed=3)
    assert len(splits.y_val) == 50 and len(splits.y_train) == 150
    np.testing.assert_array_equal(np.bincount(splits.y_val), np.full(10, 5))
    # Every image keeps its label (image i of _data() shows i, of class i // 20), and
    # each lands in exactly one of the two.
    for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val)):
        np.testing.assert_array_equal(x[:, 0, 0, 0] // 20, y)
    ids = np.concatenate([splits.x_train[:, 0, 0, 0], splits.x_val[:, 0, 0, 0]])
    assert sorted(ids) == list(range(200))
    again = data_lib.split(data, DataConfig(validation_size=0.25), seed=3)
    np.testing.assert_array_equal(again.x_val, splits.x_val)
    other = data_lib.split(data, DataConfig(validation_size=0.25), seed=4)
    assert not np.array_equal(other.x_val, splits.x_val)


def test_validation_by_count_and_by_test_set():
    data = _data()
    splits = data_lib.split(data, DataConfig(validation_size=37), seed=0)
    assert len(splits.y_val) == 37 and len(splits.y_train) == 163
    # 37 over 10 equal classes: 7 classes give 4 images, 3 give 3 (largest remainder).
    assert sorted(np.bincount(splits.y_val, minlength=10)) == [3] * 3 + [4] * 7
    on_test = data_lib.split(data, DataConfig(validation="test"), seed=0)
    assert on_test.x_val is data.x_test and len(on_test.y_train) == 200


def test_subsets_and_sizes_too_large():
    data = _data()
    splits = data_lib.split(data, DataConfig(train_subset=100, validation_size=20), seed=0)
    assert (len(splits.y_train), len(splits.y_val)) == (80, 20)
    kept = np.concatenate([splits.y_train, splits.y_val])
    np.testing.assert_array_equal(np.bincount(kept), np.full(10, 10))  # Stratified subset.
    with pytest.raises(data_lib.DataError, match="data.validation_size: 200 gives 200"):
        data_lib.split(data, DataConfig(validation_size=200), seed=0)
    with pytest.raises(data_lib.DataError, match="data.train_subset: 500 is more than the 200"):
        data_lib.split(data, DataConfig(train_subset=500), seed=0)


def test_restricted_unpickler_allows_only_numpy_arrays():
    allowed = io.BytesIO(synthetic.pickle_python2({b"x": np.arange(3, dtype=np.uint8)}))
    assert data_lib._RestrictedUnpickler(allowed, encoding="bytes").load()[b"x"].tolist() == [
        0,
        1,
        2,
    ]
    refused = pickle.dumps({"f": np.load}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        data_lib._RestrictedUnpickler(io.BytesIO(refused)).load()

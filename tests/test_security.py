"""Hostile files run no code: crafted pickles in data files, Python code in checkpoints.

Every payload here is live (plain `pickle.loads`, or Keras with safe mode off, runs it and
creates a marker file); the project's own readers refuse it with a clear error, and the
marker is never created.
"""

import json
import os
import pickle
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from study import data as data_lib
from study import synthetic

from .conftest import REPO
from .hostile import Reduces, replace_member, touch_code


def _batch(payload, where="data", protocol=None) -> bytes:
    """A CIFAR-100 batch with the payload at `where`; the official pickle format, or
    Python 3's with a given protocol (STACK_GLOBAL instead of GLOBAL)."""
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}
    batch[where.encode()] = payload
    if protocol is None:
        return synthetic.pickle_python2(batch)
    return pickle.dumps(batch, protocol=protocol)


def _raw(marker: Path, template: str) -> bytes:
    """A hand-written protocol-0 pickle (opcodes that no Python object pickles to)."""
    return template.replace("CODE", touch_code(marker)).replace("PATH", str(marker)).encode()


PAYLOADS = {
    "os-system": lambda m: _batch(Reduces(os.system, f"touch {m}")),
    "os-system-protocol-5": lambda m: _batch(Reduces(os.system, f"touch {m}"), protocol=5),
    "eval": lambda m: _batch(Reduces(eval, touch_code(m))),
    "exec": lambda m: _batch(Reduces(exec, touch_code(m))),
    "subprocess": lambda m: _batch(Reduces(subprocess.call, ["touch", str(m)])),
    "nested-in-labels": lambda m: _batch(
        [0, {"deep": [(Reduces(os.system, f"touch {m}"),)]}], where="fine_labels"
    ),
    "as-a-dict-key": lambda m: _batch({Reduces(os.system, f"touch {m}"): 1}, where="meta"),
    "numpy-object-array": lambda m: _batch(
        np.array([Reduces(os.system, f"touch {m}"), None], dtype=object)
    ),
    # A numpy function, but not an array constructor: the allow-list is exact names.
    "numpy-runstring": lambda m: _raw(m, "cnumpy.testing._private.utils\nrunstring\n(VCODE\n(dtR."),
    "getattr-import": lambda m: _raw(
        m, "cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch PATH\ntR."
    ),
    "inst-opcode": lambda m: _raw(m, "(Vtouch PATH\nios\nsystem\n."),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_is_live(name, tmp_path):
    """Plain pickle runs each payload: the refusals below are not vacuous."""
    marker = tmp_path / "armed"
    pickle.loads(PAYLOADS[name](marker), encoding="bytes")
    assert marker.exists()


@pytest.mark.parametrize("member", ["train", "test", "meta"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_crafted_pickle_is_refused_and_runs_nothing(name, member, tmp_path, cifar100_tarball):
    marker = tmp_path / "pwned"
    path = replace_member(
        cifar100_tarball,
        tmp_path / "cifar-100-python.tar.gz",
        f"cifar-100-python/{member}",
        PAYLOADS[name](marker),
    )
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_cifar("cifar100", path)
    message = str(error.value)
    assert message.startswith(f"{path}: {member}: ")
    assert "refused global" in message and "\n" not in message
    assert not marker.exists()


def test_crafted_pickle_in_an_extracted_folder(tmp_path, cifar100_tarball):
    with tarfile.open(cifar100_tarball) as archive:
        archive.extractall(tmp_path, filter="data")
    folder = tmp_path / "cifar-100-python"
    marker = tmp_path / "pwned"
    (folder / "test").write_bytes(PAYLOADS["os-system"](marker))
    with pytest.raises(data_lib.DataError, match=r"test: not a CIFAR batch, refused to unpickle"):
        data_lib.load_cifar("cifar100", folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"P0\n.", "corrupt pickle"),  # A persistent id: no persistent_load, no object.
        (b"\x80\x05\x95", "corrupt pickle"),
        (b"", "corrupt pickle"),
        (pickle.dumps("a string", protocol=2), "expected a dict, found str"),
    ],
)
def test_pickles_that_are_not_batches(blob, expected, tmp_path, cifar100_tarball):
    path = replace_member(cifar100_tarball, tmp_path / "odd.tar.gz", "cifar-100-python/test", blob)
    with pytest.raises(data_lib.DataError, match=f"odd.tar.gz: test: {expected}"):
        data_lib.load_cifar("cifar100", path)


# --- Checkpoints: Keras safe mode ---------------------------------------------------------


def _model_with_code(marker: Path):
    """A model whose Lambda layer, a Python lambda, creates `marker` whenever it runs."""
    import keras

    marker_path = str(marker)
    inputs = keras.Input((32, 32, 3))
    touched = keras.layers.Lambda(lambda x: (open(marker_path, "w").close(), x)[1])(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(touched))
    return keras.Model(inputs, outputs)


@pytest.fixture
def hostile_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A trial folder's checkpoint (model.keras, state.json) holding Python code."""
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint_000001"
    checkpoint.mkdir()
    _model_with_code(marker).save(checkpoint / "model.keras")
    (checkpoint / "state.json").write_text(json.dumps({"epoch": 1}))
    marker.unlink()  # Building the model ran the lambda once; loading must not.
    return checkpoint, marker


def test_the_lambda_checkpoint_is_live(hostile_checkpoint):
    import keras

    checkpoint, marker = hostile_checkpoint
    keras.models.load_model(checkpoint / "model.keras", safe_mode=False)
    assert marker.exists()


def test_analysis_refuses_a_checkpoint_with_code(hostile_checkpoint):
    from analysis import best_model

    checkpoint, marker = hostile_checkpoint
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="Lambda.*arbitrary code execution.*safe_mode"):
        best_model.predict(checkpoint / "model.keras", images)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Skipping")  # Keras lists what it could not match.
def test_resuming_a_trial_reads_weights_only(hostile_checkpoint):
    """A trial restores its checkpoint into the model its config builds: the file's
    architecture (and its code) is never deserialized, and one that does not fit fails."""
    from study.config import TrialConfig
    from study.trainable import compile_model, restore_checkpoint

    checkpoint, marker = hostile_checkpoint
    config = TrialConfig.model_validate(
        {"data": {"dataset": "cifar10"}, "model": {"width": 0.0625}}
    )
    model = compile_model(config, steps_per_epoch=1, jit_compile=False)
    with pytest.raises(ValueError, match="could not be loaded"):
        restore_checkpoint(model, checkpoint)
    assert not marker.exists()


def test_every_model_load_in_the_project_uses_safe_mode():
    """keras.models.load_model / keras.saving.load_model calls say safe_mode=True, and no
    code turns unsafe deserialization on."""
    sources = [
        *REPO.glob("study/*.py"),
        *REPO.glob("analysis/*.py"),
        *REPO.glob("analysis/*.ipynb"),
    ]
    calls = 0
    for path in sources:
        text = path.read_text()
        if path.suffix == ".ipynb":
            text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
        assert "enable_unsafe_deserialization" not in text, path
        assert "safe_mode=False" not in text, path
        for call in re.finditer(r"load_model\(([^)]*)\)", text):
            calls += 1
            assert "safe_mode=True" in call.group(1), f"{path}: {call.group(0)}"
    assert calls >= 1  # analysis/best_model.py, through which the notebook loads models.

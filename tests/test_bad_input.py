"""Bad input is refused with exit code 2 and one line that names the problem, before any work.

One table of cases covers config files, `--set` overrides, command-line flags and data
files. Each case runs through `study.run.main` in this process, on the study path and on
the `--local` path where the input means something to it, with Ray's start and the local
trial replaced by tripwires: a case passes only if it is refused before either, leaves no
run folder and no Ray session behind, and changes nothing in an earlier run folder. A few
cases also run as real processes. A property-based test feeds random command lines to the
same code (random configs and overrides: tests/test_random_input.py), which may refuse them
but never end in a traceback.
"""

import contextlib
import gzip
import io
import json
import os
import pickle
import sys
import tarfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from study import run, synthetic, tuning

from .conftest import TINY_STUDY, free_port, run_cli
from .hostile import evaluates, runs_code, write_tar
from .strategies import argument_tokens

BOTH = ("study", "local")
CLOSED_PORT = free_port()
STUDY = ("study",)


class Started(BaseException):
    """Raised where Ray would start or a trial would train: bad input got that far."""


@dataclass(frozen=True)
class Case:
    """Arguments (`@name` is a file the `files` fixture made) and the words the one line
    of stderr must hold. Without --config/--data-dir the case gets the tiny study and a
    good tarball; --name defaults to a fresh one."""

    args: tuple[str, ...]
    expected: tuple[str, ...]
    modes: tuple[str, ...] = BOTH


def _with(**sections) -> dict:
    """TINY_STUDY with some sections' keys replaced (a value of None drops the key)."""
    config = json.loads(json.dumps(TINY_STUDY))
    for section, values in sections.items():
        if not isinstance(values, dict):
            config[section] = values
            continue
        config.setdefault(section, {}).update(values)
        config[section] = {k: v for k, v in config[section].items() if v is not None}
    return config


SPACE = TINY_STUDY["search"]["space"]

# Config files: a dict is written as YAML, a str or bytes as is.
CONFIG_FILES = {
    "study.yaml": TINY_STUDY,
    "unknown-top.yaml": _with(trainer={"epochs": 3}),
    "unknown-key.yaml": _with(model={"depth": 3}),
    "wrong-type.yaml": _with(training={"epochs": "abc"}),
    "section-scalar.yaml": _with(model=3),
    "out-of-range.yaml": _with(model={"conv_dropout": 1.5}),
    "unknown-loss.yaml": _with(loss={"name": "cross_entropy"}),
    "unknown-optimizer.yaml": _with(optimizer={"name": "adagrad"}),
    "unknown-dataset.yaml": _with(data={"dataset": "imagenet"}),
    "smoothing-hinge.yaml": _with(loss={"name": "hinge", "label_smoothing": 0.1}),
    "malformed.yaml": "model:\n  width: [1,\n",
    "list.yaml": "- model\n- loss\n",
    "binary.yaml": b"\xff\xfe\x00model: {}\n",
    "deep.yaml": "model: " + "[" * 5000 + "]" * 5000 + "\n",
    "empty-space.yaml": _with(search={"space": {}, "baseline": {}}),
    "search-list.yaml": _with(search=[]),
    "search-unknown.yaml": _with(search={"num_sample": 4}),
    "zero-samples.yaml": _with(search={"num_samples": 0}),
    "bad-distribution.yaml": _with(
        search={"space": {"loss.name": {"choise": ["hinge"]}}, "baseline": {}}
    ),
    "space-unknown-loss.yaml": _with(
        search={"space": {**SPACE, "loss.name": {"choice": ["hinge", "nope"]}}}
    ),
    "space-empty-range.yaml": _with(
        search={"space": {"model.conv_dropout": {"uniform": [0.5, 0.1]}}, "baseline": {}}
    ),
    "space-infinite-range.yaml": _with(
        search={"space": {"optimizer.decay": {"uniform": [0, float("inf")]}}, "baseline": {}}
    ),
    "metric-loss.yaml": _with(search={"metric": "val_loss"}),
    "baseline-outside.yaml": _with(search={"baseline": {"optimizer.name": "rmsprop"}}),
}


def _batch(**replace) -> bytes:
    """A CIFAR-10 batch of two images, with some keys replaced (None drops one)."""
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    batch |= {key.encode(): value for key, value in replace.items()}
    return synthetic.pickle_python2({k: v for k, v in batch.items() if v is not None})


def _data_files(folder: Path, good: Path, cifar100: Path, markers: Path) -> dict[str, Path]:
    """Every damaged or hostile data file of the table, from the good CIFAR-10 tarball."""
    prefix = "cifar-10-batches-py/"
    with tarfile.open(good) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}

    def replaced(name, **blobs):
        changed = {**members, **{prefix + k: v for k, v in blobs.items()}}
        return write_tar(folder / name, changed)

    files = {
        "good.tar.gz": good,
        "cifar100.tar.gz": cifar100,
        "labels-high.tar.gz": replaced("labels-high.tar.gz", test_batch=_batch(labels=[0, 10])),
        "labels-negative.tar.gz": replaced("labels-neg.tar.gz", test_batch=_batch(labels=[-1, 3])),
        "labels-count.tar.gz": replaced("labels-count.tar.gz", test_batch=_batch(labels=[0])),
        "labels-text.tar.gz": replaced("labels-text.tar.gz", test_batch=_batch(labels=[b"a"] * 2)),
        "labels-missing.tar.gz": replaced("labels-missing.tar.gz", test_batch=_batch(labels=None)),
        "images-1024.tar.gz": replaced(
            "images-1024.tar.gz", data_batch_1=_batch(data=np.zeros((2, 1024), np.uint8))
        ),
        "images-3d.tar.gz": replaced(
            "images-3d.tar.gz", data_batch_1=_batch(data=np.zeros((2, 32, 96), np.uint8))
        ),
        "images-float.tar.gz": replaced(
            "images-float.tar.gz", data_batch_1=_batch(data=np.zeros((2, 3072), np.float32))
        ),
        "batch-list.tar.gz": replaced(
            "batch-list.tar.gz", test_batch=synthetic.pickle_python2([1, 2])
        ),
        "meta-short.tar.gz": replaced(
            "meta-short.tar.gz",
            **{"batches.meta": synthetic.pickle_python2({b"label_names": [b"cat"] * 3})},
        ),
        "pickle-system.tar.gz": replaced(
            "pickle-system.tar.gz", data_batch_2=_batch(data=runs_code(markers / "system"))
        ),
        "pickle-eval.tar.gz": replaced(
            "pickle-eval.tar.gz", test_batch=_batch(labels=[evaluates(markers / "eval"), 0])
        ),
        "pickle-corrupt.tar.gz": replaced(
            "pickle-corrupt.tar.gz", test_batch=members[prefix + "test_batch"][:1000]
        ),
        "missing-member.tar.gz": write_tar(
            folder / "missing-member.tar.gz",
            {k: v for k, v in members.items() if not k.endswith("test_batch")},
        ),
        "member-link.tar.gz": write_tar(
            folder / "member-link.tar.gz",
            members,
            kinds={prefix + "test_batch": tarfile.SYMTYPE},
        ),
        "member-folder.tar.gz": write_tar(
            folder / "member-folder.tar.gz",
            members,
            kinds={prefix + "batches.meta": tarfile.DIRTYPE},
        ),
        "uncompressed.tar": write_tar(folder / "uncompressed.tar", members, mode="w"),
    }
    whole = good.read_bytes()
    for name, blob in {
        "truncated.tar.gz": whole[: len(whole) // 2],
        "text.tar.gz": b"not a tarball\n",
        "empty.tar.gz": b"",
        "gzip-noise.tar.gz": gzip.compress(np.random.default_rng(0).bytes(4096)),
    }.items():
        files[name] = folder / name
        files[name].write_bytes(blob)
    files["empty-folder"] = folder / "empty-folder"
    files["empty-folder"].mkdir()
    files["two-tarballs"] = folder / "two-tarballs"
    for name in ("cifar-10-a.tar.gz", "cifar-10-b.tar.gz"):
        files["two-tarballs"].mkdir(exist_ok=True)
        (files["two-tarballs"] / name).write_bytes(whole)
    files["extracted-partial"] = folder / "extracted-partial"
    files["extracted-partial"].mkdir()
    for name, blob in members.items():
        if not name.endswith("data_batch_3"):
            (files["extracted-partial"] / Path(name).name).write_bytes(blob)
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory, cifar10_tarball, cifar100_tarball) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-input")
    markers = folder / "markers"
    markers.mkdir()
    made = {"markers": markers, "missing": folder / "nothing-here", "folder": folder}
    for name, content in CONFIG_FILES.items():
        path = folder / name
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)  # Space order matters.
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        made[name] = path
    made.update(_data_files(folder, cifar10_tarball, cifar100_tarball, markers))
    return made


def _data(name, *expected) -> Case:
    return Case(("--data-dir", f"@{name}"), expected)


CASES = {
    # Config files.
    "config-unknown-top-level-key": Case(
        ("--config", "@unknown-top.yaml"), ("unknown key 'trainer'", "allowed keys")
    ),
    "config-unknown-key": Case(
        ("--config", "@unknown-key.yaml"), ("unknown key 'model.depth'", "width")
    ),
    "config-wrong-type": Case(
        ("--config", "@wrong-type.yaml"), ("training.epochs", "valid integer", "'abc'")
    ),
    "config-section-is-a-number": Case(
        ("--config", "@section-scalar.yaml"), ("model: must be a mapping",)
    ),
    "config-out-of-range": Case(
        ("--config", "@out-of-range.yaml"), ("model.conv_dropout", "less than 1", "1.5")
    ),
    "config-unknown-loss": Case(
        ("--config", "@unknown-loss.yaml"),
        ("loss.name", "unknown loss 'cross_entropy'", "allowed: categorical_crossentropy"),
    ),
    "config-unknown-optimizer": Case(
        ("--config", "@unknown-optimizer.yaml"),
        ("optimizer.name", "unknown optimizer 'adagrad'", "rmsprop"),
    ),
    "config-unknown-dataset": Case(
        ("--config", "@unknown-dataset.yaml"), ("data.dataset", "unknown dataset 'imagenet'")
    ),
    "config-label-smoothing-with-hinge": Case(
        ("--config", "@smoothing-hinge.yaml"), ("label_smoothing", "'hinge'")
    ),
    "config-malformed-yaml": Case(
        ("--config", "@malformed.yaml"), ("malformed.yaml is not valid YAML at line",)
    ),
    "config-not-a-mapping": Case(("--config", "@list.yaml"), ("must hold a mapping",)),
    "config-not-text": Case(("--config", "@binary.yaml"), ("binary.yaml", "not UTF-8")),
    "config-nested-too-deeply": Case(("--config", "@deep.yaml"), ("deep.yaml nests too deeply",)),
    "config-missing": Case(("--config", "@missing"), ("--config: cannot read", "No such file")),
    "config-is-a-folder": Case(("--config", "@folder"), ("--config: cannot read",)),
    "config-empty-search-space": Case(
        ("--config", "@empty-space.yaml"), ("search.space: empty",), STUDY
    ),
    "config-search-not-a-mapping": Case(
        ("--config", "@search-list.yaml"), ("search: must be a mapping",)
    ),
    "config-search-unknown-key": Case(
        ("--config", "@search-unknown.yaml"), ("unknown key 'search.num_sample'", "num_samples")
    ),
    "config-num-samples-zero": Case(
        ("--config", "@zero-samples.yaml"), ("search.num_samples", "greater than or equal to 1")
    ),
    "config-unknown-distribution": Case(
        ("--config", "@bad-distribution.yaml"), ("unknown key 'search.space.loss.name.choise'",)
    ),
    # Whether the space's values pair with the trial config is the study's check: --local
    # runs the trial sections (test_local_checks_only_the_trial_and_not_the_search_space).
    "config-space-unknown-loss": Case(
        ("--config", "@space-unknown-loss.yaml"),
        ("search.space.loss.name", "unknown loss 'nope'"),
        STUDY,
    ),
    "config-space-empty-range": Case(
        ("--config", "@space-empty-range.yaml"),
        ("search.space.model.conv_dropout", "must have low < high"),
    ),
    "config-space-infinite-range": Case(
        ("--config", "@space-infinite-range.yaml"),
        ("search.space.optimizer.decay.uniform", "finite number"),
    ),
    "config-metric-is-a-loss": Case(
        ("--config", "@metric-loss.yaml"), ("unknown key 'search.metric'",)
    ),
    "config-baseline-outside-space": Case(
        ("--config", "@baseline-outside.yaml"),
        ("search.baseline.optimizer.name", "'rmsprop' lies outside"),
        STUDY,
    ),
    # --set overrides.
    "set-without-equals": Case(("--set", "noequals"), ("--set 'noequals'", "section.key=value")),
    "set-without-key": Case(("--set", "=5"), ("--set '=5'", "section.key=value")),
    "set-malformed-yaml": Case(("--set", "model.width=[1,"), ("model.width", "not valid YAML")),
    "set-python-tag": Case(
        ("--set", "model.width=!!python/object/apply:os.system [touch @markers/set]"),
        ("model.width", "not valid YAML"),
    ),
    "set-nested-too-deeply": Case(
        ("--set", "model.width=" + "[" * 5000), ("--set model.width", "nests too deeply")
    ),
    "set-into-a-value": Case(("--set", "model.width.x=1"), ("'width' is not a section",)),
    "set-section-to-a-number": Case(("--set", "model=3"), ("model: must be a mapping",)),
    "set-unknown-key": Case(("--set", "model.depth=3"), ("unknown key 'model.depth'",)),
    "set-wrong-type": Case(("--set", "training.epochs=1.5"), ("training.epochs", "integer")),
    "set-out-of-range": Case(
        ("--set", "optimizer.learning_rate=0"), ("optimizer.learning_rate", "greater than 0")
    ),
    "set-not-a-number": Case(("--set", "model.width=.nan"), ("model.width", "nan")),
    "set-negative-seed": Case(("--set", "seed=-1"), ("seed", "greater than or equal to 0")),
    "set-unknown-schedule": Case(
        ("--set", "optimizer.schedule=step"), ("optimizer.schedule", "unknown schedule 'step'")
    ),
    "set-metric-is-a-loss": Case(
        ("--set", "search.metric=val_loss"), ("unknown key 'search.metric'",)
    ),
    "set-space-range-outside-the-key": Case(
        ("--set", "search.space.model.width={uniform: [0, 1]}"),
        ("search.space.model.width", "greater than 0"),
        STUDY,
    ),
    "set-num-samples-zero": Case(
        ("--set", "search.num_samples=0"), ("search.num_samples", "greater than or equal to 1")
    ),
    "set-empty-search-space": Case(("--set", "search.space={}"), ("search.space: empty",), STUDY),
    "set-space-not-a-mapping": Case(
        ("--set", "search.space=[1]", "--set", "search.space.loss.name={choice: [hinge]}"),
        ("search.space: must be a mapping",),
    ),
    "set-infinite-reduction-factor": Case(
        ("--set", "search.reduction_factor=.inf"), ("search.reduction_factor", "finite")
    ),
    "set-train-subset-too-large": Case(
        ("--set", "data.train_subset=100000"), ("data.train_subset", "more than the 400 images")
    ),
    "set-validation-takes-everything": Case(
        ("--set", "data.validation_size=200"), ("data.validation_size", "200 gives 200")
    ),
    # Command-line flags.
    "flag-unknown": Case(("--bogus",), ("unrecognized arguments: --bogus",)),
    "flag-without-value": Case(("--set",), ("argument --set: expected one argument",)),
    "flag-unknown-searcher": Case(
        ("--searcher", "bogus"), ("argument --searcher: invalid choice: 'bogus'",)
    ),
    "flag-unknown-scheduler": Case(
        ("--scheduler", "pbt"), ("argument --scheduler: invalid choice: 'pbt'",)
    ),
    "flag-num-samples-zero": Case(
        ("--num-samples", "0"), ("search.num_samples", "greater than or equal to 1"), STUDY
    ),
    "flag-num-samples-not-a-number": Case(
        ("--num-samples", "many"), ("argument --num-samples: invalid int value: 'many'",)
    ),
    "flag-negative-gpus": Case(("--gpus", "-1"), ("argument --gpus: '-1' is not a number >= 0",)),
    "flag-gpus-not-a-number": Case(
        ("--gpus", "nan"), ("argument --gpus: 'nan' is not a number >= 0",)
    ),
    "flag-infinite-cpus": Case(
        ("--cpus-per-trial", "inf"), ("argument --cpus-per-trial: 'inf' is not a number",)
    ),
    "flag-zero-cpus-per-trial": Case(
        ("--cpus-per-trial", "0"), ("--cpus-per-trial: must be > 0",), STUDY
    ),
    "flag-more-gpus-per-trial-than-gpus": Case(
        ("--gpus", "1", "--gpus-per-trial", "2"),
        ("--gpus-per-trial: 2 is more than the study's --gpus 1",),
        STUDY,
    ),
    # A trial trains on one GPU: a second one would sit idle, so it is not accepted.
    "flag-gpus-per-trial-above-one": Case(
        ("--gpus", "4", "--gpus-per-trial", "2"),
        ("--gpus-per-trial: 2", "a trial trains on one GPU", "at most 1"),
        STUDY,
    ),
    "flag-config-gpus-per-trial-above-one": Case(
        ("--gpus", "4", "--set", "search.gpus_per_trial=1.5"),
        ("search.gpus_per_trial: 1.5", "a trial trains on one GPU", "at most 1"),
        STUDY,
    ),
    "flag-gpus-per-trial-without-gpus": Case(
        ("--gpus-per-trial", "1"), ("--gpus-per-trial", "the study has no GPUs"), STUDY
    ),
    "flag-config-gpus-per-trial-above-gpus": Case(
        ("--gpus", "1", "--set", "search.gpus_per_trial=2"), ("search.gpus_per_trial", "2"), STUDY
    ),
    # Nothing listens there (a port this test bound and let go): refused at once, where
    # Ray would retry for minutes.
    "flag-address-where-nothing-answers": Case(
        ("--address", f"127.0.0.1:{CLOSED_PORT}"),
        (f"--address: nothing answers at 127.0.0.1:{CLOSED_PORT}", "ray start --head"),
        STUDY,
    ),
    "flag-address-client-where-nothing-answers": Case(
        ("--address", f"ray://127.0.0.1:{CLOSED_PORT}"),
        (f"--address: nothing answers at 127.0.0.1:{CLOSED_PORT}",),
        STUDY,
    ),
    "flag-address-without-port": Case(
        ("--address", "headnode"),
        ("--address: 'headnode'", "auto, HOST:PORT or ray://HOST:PORT"),
        STUDY,
    ),
    "flag-time-budget-zero": Case(("--time-budget", "0"), ("--time-budget", "more than 0")),
    "flag-time-budget-not-a-duration": Case(
        ("--time-budget", "soon"), ("--time-budget", "'soon' is not a duration", "1h30m")
    ),
    "flag-time-budget-for-one-trial": Case(
        ("--time-budget", "1h"), ("--time-budget: bounds a study",), ("local",)
    ),
    "flag-logger-unknown": Case(("--logger", "neptune"), ("--logger", "invalid choice")),
    "flag-name-with-a-slash": Case(("--name", "a/b"), ("--name: 'a/b' must be a plain folder",)),
    "flag-name-of-an-earlier-run": Case(("--name", "earlier"), ("earlier already exists",)),
    # A folder name longer than the file system's limit (255 bytes): found by the random
    # command lines below, which got an OSError's traceback.
    "flag-name-too-long": Case(("--name", "n" * 300), ("--name", "File name too long")),
    "flag-storage-path-too-long": Case(
        ("--storage-path", "s" * 300), ("--storage-path", "File name too long")
    ),
    "flag-resume-name-too-long": Case(
        ("--resume", "--name", "n" * 300), ("--name", "File name too long"), STUDY
    ),
    "flag-resume-without-name": Case(("--resume",), ("--resume: name the study",), STUDY),
    "flag-resume-of-no-study": Case(
        ("--resume", "--name", "nothing"), ("--resume: no study at", "nothing"), STUDY
    ),
    "flag-resume-with-config": Case(
        ("--resume", "--name", "earlier", "--config", "@study.yaml"),
        ("--resume", "drop --config"),
        STUDY,
    ),
    # Data files.
    "data-missing-path": _data("missing", "--data-dir", "nothing-here does not exist"),
    "data-empty-folder": _data("empty-folder", "holds neither cifar-10-python.tar.gz"),
    "data-two-tarballs": _data("two-tarballs", "several tarballs", "cifar-10-a.tar.gz"),
    "data-extracted-folder-missing-a-batch": _data("extracted-partial", "missing data_batch_3"),
    "data-wrong-members": _data("cifar100.tar.gz", "no member cifar-10-batches-py/data_batch_1"),
    "data-missing-member": _data("missing-member.tar.gz", "no member", "test_batch"),
    "data-member-is-a-link": _data("member-link.tar.gz", "test_batch is not a regular file"),
    "data-member-is-a-folder": _data("member-folder.tar.gz", "batches.meta is not a regular file"),
    "data-truncated": _data("truncated.tar.gz", "truncated.tar.gz: truncated or not a gzip"),
    "data-not-gzip": _data("text.tar.gz", "text.tar.gz: truncated or not a gzip"),
    "data-empty-file": _data("empty.tar.gz", "empty.tar.gz: truncated or not a gzip"),
    "data-uncompressed-tar": _data("uncompressed.tar", "truncated or not a gzip"),
    "data-gzip-of-noise": _data("gzip-noise.tar.gz", "truncated or not a gzip"),
    "data-labels-too-high": _data("labels-high.tar.gz", "test_batch", "[0, 10), found 10"),
    "data-labels-negative": _data("labels-negative.tar.gz", "test_batch", "[0, 10), found -1"),
    "data-labels-count": _data("labels-count.tar.gz", "'labels' must be 2 integers"),
    "data-labels-not-numbers": _data("labels-text.tar.gz", "'labels' must be 2 integers"),
    "data-labels-missing": _data("labels-missing.tar.gz", "no 'labels' in the batch"),
    "data-images-wrong-size": _data("images-1024.tar.gz", "data_batch_1", "expected 3072"),
    "data-images-wrong-shape": _data("images-3d.tar.gz", "data_batch_1", "shape (N, 3072)"),
    "data-images-not-uint8": _data("images-float.tar.gz", "'data' must be a uint8 array"),
    "data-batch-not-a-dict": _data("batch-list.tar.gz", "test_batch: expected a dict"),
    "data-meta-too-few-names": _data("meta-short.tar.gz", "meta must list 10 class names"),
    "data-pickle-runs-os-system": _data(
        "pickle-system.tar.gz", "data_batch_2", "refused global", "system"
    ),
    "data-pickle-runs-eval": _data("pickle-eval.tar.gz", "test_batch", "refused global", "eval"),
    "data-pickle-corrupt": _data("pickle-corrupt.tar.gz", "test_batch: corrupt pickle"),
}

TABLE = [
    pytest.param(case, mode, id=f"{mode}-{name}")
    for name, case in CASES.items()
    for mode in case.modes
]


def _argv(case: Case, mode: str, files: dict, storage: Path) -> list[str]:
    def resolve(arg: str) -> str:
        if arg.startswith("@"):
            name, _, rest = arg[1:].partition("/")
            return str(files[name] / rest if rest else files[name])
        return arg.replace("@markers", str(files["markers"]))

    defaults = ["--storage-path", str(storage)]
    if "--resume" not in case.args:
        defaults += ["--config", str(files["study.yaml"]), "--data-dir", str(files["good.tar.gz"])]
    if "--name" not in case.args and "--resume" not in case.args:
        defaults += ["--name", "new"]
    mode_flag = ["--local"] if mode == "local" else []
    # The case's own flags come last: argparse keeps the last value of a repeated flag.
    return [*mode_flag, *defaults, *map(resolve, case.args)]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def tripwires(monkeypatch, tmp_path):
    """Ray's start, the local trial and any download raise `Started`; returns a storage
    folder that already holds an earlier run, and the folder Ray's sessions would go to."""

    def started(*args, **kwargs):
        raise Started("bad input got past the checks")

    monkeypatch.setattr(tuning, "connect", started)
    monkeypatch.setattr("study.data._download", started)
    local = types.ModuleType("study.local")
    local.run_local = started
    monkeypatch.setitem(sys.modules, "study.local", local)
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    storage = tmp_path / "results"
    earlier = storage / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "result.json").write_text('{"status": "completed"}')
    (earlier / "epochs.csv").write_text("epoch,val_accuracy\n1,0.5\n")
    return storage, ray_tmp


@pytest.mark.parametrize(("case", "mode"), TABLE)
def test_bad_input_exits_2_with_one_line(case, mode, files, tripwires, capsys):
    storage, ray_tmp = tripwires
    before = _snapshot(storage)
    code = run.main(_argv(case, mode, files, storage))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == run.EXIT_BAD_INPUT, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    for words in case.expected:
        assert words in lines[0], f"{words!r} not in {lines[0]!r}"
    # Nothing started, nothing written, nothing already written lost, no code run.
    assert "run folder:" not in captured.out
    assert _snapshot(storage) == before
    assert not any(ray_tmp.iterdir())
    assert not any(files["markers"].iterdir())


@pytest.mark.parametrize("mode", BOTH)
def test_good_input_reaches_the_tripwires(mode, files, tripwires):
    """The table's 'nothing started' is not vacuous: the same arguments without the bad
    input get to Ray's start (study) or the trial (local)."""
    storage, _ = tripwires
    with pytest.raises(Started):
        run.main(_argv(Case((), ()), mode, files, storage))


def test_the_table_is_large_and_covers_each_kind_and_both_paths():
    kinds = {name.split("-")[0] for name in CASES}
    assert kinds == {"config", "set", "flag", "data"}
    assert len(CASES) >= 30
    local = [name for name, case in CASES.items() if "local" in case.modes]
    assert all(CASES[name].modes == BOTH for name in CASES if name.startswith("data-"))
    assert len(local) >= 30


def test_the_hostile_payloads_are_live(tmp_path):
    """Plain pickle and YAML would run them: the table's refusals are not vacuous."""
    pickle.loads(_batch(data=runs_code(tmp_path / "system")), encoding="bytes")
    pickle.loads(_batch(labels=[evaluates(tmp_path / "eval"), 0]), encoding="bytes")
    assert {p.name for p in tmp_path.iterdir()} == {"system", "eval"}
    yaml_payload = CASES["set-python-tag"].args[1].partition("=")[2]
    armed = yaml_payload.replace("@markers/set", str(tmp_path / "yaml"))
    yaml.unsafe_load(armed)
    assert (tmp_path / "yaml").exists()


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        # The study path, a data file with a payload: refused before Ray or any trial.
        ("study", ("--data-dir", "@pickle-system.tar.gz"), "refused global"),
        # A flag argparse refuses: one line, not the usage.
        ("flag", ("--gpus", "nan"), "argument --gpus: 'nan' is not a number >= 0"),
        # An address where nothing listens: refused at once, where Ray would retry for
        # minutes (this test's timeout).
        ("address", ("--address", f"127.0.0.1:{CLOSED_PORT}"), "nothing answers at"),
        # The local path, a bad override.
        ("local", ("--local", "--set", "loss.name=nope"), "loss.name: unknown loss 'nope'"),
    ],
)
def test_bad_input_in_a_real_process(name, args, expected, files, tmp_path):
    """The exit code is the process's and stderr is exactly one line, with nothing else
    (no TensorFlow or Ray start-up noise: neither is imported before the checks)."""
    storage = tmp_path / "results"
    (storage / "earlier").mkdir(parents=True)
    (storage / "earlier" / "result.json").write_text("precious")
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    argv = [str(files[a[1:]]) if a.startswith("@") else a for a in args]
    result = run_cli(
        "study.run",
        "--config", files["study.yaml"], "--data-dir", files["good.tar.gz"],
        "--storage-path", storage, "--name", "new", *argv,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in storage.iterdir()) == ["earlier"]
    assert (storage / "earlier" / "result.json").read_text() == "precious"
    assert not any(ray_tmp.iterdir())
    assert not any(files["markers"].iterdir())


def test_unreadable_data_file(files, tripwires, capsys, monkeypatch):
    """A tarball that cannot be opened (permissions; as root, simulated) is one line."""
    storage, _ = tripwires
    path = files["folder"] / "locked.tar.gz"
    path.write_bytes(files["good.tar.gz"].read_bytes())
    path.chmod(0)
    if os.access(path, os.R_OK):  # Root reads anything: make open() say what it would.

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(tarfile, "open", denied)
    for mode in BOTH:
        case = Case(("--data-dir", str(path)), ())
        assert run.main(_argv(case, mode, files, storage)) == 2
        err = capsys.readouterr().err
        assert err == f"error: {path.resolve()}: cannot read (Permission denied)\n"


# --- Random command lines: refused or accepted, never a traceback --------------------------


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tokens=argument_tokens)
def test_random_command_lines_never_end_in_a_traceback(tokens, files, tripwires):
    """Random flags after a good study: exit 2 with one line, or past every check."""
    storage, ray_tmp = tripwires
    argv = [
        "--config", str(files["study.yaml"]), "--data-dir", str(files["good.tar.gz"]),
        "--storage-path", str(storage), "--name", "new", *tokens,
    ]  # fmt: skip
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = run.main(argv)
        except Started:
            return
    assert code == 2, stderr.getvalue()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr.getvalue()
    assert not any(ray_tmp.iterdir())


def test_local_checks_only_the_trial_and_not_the_search_space(files, tripwires, capsys):
    """--local runs the trial sections: label smoothing, which the space's hinge cannot
    take, is the study's to refuse, with the same line as ever; the local trial runs."""
    storage, _ = tripwires
    case = Case(("--set", "loss.label_smoothing=0.1"), ())
    with pytest.raises(Started):
        run.main(_argv(case, "local", files, storage))
    assert run.main(_argv(case, "study", files, storage)) == run.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("error: search.space.loss.name: with loss.name=hinge: loss: ")
    assert "label_smoothing > 0 is not defined for loss 'hinge'" in error


def _stored_study(storage: Path, name: str, **search) -> None:
    """A study's config.yaml, as a study writes it, in storage/name (no study ran)."""
    folder = storage / name
    folder.mkdir(parents=True)
    config = json.loads(json.dumps(TINY_STUDY))
    config["search"].update(search)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


LOSSES = {"choice": ["hinge", "categorical_crossentropy"]}

# Trackers and growing: cases that need an environment or a stored study. Each is
# (modes, extra arguments, environment changes, the words of the one line).
SETTINGS = {
    "mlflow-not-installed": (
        BOTH,
        ("--logger", "mlflow"),
        {"module:mlflow": None},
        ("--logger mlflow", ".[mlflow]"),
    ),
    "wandb-not-installed": (
        BOTH,
        ("--logger", "wandb"),
        {"module:wandb": None},
        ("--logger wandb", ".[wandb]"),
    ),
    "mlflow-unknown-scheme": (
        BOTH,
        ("--logger", "mlflow"),
        {"MLFLOW_TRACKING_URI": "ftp://nowhere/runs"},
        ("MLFLOW_TRACKING_URI='ftp://nowhere/runs'", "unsupported URI"),
    ),
    "mlflow-server-down": (
        BOTH,
        ("--logger", "mlflow"),
        {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{CLOSED_PORT}"},
        ("MLFLOW_TRACKING_URI", "nothing answers there"),
    ),
    "wandb-unknown-mode": (
        BOTH,
        ("--logger", "wandb"),
        {"WANDB_MODE": "sometimes"},
        ("WANDB_MODE='sometimes'", "allowed: online, offline"),
    ),
    # Online by default, and this machine has no key (and no network): say so, and how
    # to keep the runs offline.
    "wandb-online-without-a-key": (
        BOTH,
        ("--logger", "wandb"),
        {"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": "@folder"},
        ("no W&B API key", "WANDB_MODE=offline"),
    ),
    "grow-to-fewer": (
        STUDY,
        ("--resume", "--name", "stored", "--num-samples", "4"),
        {"study:stored": {}},
        ("--num-samples: 4 is fewer than the study's 6 trials",),
    ),
    "grow-a-grid": (
        STUDY,
        ("--resume", "--name", "grid", "--num-samples", "9"),
        {"study:grid": {"searcher": "grid", "baseline": {}, "space": {"loss.name": LOSSES}}},
        ("--num-samples: a grid study",),
    ),
}


@pytest.mark.parametrize(
    ("name", "mode"), [(name, mode) for name, case in SETTINGS.items() for mode in case[0]]
)
def test_bad_tracker_settings_and_growth_exit_2_before_anything(
    name, mode, files, tripwires, capsys, monkeypatch
):
    storage, ray_tmp = tripwires
    _, args, changes, expected = SETTINGS[name]
    for key, value in changes.items():
        if key.startswith("module:"):
            monkeypatch.setitem(sys.modules, key.partition(":")[2], value)  # Not installed.
        elif key.startswith("study:"):
            _stored_study(storage, key.partition(":")[2], **value)
        elif value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(files["folder"]) if value == "@folder" else value)
    before = _snapshot(storage)
    code = run.main(_argv(Case(args, expected), mode, files, storage))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == run.EXIT_BAD_INPUT and len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    for words in expected:
        assert words in lines[0], f"{words!r} not in {lines[0]!r}"
    assert _snapshot(storage) == before
    assert not any(ray_tmp.iterdir())

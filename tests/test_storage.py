"""A study's storage as a URI (study/storage.py), against a real S3-compatible server on
127.0.0.1 (tests/buckets.py): the URI reaches Tune unchanged, bad storage is refused in
one line before any work, and the study's own files go up to the bucket and come back.
The whole studies in a bucket, on a cluster, are in tests/test_cluster.py (scale)."""

import sqlite3

import pytest

from study import storage
from study.config import ConfigError
from study.files import STUDY_FILES
from study.run import _options, parse_args

from .conftest import free_port, run_cli, write_study_config


def test_a_bucket_goes_from_the_command_line_to_tune_unchanged():
    """`Path` made s3://b/studies into s3:/b/studies: the study wrote a local folder 's3:'."""
    args = parse_args(["--storage-path", "s3://b/studies", "--name", "n"])
    options = _options(args, "n")
    assert options.storage_path == "s3://b/studies" and options.remote_storage
    assert options.experiment_path == "s3://b/studies/n"
    assert options.results_dir == storage.local_folder("s3://b/studies/n")
    assert options.results_dir.parts[-2:] == ("results", "n")


@pytest.mark.parametrize(
    ("uri", "variables", "expected"),
    [
        ("foo://x/studies", {}, "unknown scheme 'foo'; use a local folder or one of s3://"),
        ("s3://no-such-bucket/studies", {}, "bucket 'no-such-bucket' does not exist at http"),
        (
            "s3://studies/x",
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        ("s3://studies/x", {"AWS_ENDPOINT_URL": "CLOSED"}, "cannot reach bucket 'studies' at"),
    ],
    ids=["unknown scheme", "no bucket", "no credentials", "no answer"],
)
def test_storage_a_study_cannot_use_is_one_line_and_exit_2(
    tmp_path, s3_server, cifar10_tarball, uri, variables, expected
):
    """Each refused before Ray starts or a folder is made, in one line (with no keys and
    the metadata endpoint off, no client asks a cloud for credentials)."""
    env = s3_server.env()
    for key, value in variables.items():
        if value == "CLOSED":
            value = f"http://127.0.0.1:{free_port()}"  # Nothing listens there.
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    env["HOME"] = str(tmp_path)  # No ~/.aws/credentials of this machine's user.
    config = write_study_config(tmp_path / "study.yaml")
    result = run_cli(
        "study.run", "--config", config, "--data-dir", cifar10_tarball,
        "--storage-path", uri, "--name", "refused", env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --storage-path") and expected in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Ray dashboard" not in result.stdout and not (tmp_path / "results").exists()


def test_the_local_mode_refuses_a_bucket(tmp_path, cifar10_tarball):
    result = run_cli(
        "study.run", "--local", "--data-dir", cifar10_tarball,
        "--storage-path", "s3://studies/x", "--name", "local", timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--local writes its run folder on this machine" in result.stderr


def test_the_study_files_go_up_to_the_bucket_and_come_back(tmp_path, s3_env):
    """The mirror uploads what changed (optuna.db as SQLite's own consistent copy), and a
    fetch into a fresh folder takes what is newer there."""
    folder = tmp_path / "driver"
    folder.mkdir()
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "trials.csv").write_text("trial_id,status\na,running\n")
    database = sqlite3.connect(folder / "optuna.db")
    database.execute("create table trials (number integer)")
    database.executemany("insert into trials values (?)", [(i,) for i in range(100)])
    database.commit()
    uri = s3_env.uri("mirror/one")
    mirror = storage.Mirror(folder, uri, STUDY_FILES)
    mirror.changed()
    mirror.flush()
    assert storage.listing(uri) == ["config.yaml", "optuna.db", "trials.csv"]
    (folder / "trials.csv").write_text("trial_id,status\na,completed\n")
    database.execute("insert into trials values (100)")  # Uncommitted: not in a copy.
    mirror.changed()
    mirror.flush()
    database.close()
    other = tmp_path / "elsewhere"
    assert sorted(storage.fetch(uri, other, STUDY_FILES)) == sorted(
        ["config.yaml", "optuna.db", "trials.csv"]
    )
    assert (other / "trials.csv").read_text() == "trial_id,status\na,completed\n"
    copy = sqlite3.connect(other / "optuna.db")
    assert copy.execute("select count(*) from trials").fetchone() == (100,)
    copy.close()
    assert storage.fetch(uri, other, STUDY_FILES) == []  # Nothing newer now.


def test_a_study_already_in_the_bucket_is_not_overwritten(s3_env, tmp_path, monkeypatch):
    from study.search_config import load_study
    from study.tuning import StudyOptions, prepare

    uri = s3_env.uri("taken")
    monkeypatch.chdir(tmp_path)
    mirror = storage.Mirror(tmp_path / "x", f"{uri}/old", ["config.yaml"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.yaml").write_text("seed: 0\n")
    mirror.upload()
    options = StudyOptions(name="old", storage_path=uri)
    with pytest.raises(ConfigError, match=f"--name: {uri}/old already exists; --resume"):
        prepare(load_study(None), options)
    with pytest.raises(ConfigError, match=f"--resume: no study at {uri}/new"):
        prepare(load_study(None), StudyOptions(name="new", storage_path=uri, resume=True))

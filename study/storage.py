"""Where a study lives: a local folder, or a bucket (`s3://BUCKET/PATH`) that every node of
a cluster reaches.

With a bucket, Ray keeps its experiment state, the trials' folders and their checkpoints
there, written by the driver and by each trial's worker. The study's own files (the
resolved config, trials.csv, epochs.csv, optuna.db, and the confirmation's tables) are
written on the driver, under `results/NAME` in the folder the command runs from, and
mirrored to the bucket: a thread uploads every file that changed as soon as the one
before is up, after each result the driver records, and the run waits for the last
upload before it ends. A driver lost mid-study loses at most the results of its last
upload, about one report: the bucket's tables lag Tune's checkpoints, never lead them, so
a resumed trial runs again (as a new row) only epochs that the bucket's epochs.csv does
not hold. A command given the bucket on another machine (`--resume`, `--confirm`,
`analysis.report`, the notebook) first fetches those files into the same local folder,
taking each where the bucket's copy is newer.

Credentials and the endpoint come from the standard variables of the AWS SDK that Ray's
pyarrow reads (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_PROFILE`, `AWS_REGION`; `AWS_ENDPOINT_URL` for MinIO and other S3-compatible
stores). `check` refuses, in one line and in seconds, what would otherwise fail deep in
Ray or hang: an unknown scheme, no credentials, a bucket that does not exist, an endpoint
that does not answer. Nothing here imports Ray or Keras.
"""

import os
import threading
from pathlib import Path
from urllib.parse import urlparse

from study.config import ConfigError

# The schemes a study's storage may have: s3 is tested (against an S3-compatible server);
# gs (Google Cloud Storage, through Ray's pyarrow) is passed on as it is.
SCHEMES = ("s3", "gs")
# The probe's patience: a bucket that answers does so in milliseconds.
PROBE_SECONDS = 3.0
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")
# Variables a trial's worker needs to reach the same storage (Tune passes the keys on).
WORKER_VARIABLES = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)  # fmt: skip


# Where a study stored in a bucket keeps its own files on the machine that runs a command.
LOCAL_ROOT = Path("results")


def is_uri(location: str) -> bool:
    return "://" in str(location)


def local_folder(uri: str) -> Path:
    """The local folder of the study at `uri` (its last part is the study's name):
    results/NAME under the folder the command runs from."""
    return (LOCAL_ROOT / uri.rstrip("/").rsplit("/", 1)[-1]).resolve()


def worker_env() -> dict[str, str]:
    """The storage settings of this process that a trial's worker on another node needs
    (Tune passes the keys on itself)."""
    return {name: os.environ[name] for name in WORKER_VARIABLES if name in os.environ}


def join(location: str, *parts: str) -> str:
    """`location`/parts, for a URI or a local path alike."""
    return "/".join([str(location).rstrip("/"), *parts])


def _scheme(uri: str) -> str:
    return urlparse(uri).scheme


def _filesystem(uri: str):
    """pyarrow's filesystem for `uri` (the endpoint and region from the environment, as
    Ray's own is made) and the path in it."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _has_credentials() -> bool:
    if any(os.environ.get(name) for name in CREDENTIAL_VARIABLES):
        return True
    files = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    if Path(files).expanduser().is_file():
        return True
    # Without the metadata endpoint switched off, a cloud machine's role may provide them.
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"


def check(uri: str, what: str = "--storage-path") -> None:
    """Refuses, in one line, storage that a study could not use; before any trial."""
    scheme = _scheme(uri)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{what}: {uri!r}: unknown scheme {scheme!r}; use a local folder or one of "
            f"{', '.join(f'{s}://BUCKET/PATH' for s in SCHEMES)}"
        )
    if scheme == "s3":
        _check_s3(uri, what)


def _check_s3(uri: str, what: str) -> None:
    import pyarrow.fs

    if not _has_credentials():
        raise ConfigError(
            f"{what}: {uri}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    try:
        filesystem, path = _filesystem(uri)
    except Exception as error:  # pyarrow's errors: a malformed URI, an unknown region.
        raise ConfigError(f"{what}: {uri}: {_reason(error)}") from None
    options = filesystem.__reduce__()[1][0]  # The endpoint and region from_uri resolved.
    probe = pyarrow.fs.S3FileSystem(
        endpoint_override=options.get("endpoint_override") or None,
        region=options.get("region") or None,
        connect_timeout=PROBE_SECONDS,
        request_timeout=PROBE_SECONDS,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    bucket = path.split("/", 1)[0]
    where = options.get("endpoint_override") or "AWS"
    try:
        found = probe.get_file_info(bucket)
    except OSError as error:
        reason = _reason(error)
        raise ConfigError(f"{what}: cannot reach bucket {bucket!r} at {where}: {reason}") from None
    if found.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"{what}: {uri}: bucket {bucket!r} does not exist at {where}")


def _reason(error: Exception) -> str:
    """An AWS SDK error in a few words: its first line, without the SDK's preamble."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.replace("When getting information for bucket ", "").strip()[:200]


def exists(uri: str) -> bool:
    import pyarrow.fs

    filesystem, path = _filesystem(uri)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def fetch(uri: str, folder: Path, names) -> list[str]:
    """Copies each of `names` (paths under `uri`) into `folder` where the bucket's copy is
    newer than the local one, or there is no local one; returns those copied."""
    import pyarrow.fs

    filesystem, root = _filesystem(uri)
    copied = []
    for name in names:
        remote = filesystem.get_file_info(f"{root.rstrip('/')}/{name}")
        if remote.type != pyarrow.fs.FileType.File:
            continue
        local = Path(folder) / name
        if local.is_file() and local.stat().st_mtime >= remote.mtime.timestamp():
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        temporary = local.with_name(f".{local.name}.fetching")
        with filesystem.open_input_stream(remote.path) as source, open(temporary, "wb") as out:
            out.write(source.read())
        os.replace(temporary, local)
        os.utime(local, (remote.mtime.timestamp(), remote.mtime.timestamp()))
        copied.append(name)
    return copied


def fetch_folder(uri: str, folder: Path) -> Path:
    """The whole folder at `uri` (a checkpoint), copied into `folder`."""
    import pyarrow.fs

    filesystem, path = _filesystem(uri)
    folder.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(
        path, str(folder), source_filesystem=filesystem,
        destination_filesystem=pyarrow.fs.LocalFileSystem(),
    )  # fmt: skip
    return folder


def listing(uri: str) -> list[str]:
    """The names of the entries directly under `uri`; empty if there is none."""
    import pyarrow.fs

    filesystem, path = _filesystem(uri)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in found)


def _contents(path: Path) -> bytes:
    """A file's bytes; for an SQLite database (optuna.db, which Optuna may be writing), a
    consistent copy made with SQLite's own backup, never a half-written page."""
    if path.suffix != ".db":
        return path.read_bytes()  # The tables are replaced whole (study/results.py).
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        source, target = sqlite3.connect(path), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        return copy.read_bytes()


class Mirror:
    """Uploads the study's own files from `folder` to `uri` as they change: `changed()`
    after each write wakes a thread that uploads every file newer than its last upload;
    `flush()` waits until the bucket has them all. Local storage needs no mirror: every
    method then does nothing."""

    def __init__(self, folder: Path, uri: str | None, names):
        self.folder, self.uri, self.names = Path(folder), uri, tuple(names)
        self.uploaded: dict[str, float] = {}
        self.wake, self.idle = threading.Event(), threading.Event()
        self.idle.set()
        self.thread = None
        self.error: Exception | None = None

    def changed(self) -> None:
        if self.uri is None:
            return
        self.idle.clear()
        self.wake.set()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="study-mirror", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            try:
                self.upload()
            except Exception as error:  # The study goes on; the next change tries again.
                self.error = error
            if not self.wake.is_set():
                self.idle.set()

    def upload(self) -> list[str]:
        """Uploads every file newer than its last upload (on this thread)."""
        filesystem, root = _filesystem(self.uri)
        sent = []
        for name in self.names:
            local = self.folder / name
            if not local.is_file():
                continue
            modified = local.stat().st_mtime
            if self.uploaded.get(name) == modified:
                continue
            with filesystem.open_output_stream(f"{root.rstrip('/')}/{name}") as out:
                out.write(_contents(local))
            self.uploaded[name] = modified
            sent.append(name)
        return sent

    def flush(self, timeout: float = 120.0) -> None:
        """Waits for the uploads in flight, then uploads what is left."""
        if self.uri is None:
            return
        self.idle.wait(timeout)
        self.upload()

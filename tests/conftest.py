"""Shared fixtures: small CIFAR tarballs in the official format, and the real samples."""

import contextlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from study import synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# pytester: for the test of the rules below; tests.studies: the shared study fixtures;
# tests.buckets: the S3-compatible server.
pytest_plugins = ["pytester", "tests.studies", "tests.buckets"]

# With STUDY_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run, unless its reason
# holds one of these: CI installs every package the tests need and has ../shared/data, so
# a skip there means a test silently did not run.
ALLOWED_SKIPS = {
    "needs an NVIDIA GPU": "CI machines have none; .ci/gpu-bench runs where one is lent",
}
_unexpected_skips: list[str] = []


# Fixtures that start Ray (or a whole study on it): a test that uses one is a `study`
# test, so `pytest -m "not slow and not study"` is a quick run that starts no Ray.
RAY_FIXTURES = {
    "ray_env", "ray_cluster", "local_ray", "shared_study", "study_folder", "confirmed_study",
}  # fmt: skip


# Fixtures made once per module or session at some cost: under pytest-xdist (`-n`, on by
# default) the tests that share one run on one worker, so that it is made once.
SHARED_FIXTURES = {
    "shared_study": "shared study",
    "confirmed_study": "confirmed study",
    "compiled": "backends",
    "study_folder": "analysis study",
    "backend_values": "loss values",
    "local_ray": "local ray",
    "s3_server": "bucket",
}


LONG_MARKS = ("study", "slow")


# First: xdist's own hook turns each test's xdist_group into its node id's "@group" suffix,
# which is what its scheduler reads; a group marked after that is ignored.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if RAY_FIXTURES & fixtures:
            item.add_marker(pytest.mark.study)
        if shared := sorted(SHARED_FIXTURES.keys() & fixtures):
            item.add_marker(pytest.mark.xdist_group(SHARED_FIXTURES[shared[0]]))
    # The long ones first (the studies, then the training on real images), so that two
    # workers end together rather than one waiting on the other's last long test.
    items.sort(key=lambda item: [item.get_closest_marker(mark) is None for mark in LONG_MARKS])


def pytest_runtest_logreport(report):
    if not report.skipped or os.environ.get("STUDY_NO_SKIPS") != "1":
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_SKIPS):
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skipped, and not on the allowed list (STUDY_NO_SKIPS=1)")
        for line in _unexpected_skips:
            terminalreporter.line(line)


def run_cli(module: str, *args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Runs `python -m MODULE ARGS` from the repository root, as a user would."""
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def python_json(code: str, timeout=120):
    """`python -c CODE` in a fresh process from the repository root (what a new process
    imports is what such tests check); the JSON that its last line of output holds."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


BACKENDS = ("tensorflow", "jax")


def require_jax() -> None:
    """Skips a test that needs JAX where it is not installed (CI installs it)."""

    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed: pip install -e '.[jax]'")


def quick_xla_flags() -> str:
    """XLA_FLAGS for tests, which compile many small programs once each: LLVM's
    optimisations of the compiled code cost more time than they save (two thirds of JAX's
    compile time here)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def on_backends(module: str, function: str, *args, timeout=900) -> dict:
    """`module.function(*args)` with Keras on each backend, each in a new process (Keras
    fixes its backend per process), all at once: compiling is mostly single-threaded, so
    they overlap. Arguments and results travel as JSON; returns {backend: result}."""
    require_jax()
    code = (
        "import importlib, json, os, keras\n"
        "assert keras.backend.backend() == os.environ['KERAS_BACKEND'], keras.backend.backend()\n"
        f"result = getattr(importlib.import_module({module!r}), {function!r})(*{args!r})\n"
        "print('RESULT ' + json.dumps(result))"
    )
    flags = quick_xla_flags()
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "XLA_FLAGS": flags, "KERAS_BACKEND": name},
        )
        for name in BACKENDS
    }
    results = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            process.kill()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert process.returncode == 0 and lines, f"{name}: {stderr[-3000:]}"
        results[name] = json.loads(lines[-1].removeprefix("RESULT "))
    return results


def start_cli(module: str, *args, env=None, output=subprocess.DEVNULL) -> subprocess.Popen:
    """`python -m MODULE ARGS` in the background, in its own process group (so that a
    test can signal it and everything it started, as Ctrl-C would)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        stdout=output,
        stderr=output,
        start_new_session=True,
        env=env,
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


# 4 epochs of a tiny model on 200 images; ASHA may stop trials after epoch 1 or 2. A
# checkpoint every epoch (not by time, the default): the resume and fault tests count on it.
TINY_STUDY = {
    "data": {"dataset": "cifar10", "train_subset": 200, "test_subset": 50, "validation_size": 50},
    "model": {"width": 0.0625},
    # A checkpoint every epoch, whatever the default cadence: the fault and resume tests
    # count on it.
    "training": {"epochs": 4, "batch_size": 50, "eval_batch_size": 100, "checkpoint_every": 1},
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
    """TINY_STUDY as a config file, with `search` keys replaced (None writes null)."""
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
        kill_marked("RAY_TMPDIR", temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_env():
    with isolated_ray() as env:
        yield env


# Ray clusters started with `ray start`, and waiting on a study that runs elsewhere.
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster(ray_env):
    """Starts Ray nodes with `ray start`; ray_env kills them (and only them) afterwards.
    `marker` tags a node's processes (its environment) so that a test can kill that node."""

    def start(*args, marker: str = ""):
        # Nodes joining a cluster send its token only when told to (as on a real cluster).
        env = {**ray_env, "RAY_AUTH_MODE": "token", "STUDY_TEST_NODE": marker}
        done = subprocess.run(
            [RAY, "start", *args, "--disable-usage-stats"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    return start


@pytest.fixture
def two_nodes(ray_cluster, ray_env) -> str:
    """A head and a second node (its processes marked STUDY_TEST_NODE=second), one CPU
    each, on this machine; returns the head's address once both have registered."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_cluster("--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false")
    ray_cluster(
        f"--address={address}",
        "--num-cpus=1",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--min-worker-port=20000",
        "--max-worker-port=20999",
        marker="second",
    )
    wait_for_nodes(address, 2, ray_env)
    return address


def marked(variable: str, value: str) -> dict[int, str]:
    """Every process whose environment has VARIABLE=VALUE: its command line, by pid."""
    marker = f"{variable}={value}\0".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(proc.name)] = command.decode(errors="replace").strip()
        except OSError:
            continue
    return found


def kill_marked(variable: str, value: str) -> int:
    """SIGKILLs every process whose environment has VARIABLE=VALUE; returns how many."""
    killed = 0
    for pid in marked(variable, value):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def wait_for_nodes(address: str, count: int, env: dict) -> None:
    """`ray start` returns before a joining node has registered with the head."""
    code = (
        f"import ray, time; ray.init(address='{address}', log_to_driver=False)\n"
        "for _ in range(120):\n"
        f"    if sum(n['Alive'] for n in ray.nodes()) >= {count}: break\n"
        "    time.sleep(1)\n"
        "else: raise SystemExit(1)"
    )
    env = {**env, "RAY_AUTH_MODE": "token"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=180).returncode == 0


@contextlib.contextmanager
def http_server(folder: Path):
    """Serves `folder` over HTTP on 127.0.0.1 in a thread; yields the base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(predicate, timeout=300, interval=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("the study did not get there in time")


def saved_state(folder: Path) -> dict:
    """Tune's saved experiment state, per trial: (status, last epoch, that epoch's
    checkpoint folder, the epoch of the checkpoint Tune has registered: the one it restores
    the trial from). Empty while there is none or it is being replaced: read it again."""
    found = sorted(folder.glob("experiment_state-*.json"))
    try:
        state = json.loads(found[-1].read_text()) if found else {"trial_data": []}
    except (json.JSONDecodeError, OSError):
        return {}
    trials = {}
    for trial, metadata in state["trial_data"]:
        trial, metadata = json.loads(trial), json.loads(metadata)
        result = metadata["last_result"]
        # Tune keeps its checkpoint manager pickled (with Ray's encoder) in the state.
        manager = pickle.loads(bytes.fromhex(metadata["checkpoint_manager"]["value"]))
        registered = manager.latest_checkpoint_result
        trials[trial["trial_id"]] = (
            trial["status"],
            result.get("epoch"),
            result.get("checkpoint_dir_name"),
            registered.metrics.get("epoch") if registered else None,
        )
    return trials


def read_trials(folder: Path, name="trials.csv") -> pd.DataFrame:
    """A study's table as it stands (it is replaced atomically, so always whole)."""
    try:
        return pd.read_csv(folder / name, dtype={"trial_id": str})
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["trial_id", "status", "epochs_run"])

"""Each program compiles once per trial, and a node's compilation cache serves the next
trial of the same programs (study/backend.py: `use_compilation_cache`), counted on JAX on
this CPU through JAX's own monitoring events rather than timed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from study import synthetic

from .conftest import REPO, quick_xla_flags, require_jax

# A local trial on JAX whose training split (350 images) and evaluation splits (50
# validation, 100 test images) are no whole number of batches of 32; what compiled, by
# the name of the function, and the cache's own events.
TRIAL = """
import collections, json, os, sys
from pathlib import Path

from jax import monitoring

compiled, events = collections.Counter(), collections.Counter()


def on_duration(event, duration, **info):
    if event == "/jax/core/compile/backend_compile_duration":
        compiled[info.get("fun_name")] += 1


monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(lambda event, **info: events.update([event]))

from study import data as data_lib
from study.config import load_config
from study.local import run_local

tarball, run_dir, seed = sys.argv[1:]
config = load_config(None, [
    "data.dataset=cifar10", "model.width=0.0625", "data.validation_size=50",
    "training.batch_size=32", "training.eval_batch_size=32", "training.epochs=3",
    f"seed={seed}",
])
summary = run_local(config, data_lib.load_cifar("cifar10", tarball), Path(run_dir), echo=print)
print("RESULT " + json.dumps({"compiled": compiled, "events": events, **summary}))
"""


def _trial(tmp_path: Path, tarball: Path, name: str, seed: int) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": quick_xla_flags(),
        "STUDY_COMPILATION_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-c", TRIAL, str(tarball), str(tmp_path / name), str(seed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _entries(tmp_path: Path) -> set[str]:
    return {path.name for path in (tmp_path / "cache" / "jax").iterdir()}


def test_each_program_compiles_once_and_a_second_trial_reads_them_from_the_cache(tmp_path):
    require_jax()
    tarball = synthetic.write_cifar(tmp_path / "cifar-10-python.tar.gz", "cifar10", 40, 10)
    first = _trial(tmp_path, tarball, "first", seed=0)
    assert first["status"] == "completed" and first["epochs_run"] == 3
    # One training program and one evaluation program (validation and test alike), each
    # compiled once: no partial batch compiles a second one.
    assert first["compiled"]["jit(train_step)"] == 1
    assert first["compiled"]["jit(test_step)"] == 1
    assert all(count <= 13 for count in first["compiled"].values())  # Small ops, by shape.
    misses = first["events"]["/jax/compilation_cache/cache_misses"]
    assert misses == sum(first["compiled"].values()) and "cache_hits" not in json.dumps(first)
    entries = _entries(tmp_path)
    assert entries

    # The same programs again (another seed, as a confirmation's runs have): every one read
    # from the cache, none compiled, nothing added to it.
    second = _trial(tmp_path, tarball, "second", seed=1)
    assert second["status"] == "completed"
    assert second["events"]["/jax/compilation_cache/cache_hits"] == misses
    assert "/jax/compilation_cache/cache_misses" not in second["events"]
    assert _entries(tmp_path) == entries

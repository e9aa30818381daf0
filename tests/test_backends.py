"""The trial on each Keras backend: the GPU's settings compile for real, JAX trains like
TensorFlow, and what workers and devices are told."""

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from study import backend, synthetic
from study.config import ConfigError

from .conftest import (
    BACKENDS,
    REPO,
    on_backends,
    python_json,
    quick_xla_flags,
    require_jax,
    run_cli,
    shared_sample,
)

# Each loss once; batch norm x augmentation, the two parts of the model that change what
# compiles, spread over them so that each combination is there.
COMPILE_CASES = {
    "categorical_crossentropy": (False, False),
    "focal": (True, False),
    "mean_squared_error": (False, True),
    "mean_squared_logarithmic_error": (True, True),
    "hinge": (False, False),
    "squared_hinge": (True, False),
    "categorical_hinge": (False, True),
}


FLOAT16_CASE = "mean_squared_logarithmic_error"  # With batch norm and augmentation.


def compiled_training() -> dict:
    """Every case trained with the GPU's settings forced on this CPU, under the mixed
    policy that the trial chooses; and one under float16, older GPUs' policy."""
    chosen = {loss: _forced_training(loss, *options) for loss, options in COMPILE_CASES.items()}
    float16 = _forced_training(FLOAT16_CASE, *COMPILE_CASES[FLOAT16_CASE], "mixed_float16")
    return {"chosen": chosen, "float16": float16}


def _forced_training(loss, batch_norm, augment, policy=None) -> dict:
    """Mixed precision, jit and 2 steps per execution on CPU, 4 training steps: what
    compiled, in which dtypes, and the loss of each execution."""
    import warnings

    import keras

    from study.config import load_config
    from study.losses import target_table
    from study.pipeline import Batches
    from study.trainable import compile_for_devices, configure_devices

    config = load_config(
        None,
        [
            "data.dataset=cifar10", "model.width=0.0625", f"loss.name={loss}",
            f"model.batch_norm={batch_norm}", f"model.augment={augment}",
            "training.mixed_precision=true", "training.jit_compile=true",
            "training.steps_per_execution=2", "training.batch_size=8",
        ],
    )  # fmt: skip
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    devices = configure_devices(config)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    batches = Batches(images, np.arange(32) % 10, 8, target_table(config.loss, 10), seed=0)
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = compile_for_devices(config, len(batches), devices)
            model.fit(batches, epochs=1, callbacks=[record], shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "jit_compile": model.jit_compile,
        "fallback_warnings": [str(w.message) for w in caught if "jit_compile" in str(w.message)],
        "conv_dtype": model.get_layer("block1_conv1").compute_dtype,
        "head_dtype": model.layers[-1].compute_dtype,
        "output_dtype": str(model.outputs[0].dtype),
        "loss_scaled": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
        "losses": losses,
    }


@pytest.fixture(scope="module")
def compiled():
    return on_backends(__name__, "compiled_training")


@pytest.mark.parametrize("loss", COMPILE_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_settings_compile_every_loss_and_model_option(compiled, backend, loss):
    result = compiled[backend]["chosen"][loss]
    # Compilation stays on: no silent fallback (Keras would turn jit_compile off and warn).
    assert result["jit_compile"] is True and result["fallback_warnings"] == []
    assert result["conv_dtype"] == "bfloat16"  # Mixed precision (bfloat16 off a GPU) ...
    assert result["head_dtype"] == result["output_dtype"] == "float32"  # ... but the head.
    # 4 steps at 2 per execution: 2 executions, each with a finite loss.
    assert len(result["losses"]) == 2 and all(map(math.isfinite, result["losses"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_trains_with_loss_scaling(compiled, backend):
    """The policy of GPUs older than Ampere: float16, with Keras's loss scaling (one case,
    with batch norm and augmentation)."""
    result = compiled[backend]["float16"]
    assert result["conv_dtype"] == "float16" and result["head_dtype"] == "float32"
    assert result["loss_scaled"] and result["jit_compile"]
    assert all(map(math.isfinite, result["losses"]))


def fixed_seed_trial() -> list[float]:
    """Validation accuracy by epoch of a fixed-seed trial on the synthetic set."""
    from study import data as data_lib
    from study.config import load_config
    from study.trainable import train_and_evaluate

    class Sink:
        def __init__(self):
            self.reports = []

        def report(self, metrics, checkpoint):
            self.reports.append(metrics)

    folder = Path(tempfile.mkdtemp())
    path = synthetic.write_cifar(folder / "cifar-10-python.tar.gz", "cifar10", 40, 10, seed=7)
    config = load_config(
        None,
        [
            "data.dataset=cifar10", "data.validation_size=100", "model.width=0.125",
            "training.epochs=4", "training.batch_size=32",
        ],
    )  # fmt: skip
    sink = Sink()
    train_and_evaluate(config, data_lib.load_cifar("cifar10", path), sink, evaluate_test=False)
    return [metrics["val_accuracy"] for metrics in sink.reports]


@pytest.mark.slow
def test_a_diverging_trial_on_jax_ends_diverged_rather_than_crashing(tmp_path):
    """On JAX, stopping the run from Keras's per-step hook (which runs on a helper thread)
    synced the model's state while the next step had taken its buffers: a trial that
    diverged crashed with "Array has been deleted" (in every run here) instead of ending
    as diverged. SGD at 0.09 on the real CIFAR-10 sample diverges after some 15 steps."""
    require_jax()
    path = shared_sample("cifar-10-sample.tar.gz")
    values = [
        "data.dataset=cifar10", "data.validation_size=500", "model.width=0.125",
        "optimizer.name=sgd", "optimizer.learning_rate=0.0917", "training.batch_size=64",
        "training.epochs=2",
    ]  # fmt: skip
    result = run_cli(
        "study.run", "--local", "--data-dir", path, *(a for v in values for a in ("--set", v)),
        "--storage-path", tmp_path, "--name", "diverging",
        env={**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": quick_xla_flags()},
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "diverged: non-finite loss in epoch 1" in result.stderr
    assert "Array has been deleted" not in result.stderr


def test_jax_trains_like_tensorflow():
    """The same trial (seed, data, order) on both backends ends within 0.05 validation
    accuracy; both learn far above the 10% of chance."""
    runs = on_backends(__name__, "fixed_seed_trial")
    assert all(len(accuracies) == 4 for accuracies in runs.values())
    tensorflow, jax = runs["tensorflow"][-1], runs["jax"][-1]
    assert tensorflow > 0.8 and jax > 0.8, runs
    assert abs(jax - tensorflow) <= 0.05, runs


def test_workers_get_the_drivers_backend_and_jax_memory_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert backend.worker_env() == {"KERAS_BACKEND": "jax"}
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # The user's setting goes too.
    assert backend.worker_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    # A trial's own: no preallocation (trials may share a GPU), and its share of the GPU.
    assert backend.jax_memory_env(0.25) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225",
    }
    assert backend.jax_memory_env(1.0) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    # Without KERAS_BACKEND, Keras's own config file decides, as in Keras.
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert backend.configured_name() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert backend.configured_name() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(ConfigError, match="KERAS_BACKEND: 'torch' is not supported; allowed"):
        backend.configured_name()


@pytest.mark.parametrize("name", BACKENDS)
def test_a_worker_imports_keras_without_the_packages_no_trial_uses(name):
    """A Ray worker (KERAS_BACKEND set) imports the trial without scikit-learn, which
    Keras imports for its wrappers, matplotlib, for its image gallery, nor, on TensorFlow,
    JAX, which TensorFlow's TFLite converter imports; all still import afterwards, and
    Keras still trains."""
    require_jax()
    code = (
        "import sys, numpy as np\n"
        "import study.trainable, keras\n"
        "print(sorted({'sklearn', 'matplotlib', 'jax'} & set(sys.modules)))\n"
        "model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "model.compile('sgd', 'mse')\n"
        "model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)\n"
        "import sklearn.base, matplotlib.pyplot, jax\n"
        "print(keras.backend.backend(), keras.__spec__.loader is keras.__loader__)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": name}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    kept = "['jax']" if name == "jax" else "[]"  # JAX's backend imports JAX, of course.
    assert done.stdout.splitlines() == [kept, f"{name} True"]


def test_a_study_driver_leaves_scipy_until_the_confirmation_needs_it():
    """A study's driver imports the analysis code (its closing comparison) but computes no
    interval; SciPy (about 0.9 s of CPU at each study's start) loads only when one is."""
    code = (
        "import json, sys\n"
        "import study.run, study.tuning, study.callbacks, study.confirm, analysis.results\n"
        "before = 'scipy' in sys.modules\n"
        "from study import stats\n"
        "interval = stats.mean_interval([1.0, 2.0, 3.0])\n"
        "print(json.dumps([before, interval, 'scipy' in sys.modules]))\n"
    )
    before, interval, after = python_json(code)
    assert (before, after) == (False, True)
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2 df) times the standard error of 1, 2, 3.
    assert interval == pytest.approx([2.0, 2.0 - half, 2.0 + half], abs=1e-5)


def test_mixed_precision_is_bfloat16_from_ampere_on():
    assert backend.mixed_policy((9, 0)) == backend.mixed_policy((8, 0)) == "mixed_bfloat16"
    assert backend.mixed_policy((7, 5)) == "mixed_float16"  # Turing: float16, loss scaling.
    assert backend.mixed_policy(None) == "mixed_bfloat16"  # CPU


def test_an_unsupported_backend_is_refused_before_any_work(tmp_path, cifar10_tarball):
    import os

    env = {**os.environ, "KERAS_BACKEND": "torch"}
    result = run_cli(
        "study.run", "--local", "--config", "configs/smoke.yaml", "--data-dir", cifar10_tarball,
        "--storage-path", tmp_path, "--name", "torch", env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: KERAS_BACKEND: 'torch' is not supported; allowed: tensorflow, jax"
    )
    assert not (tmp_path / "torch").exists()


def test_a_trial_under_ray_takes_its_share_of_the_gpu(monkeypatch):
    """On JAX, a trial that Ray gave a quarter of a GPU caps its memory at that share."""

    class Context:
        actor_id = "a trial's actor"

        def get_actor_id(self):
            return self.actor_id

        def get_assigned_resources(self):
            return {"CPU": 1.0, "GPU": 0.25}

    class FakeRay:
        def is_initialized(self):
            return True

        def get_runtime_context(self):
            return Context()

    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    assert backend._ray_gpu_share() == 0.25
    Context.actor_id = None  # The driver: no share of its own.
    assert backend._ray_gpu_share() is None
    monkeypatch.delitem(sys.modules, "ray")
    assert backend._ray_gpu_share() is None  # Not under Ray: the trial has the whole GPU.

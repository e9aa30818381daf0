"""The one place that knows which Keras backend runs: devices, memory, precision, input.

Everything else in the study is plain Keras (`keras.ops`, `model.fit`, a `PyDataset`), so
a trial runs on TensorFlow (the default) or on JAX (`KERAS_BACKEND=jax`, Keras's own
switch). `configured_name` and `worker_env` do not import Keras, so that the study's
driver, which never imports TensorFlow, can call them.
"""

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from study.config import ConfigError

DEFAULT = "tensorflow"
SUPPORTED = ("tensorflow", "jax")
# Of a trial's share of a GPU, the part that JAX may allocate: every process also holds a
# CUDA context outside JAX's allocator.
JAX_MEMORY_HEADROOM = 0.9
JAX_MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def configured_name() -> str:
    """The backend that Keras picks in a new process, found as Keras finds it but without
    importing it: $KERAS_BACKEND, else keras.json in $KERAS_HOME (~/.keras), else
    TensorFlow. Refuses backends that the study is not tested on."""
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
        try:
            name = json.loads((home / "keras.json").read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    return _supported(name or DEFAULT)


def _supported(name: str) -> str:
    if name not in SUPPORTED:
        allowed = ", ".join(SUPPORTED)
        raise ConfigError(f"KERAS_BACKEND: {name!r} is not supported; allowed: {allowed}")
    return name


# Where a node keeps the programs its trials compile (a folder per backend); "off": nowhere.
CACHE_VARIABLE = "STUDY_COMPILATION_CACHE"
DEFAULT_CACHE = Path("~/.cache/study/xla")
CACHE_MAX_BYTES = 10 * 2**30  # JAX's share; it evicts the least recently used beyond it.


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def compilation_cache() -> Path | None:
    """This node's compilation cache: $STUDY_COMPILATION_CACHE, else ~/.cache/study/xla;
    None where that says off."""
    value = os.environ.get(CACHE_VARIABLE, str(DEFAULT_CACHE)).strip()
    if value.lower() in ("", "off", "none", "0", "false"):
        return None
    return Path(value).expanduser()


def use_compilation_cache(name: str) -> Path | None:
    """Makes this process read and write compiled programs in the node's cache, before it
    compiles any: each trial of a study then compiles a program only where no trial on
    this node has compiled the same one (its shapes, and the settings compiled into it,
    such as its learning-rate schedule and dropout rates: a restarted or resumed trial, a
    confirmation's seeds, a study run again). JAX caches every program that took longer
    than its threshold to compile (made 0 here, unless set); TensorFlow caches what XLA
    compiles for a GPU (its CPU programs are compiled for the exact processor and not
    cached)."""
    root = compilation_cache()
    if root is None:
        return None
    folder = root / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # A read-only home, say: compile as if there were no cache.
        print(f"warning: no compilation cache at {folder}: {error.strerror}", file=sys.stderr)
        return None
    if name == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir", str(folder))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and _has("filelock"):
            # Least recently used entries go first (JAX needs filelock for that).
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
        return folder
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in flags:
        cache = (
            f"--tf_xla_persistent_cache_directory={folder} "
            "--tf_xla_persistent_cache_device_types=GPU"
        )
        os.environ["TF_XLA_FLAGS"] = f"{flags} {cache}".strip()  # Read at XLA's first use.
    return folder


def jax_memory_env(gpu_share: float | None = None) -> dict[str, str]:
    """JAX's memory settings for one trial: no whole-GPU preallocation (trials may share a
    GPU), and a cap at the trial's share of the GPU where it has only part of one."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if gpu_share and gpu_share < 1:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{JAX_MEMORY_HEADROOM * gpu_share:.3f}"
    return env


def worker_env() -> dict[str, str]:
    """The environment every Ray worker of a study gets: the driver's Keras backend, and
    JAX memory settings and the compilation cache's folder where the user set them (else
    each trial picks its own)."""
    variables = (*JAX_MEMORY_VARIABLES, CACHE_VARIABLE)
    passed = {key: os.environ[key] for key in variables if key in os.environ}
    return {"KERAS_BACKEND": configured_name(), **passed}


@dataclass(frozen=True)
class Devices:
    """What this process computes on."""

    backend: str
    gpus: int
    gpu_names: tuple[str, ...] = ()
    # The first GPU's CUDA compute capability, such as (9, 0); None without a GPU.
    capability: tuple[int, int] | None = None


def configure(gpu_share: float | None = None) -> Devices:
    """Prepares this process's devices before the backend first touches one: TensorFlow
    grows GPU memory as needed instead of taking it all; JAX gets `jax_memory_env` for
    `gpu_share`, by default the share of a GPU that Ray gave this trial."""
    import keras

    name = _supported(keras.backend.backend())
    use_compilation_cache(name)
    if name == "tensorflow":
        return _tensorflow_devices()
    share = _ray_gpu_share() if gpu_share is None else gpu_share
    for key, value in jax_memory_env(share).items():
        os.environ.setdefault(key, value)  # Read when JAX first starts its GPU client.
    return _jax_devices()


def _ray_gpu_share() -> float | None:
    """The GPUs that Ray assigned this process's trial (0.25: a quarter of one), if it runs
    in a Ray worker. Ray is not imported here: a trial under Ray has imported it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # The driver: resources are assigned to trials only.
        return None
    return context.get_assigned_resources().get("GPU")


def _tensorflow_devices() -> Devices:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # RuntimeError: already set up by an earlier trial in this process.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
    capability = details[0].get("compute_capability") if details else None
    return Devices(
        backend="tensorflow",
        gpus=len(gpus),
        gpu_names=tuple(d.get("device_name", "GPU") for d in details),
        capability=tuple(capability) if capability else None,
    )


def _jax_devices() -> Devices:
    import jax

    gpus = [device for device in jax.devices() if device.platform in ("gpu", "cuda", "rocm")]
    capability = getattr(gpus[0], "compute_capability", None) if gpus else None
    if isinstance(capability, str):  # "9.0"
        capability = tuple(int(part) for part in capability.split(".")[:2])
    return Devices(
        backend="jax",
        gpus=len(gpus),
        gpu_names=tuple(device.device_kind for device in gpus),
        capability=capability,
    )


def fit_input(batches) -> tuple[object, list]:
    """What `model.fit` (or `evaluate`) reads for `batches`, and the callbacks it needs:
    the same batches, in the same order, on every backend. JAX reads the PyDataset; on
    TensorFlow, where Keras would feed a PyDataset through a Python generator at half
    tf.data's rate, tf.data gathers the rows that the batches choose."""
    import keras

    from study.pipeline import FollowEpochs

    callbacks = [] if batches.seed is None else [FollowEpochs(batches)]
    if keras.backend.backend() != "tensorflow":
        return batches, callbacks
    return _tf_dataset(batches), callbacks


def _tf_dataset(batches):
    """`batches` as tf.data: one batch per index, its rows from the batches (the current
    epoch's order), gathered by TensorFlow. A fresh pass each epoch, of known length."""
    import numpy as np
    import tensorflow as tf

    images, labels = tf.constant(batches.images), tf.constant(batches.labels)
    targets, count = tf.constant(batches.targets), len(batches.labels)

    def rows(index):
        return np.arange(count, dtype=np.int64)[batches.rows(int(index))]

    def gather(index):
        chosen = tf.ensure_shape(tf.numpy_function(rows, [index], tf.int64), [size])
        batch = tf.gather(images, chosen), tf.gather(targets, tf.gather(labels, chosen))
        if batches.training:
            return batch
        weights = tf.numpy_function(batches.sample_weights, [index], tf.float32)
        return (*batch, tf.ensure_shape(weights, [size]))

    size = batches.batch_size  # Every batch is whole (study.pipeline.Batches).
    indices = tf.data.Dataset.range(len(batches))
    return indices.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def mixed_policy(capability: tuple[int, int] | None) -> str:
    """Mixed precision's Keras policy: bfloat16 where the GPU computes it natively (compute
    capability 8.0, Ampere, and newer) and on CPU; float16, which Keras trains with loss
    scaling, on older GPUs."""
    if capability is not None and tuple(capability) < (8, 0):
        return "mixed_float16"
    return "mixed_bfloat16"


def peak_memory_bytes() -> int | None:
    """The most GPU memory this process's backend has held at once; None without a GPU."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        stats = [device.memory_stats() or {} for device in jax.local_devices()]
        peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
        return max(peaks) if peaks else None
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"]


def versions() -> dict[str, str]:
    """Keras and its backend's versions, for benchmark tables."""
    import keras

    name = keras.backend.backend()
    module = __import__(name)
    return {"backend": name, name: module.__version__, "keras": keras.__version__}


def set_threads(intra: int, inter: int) -> None:
    """TensorFlow's CPU thread pools, before it runs anything; JAX has no such setting."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError("--threads: only the TensorFlow backend has thread settings")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)


def threads() -> dict[str, int]:
    """TensorFlow's thread settings (0 is its default: as many as cores); empty on JAX."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return {}
    import tensorflow as tf

    return {
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }

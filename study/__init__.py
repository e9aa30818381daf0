"""The study: a Ray Tune search over the losses and hyper-parameters of a Keras CNN.

One thing happens in every process that imports the study, before its first
`import keras`: Keras's import is made to skip three optional packages that no trial uses.
Keras imports scikit-learn for `keras.wrappers` (about 0.9 s of CPU) and matplotlib for
`keras.visualization` (about 0.5 s), and TensorFlow's TFLite converter imports JAX (about
0.5 s) where JAX is installed. Every trial is a new Ray worker process, so every trial
paid for them. While Keras's own import runs they are absent (JAX only where the worker's
backend is TensorFlow); afterwards they import as usual. The one loss: in such a process,
`keras.wrappers`' scikit-learn classes and `keras.visualization`'s plots say that their
package is not installed.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import sys


@contextlib.contextmanager
def packages_absent(*names: str):
    """While it runs, `names` import as not installed (None in sys.modules, which Python's
    import reads so); those already loaded are left as they are."""
    absent = [name for name in names if name not in sys.modules]
    sys.modules.update(dict.fromkeys(absent))
    try:
        yield
    finally:
        for name in absent:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def _unused_by_trials() -> list[str]:
    unused = ["sklearn", "matplotlib"]
    if os.environ.get("KERAS_BACKEND") == "tensorflow":  # Set for every Ray worker.
        unused.append("jax")
    return unused


class _LeanKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `keras` as Python would, then runs its import with the unused packages
    absent."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)  # Keras is imported once per process.
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            with packages_absent(*_unused_by_trials()):
                self.loader.exec_module(module)
        finally:
            module.__loader__ = module.__spec__.loader = self.loader


if "keras" not in sys.modules:
    sys.meta_path.insert(0, _LeanKeras())

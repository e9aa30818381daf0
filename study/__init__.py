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

import importlib.abc
import importlib.util
import os
import sys


def _unused_by_trials() -> list[str]:
    unused = ["sklearn", "matplotlib"]
    if os.environ.get("KERAS_BACKEND") == "tensorflow":  # Set for every Ray worker.
        unused.append("jax")
    return [name for name in unused if name not in sys.modules]


class _LeanKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `keras` as Python would, then runs its import with the unused packages marked
    absent (None in sys.modules, which Python's import reads as not installed)."""

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
        absent = _unused_by_trials()
        sys.modules.update(dict.fromkeys(absent))
        try:
            self.loader.exec_module(module)
        finally:
            for name in absent:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
            module.__loader__ = module.__spec__.loader = self.loader


if "keras" not in sys.modules:
    sys.meta_path.insert(0, _LeanKeras())

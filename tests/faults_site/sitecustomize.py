"""Fault injection for the tests, loaded by every Python process of a test's Ray cluster
(its folder is put on PYTHONPATH): with STUDY_TEST_DIE_SAVING_EPOCH=N and
STUDY_TEST_DIE_MARKER=PATH, the first trial worker that Tune asks to save the checkpoint
of epoch N dies there (SIGKILL-like, os._exit), once: after the epoch's result has reached
the driver, before Tune has that checkpoint. Nothing here runs without the variables."""

import importlib.abc
import importlib.util
import os
import sys

EPOCH = os.environ.get("STUDY_TEST_DIE_SAVING_EPOCH")
MARKER = os.environ.get("STUDY_TEST_DIE_MARKER")
TARGET = "ray.tune.trainable.trainable"


def _patch(module) -> None:
    save = module.Trainable.save

    def dying_save(self, *args, **kwargs):
        last = getattr(self, "_last_result", None) or {}
        if str(last.get("epoch")) == EPOCH:
            try:
                descriptor = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return save(self, *args, **kwargs)
            os.write(descriptor, str(os.getpid()).encode())
            os.close(descriptor)
            os._exit(9)
        return save(self, *args, **kwargs)

    module.Trainable.save = dying_save


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader
        _patch(module)


if EPOCH and MARKER:
    sys.meta_path.insert(0, _AfterImport())

"""Builders of hostile and damaged CIFAR files, for the tests that check they are refused:
pickles that run code when a plain unpickler reads them, and tarballs with a member
replaced, missing, or of another kind."""

import io
import os
import tarfile
from pathlib import Path

from study import synthetic


class Reduces:
    """Unpickling calls `function(*args)` (what a plain pickle.load would do)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def touch_code(marker: Path) -> str:
    """Python source that creates `marker`: proof that it ran."""
    return f"open({str(marker)!r}, 'w').close()"


def runs_code(marker: Path) -> Reduces:
    """Unpickling runs `touch MARKER` through os.system."""
    return Reduces(os.system, f"touch {marker}")


def evaluates(marker: Path) -> Reduces:
    """Unpickling evaluates Python that creates MARKER."""
    return Reduces(eval, touch_code(marker))


def member(path: Path, name: str) -> bytes:
    """One member of a tarball, as bytes."""
    with tarfile.open(path) as archive:
        return archive.extractfile(name).read()


def replace_member(source: Path, target: Path, name: str, blob: bytes) -> Path:
    """A copy of the tarball `source` at `target`, with member `name` holding `blob`."""
    with tarfile.open(source) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    members[name] = blob
    return synthetic.write_tarball(target, members)


def write_tar(path: Path, members: dict, mode="w:gz", kinds=None) -> Path:
    """A tarball whose members are files, or of another kind (`kinds`: name -> TarInfo type)."""
    with tarfile.open(path, mode) as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            kind = (kinds or {}).get(name)
            if kind is None:
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
            else:
                info.type, info.linkname = kind, "/etc/passwd"
                archive.addfile(info)
    return path

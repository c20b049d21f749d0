"""Output folders owned by one run: a manifest says which recipe's outputs a folder holds, a lock keeps a
second run out while one writes, and a finished run removes what its predecessor left that it did not
write again, so a report never sits beside a model from another run.

Rules (``claim``):
* an empty or new folder, or one holding only other people's files, is taken;
* a folder whose manifest names the same recipe (its name and model) is taken again: that is an
  edited recipe re-run, or ``--resume``;
* a folder holding another recipe's outputs, or torchshrink outputs with no manifest, is refused
  unless ``force``, which first deletes that run's outputs (never files it did not write);
* a folder another live run holds the lock of is refused (the lock is on the folder itself and
  dies with its process).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchshrink._version import __version__
from torchshrink.errors import OutputPathError
from torchshrink.io import prepare_output_folder, write_json_atomic

try:  # POSIX advisory locks; released by the kernel when the holding process dies
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_FILE", "OutputFolder", "claim"]

MANIFEST_FILE = "torchshrink-run.json"
RUN_DIRS = (".checkpoints", ".work", ".cache")
KNOWN_OUTPUTS = ("report.json", "report.md", "pareto.png", "model.safetensors", "model.onnx", "model.tshrink")
"""What a run writes by default: in a folder without a manifest, these mark an unknown run's outputs."""


def describe(owner: dict[str, Any]) -> str:
    return f"recipe {owner.get('recipe')!r} on model {json.dumps(owner.get('model'), sort_keys=True)}"


@dataclass
class OutputFolder:
    """A claimed (checked and locked) output folder. Nothing in it changes until :meth:`begin`, so a
    run that stops at bad input leaves it as it was; :meth:`finish` records what the run wrote and
    :meth:`release` unlocks it."""

    path: Path
    owner: dict[str, Any]
    previous_files: list[str] = field(default_factory=list)
    replaced: list[str] | None = None
    """With ``force``: the other run's files, deleted by :meth:`begin`."""
    _lock: int | None = None

    def begin(self, will_write: Iterable[str] = ()) -> None:
        """The run is about to write: delete a forced-out run's outputs, record this run as running
        with the files it will write (so a crash leaves none of them unaccounted for)."""
        if self.replaced is not None:
            log.warning("--force: deleting the earlier run's outputs from %s", self.path)
            _clear(self.path, self.replaced)
            self.replaced = None
        self.previous_files = sorted({*self.previous_files, *map(str, will_write)})
        _write_manifest(self.path, self.owner, "running", self.previous_files)

    def finish(self, files: Iterable[str]) -> None:
        """Record the run's files and delete those the previous run wrote and this one did not."""
        written = sorted({str(f) for f in files})
        for name in sorted(set(self.previous_files) - set(written)):
            stale = _inside(self.path, name)
            if stale is not None and stale.is_file():
                stale.unlink()
                log.info("removed %s: an earlier run into %s wrote it, this one did not", stale, self.path)
        _write_manifest(self.path, self.owner, "finished", written)

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None


def _inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` if it lies inside ``folder`` (a manifest is data: it may not point elsewhere)."""
    target = (folder / name).resolve()
    return target if target.is_relative_to(folder.resolve()) and target != folder.resolve() else None


def _exists(folder: Path, name: str) -> bool:
    target = _inside(folder, name)
    return target is not None and target.exists()


def _write_manifest(folder: Path, owner: dict[str, Any], status: str, files: list[str]) -> None:
    write_json_atomic(
        folder / MANIFEST_FILE,
        {
            "owner": owner,
            "status": status,
            "files": files,
            "torchshrink_version": __version__,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("owner"), dict):
            raise ValueError("no owner")
        files = manifest.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("files is not a list of names")
        return manifest
    except (OSError, ValueError) as exc:
        raise OutputPathError(
            folder, f"its run manifest {MANIFEST_FILE} is unreadable ({exc})", "delete it, or pass --force"
        ) from None


def _lock(folder: Path) -> int | None:
    """An exclusive lock on the folder itself (no lock file is left behind)."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputPathError(
            folder,
            "another torchshrink run is writing into it",
            "wait for it to finish, or choose another --out",
        ) from None
    except OSError as exc:  # a file system without flock (some NFS, FUSE, Lustre mounts)
        os.close(fd)
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            log.warning("%s: cannot be locked (%s); a second run into it would not be refused", folder, exc)
            return None
        raise OutputPathError(folder, f"cannot be locked ({exc})", "choose another --out") from None
    return fd


def _clear(folder: Path, files: Iterable[str]) -> None:
    for name in files:
        target = _inside(folder, name)
        if target is not None and target.is_file():
            target.unlink()
    for name in RUN_DIRS:
        shutil.rmtree(folder / name, ignore_errors=True)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)


def claim(path: str | Path, owner: dict[str, Any], *, force: bool = False) -> OutputFolder:
    """Check and lock ``path`` for a run of ``owner`` (see the module's rules) before any work; the
    folder is created if missing, otherwise left unchanged until :meth:`OutputFolder.begin`."""
    folder = prepare_output_folder(path)
    lock = _lock(folder)
    try:
        try:
            manifest = _read_manifest(folder)
        except OutputPathError:
            if not force:
                raise
            manifest = None  # an unreadable manifest: an unknown run, whose outputs --force deletes
        holds_work = any((folder / n).exists() for n in RUN_DIRS[:2])
        what, old_files = "", []
        if manifest is not None and manifest["owner"] != owner:
            if holds_work or any(_exists(folder, f) for f in manifest.get("files", [])):
                what = f"the outputs of another run ({describe(manifest['owner'])})"
                old_files = list(manifest.get("files", []))
        elif manifest is None and (holds_work or any((folder / n).exists() for n in KNOWN_OUTPUTS)):
            what, old_files = "torchshrink outputs of an unknown run (no manifest)", list(KNOWN_OUTPUTS)
        if what and not force:
            raise OutputPathError(
                folder,
                f"--out holds {what}, and this is {describe(owner)}",
                "choose another --out, or pass --force to delete those outputs and write there",
            )
        same = manifest is not None and manifest["owner"] == owner
        previous = list(manifest.get("files", [])) if same else []
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return OutputFolder(folder, owner, previous, old_files if what else None, lock)

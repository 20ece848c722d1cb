"""Replacing a folder by a freshly written one so that a crash at any point leaves the last good copy.

The swap is two renames: ``destination`` → ``.<name>.old``, then ``staging`` → ``destination``, then the old
copy is deleted. A crash between the two renames leaves no ``destination`` and the last good copy in
``.<name>.old``; :func:`recover_folder` (which :func:`replace_folder` calls first) renames it back, so the old
copy is deleted only once a new one is in place.

States a crash can leave, and what the next call does:

* ``destination`` and ``.old`` both exist: the new copy was in place, the old one not yet (fully) deleted:
  the old one is deleted;
* only ``.old`` exists: the crash came between the renames: ``.old`` is the last good copy and is renamed back;
* a stray staging folder: never renamed, so never the only copy; the caller's staging clean-up removes it.

Only the folder's parent changes (renames within one folder), so each step is atomic on POSIX filesystems;
the parent is fsynced after each rename so that the order survives a power cut.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def old_copy(destination: Path) -> Path:
    """Where :func:`replace_folder` keeps the previous copy of ``destination`` during the swap."""
    return destination.with_name(f".{destination.name}.old")


def recover_folder(destination: Path) -> bool:
    """Put the last good copy back when a swap crashed between its renames.

    Returns:
        True when ``destination`` was missing and its old copy was renamed back.
    """
    old = old_copy(destination)
    if destination.exists() or not old.is_dir():
        return False
    old.rename(destination)
    _sync_folder(destination.parent)
    logger.warning("%s was missing after an interrupted export; restored the last good copy from %s", destination, old)
    return True


def replace_folder(staging: Path, destination: Path) -> None:
    """Make ``staging`` (a complete folder beside ``destination``) the new ``destination``, crash-safely.

    Args:
        staging: the new folder, in the same parent folder as ``destination`` (so renames are atomic).
        destination: the folder to replace; need not exist.

    Raises:
        OSError: a rename failed; ``destination`` (or, if the crash came between the renames, its old copy,
            which the next call restores) still holds the last good copy.
    """
    old = old_copy(destination)
    recover_folder(destination)
    if old.exists():  # left by a swap that had put its new copy in place: destination is the good copy
        shutil.rmtree(old)
    if destination.exists():
        destination.rename(old)
        _sync_folder(destination.parent)
    try:
        staging.rename(destination)
    except BaseException:
        try:  # an error, not a kill: put the good copy back now rather than at the next export
            recover_folder(destination)
        except OSError:
            pass  # it stays in the old copy, which the next call restores
        raise
    _sync_folder(destination.parent)
    shutil.rmtree(old, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that the renames in it are durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

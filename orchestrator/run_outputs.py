"""Where a run's outputs live and how they get there, when ``output.dir`` is a URI (``s3://``, ``gs://``).

The run folder ``<output.dir>/<name>`` is then on the bucket, and it is the truth: ``metrics.jsonl``, the W&B
run id, ``final/``, ``best/`` and Ray Train's checkpoints (``<run folder>/ray`` unless ``output.storage_path``
says otherwise). Every process writes into a local *scratch* folder first (this node's cache,
``<ORCHESTRATOR_CACHE>/scratch/<name>-<hash of the URI>``, or ``ORCHESTRATOR_SCRATCH``): an append-only log and
an export are written locally, then uploaded. The scratch is only staging: it may be deleted at any time (a new
node, a wiped disk), and a resume starts from the bucket's copies (:func:`restore_file`).

A reader must never see a half-written ``final/`` or ``best/``. Object stores have no rename, so a folder is
published marker-last (:func:`publish_folder`): the old marker is deleted first (the folder reads as "being
written"), then every file is uploaded, objects of an older export that the new one lacks are deleted, and the
marker (``.export_complete.json``, the file list with sizes) is written last, in one PUT. :func:`is_published`
is what a reader checks. A versioned prefix plus a pointer would keep the old copy readable during the upload,
but then every reader of a model folder (``from_pretrained``, ``orchestrator predict``, the registry) would have
to follow a pointer; with the marker the folder stays a plain Hugging Face folder at a stable URI.

For a local ``output.dir`` nothing here changes anything: the scratch folder is the run folder itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import orchestrator.storage as storage

SCRATCH_ENV = "ORCHESTRATOR_SCRATCH"
EXPORT_MARKER = ".export_complete.json"


def run_folder(output_dir: str, name: str) -> str:
    """The run folder ``<output.dir>/<name>``: a normalised URI, or an absolute local path."""
    if storage.is_uri(output_dir):
        return storage.join(storage.normalize(output_dir), name)
    return str((Path(output_dir).expanduser() / name).resolve())


def scratch_dir(folder: str, *, scratch_root: str | None = None) -> Path:
    """The local folder a run writes into before uploading: the run folder itself when it is local.

    Args:
        folder: the run folder (:func:`run_folder`).
        scratch_root: the root of scratch folders (default: ``ORCHESTRATOR_SCRATCH``, else the node cache's
            ``scratch/``); the driver passes its own to the workers, which may not see its environment.
    """
    if not storage.is_uri(folder):
        return Path(folder)
    uri = storage.normalize(folder)
    root = Path(scratch_root or os.environ.get(SCRATCH_ENV) or storage.cache_root() / "scratch").expanduser()
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]  # two buckets' runs of one name never share a scratch
    return root / f"{storage.name_of(uri)}-{key}"


def remote_child(folder: str, name: str) -> str | None:
    """``<folder>/<name>`` when the run folder is a URI (what gets uploaded there), else None."""
    return storage.join(folder, name) if storage.is_uri(folder) else None


def publish_file(local: Path, destination: str) -> None:
    """Upload one file (a whole object, in one PUT: a reader sees the old or the new copy, never a part)."""
    storage.write_bytes(destination, local.read_bytes())


def restore_file(source: str, local: Path) -> bool:
    """Put the bucket's copy of a run file at ``local`` when the local one is missing or shorter.

    Append-only files (``metrics.jsonl``) grow: the longer copy is the newer. The local copy is longer when this
    node's scratch survived (the bucket's lags by at most one upload interval); the bucket's when the scratch was
    deleted or the run moved to another node.

    Returns:
        Whether the bucket's copy was taken.
    """
    entry = storage.stat(source)
    if entry is None or (local.is_file() and local.stat().st_size >= entry.size):
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    storage.download(source, local)
    return True


def publish_folder(local: Path, destination: str) -> None:
    """Upload the folder ``local`` to ``destination`` marker-last (see the module docstring).

    Raises:
        StorageError: naming ``destination``; the folder then reads as not published (no marker).
    """
    files = {p.relative_to(local).as_posix(): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
    marker = storage.join(destination, EXPORT_MARKER)
    storage.delete(marker)  # from here on, a reader knows the folder is being rewritten
    old = [e.path for e in storage.list_files(destination)]
    storage.upload(local, destination)
    for path in old:
        relative = path[len(storage.normalize(destination)) + 1 :]
        if relative not in files:
            storage.delete(path)
    storage.write_text(marker, json.dumps({"files": files, "published_at": time.time()}, indent=1))


def evict_published_exports(scratch: Path, folder: str, names: tuple[str, ...] = ("final", "best")) -> list[str]:
    """After a run on a bucket: delete the scratch copies of its exports that the bucket holds whole (marker
    there), so a node does not keep a second copy of every model it trained. Never the only copy: an export not
    published (an upload that failed) stays in the scratch for a retry.

    Returns:
        The names evicted.
    """
    import shutil

    evicted = []
    for name in names:
        local = scratch / name
        if storage.is_uri(folder) and local.is_dir() and is_published(storage.join(folder, name)):
            shutil.rmtree(local, ignore_errors=True)
            evicted.append(name)
    return evicted


def is_published(folder: str | os.PathLike[str]) -> bool:
    """Whether a model folder can be read whole: a local folder that exists; a URI whose marker is there."""
    if not storage.is_uri(folder):
        return Path(folder).is_dir()
    return storage.stat(storage.join(str(folder), EXPORT_MARKER)) is not None

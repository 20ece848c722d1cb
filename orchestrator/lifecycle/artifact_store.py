"""Registered models' folders: immutable version folders and the hashes of their files.

A run exports to ``<run>/final`` (and ``best``), which a later run of the same name replaces. Registration
therefore gives the model a folder of its own, ``<registry>-artifacts/<model id>/`` beside the registry file:
the export's files hard-linked there (copied where links are not possible, e.g. across filesystems), so a
later export, which writes new files and swaps folders, never changes them. The registry records that folder
and the sha256 of every file in it; the files are made read-only, and the folder gets a manifest
(:data:`MANIFEST_FILE`: model id, registry, hashes) so that ``orchestrator predict`` can check a folder
without the registry. Promotion, rollback and predict check the hashes (:func:`verify_files`) and refuse a
folder whose files changed, naming the model, the folder and each file that changed.

Staging then placing keeps a registration atomic: the files are linked into ``.incoming-<random>`` first and
hashed there, and the folder is renamed to its model id inside the registry's write transaction that assigns
the id (:func:`place_staged`).

An export on object storage (``output.dir: s3://...``) gets its version folder on the same store
(:func:`stage_remote_export`): ``<output.dir>/<registry stem>-artifacts/<name>/<random>/``, uploaded from this
machine's copy of the export, whose files are the ones hashed. Object stores have no rename (a server-side
copy of every object inside the registry's write transaction would hold its lock for minutes on a large
model), so the folder is written under its final, never reused name before the transaction, which then
writes its manifest (one small PUT) and records its URI; a registration that fails deletes it. Nothing makes
objects read-only there: the recorded hashes are what keep it honest (:func:`verify_files` checks a URI's
files through this machine's copy, fetched again whenever an object's size or modification time changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.lifecycle.registry_records import RegistryError

MANIFEST_FILE = "orchestrator_registered.json"
STAGING_PREFIX = ".incoming-"


class ArtifactChangedError(RegistryError):
    """A registered model's files are not those registered (changed, missing or added)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths, sorted), the manifest left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def combined_digest(files: dict[str, str]) -> str:
    """One sha256 for a folder: over its sorted ``<sha256>  <path>`` lines (what ``sha256sum`` prints)."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def describe_changes(recorded: dict[str, str], found: dict[str, str]) -> list[str]:
    """What differs between the registered files and the folder now, one phrase per file."""
    changes = []
    for name in sorted(set(recorded) | set(found)):
        before, now = recorded.get(name), found.get(name)
        if before == now:
            continue
        if now is None:
            changes.append(f"{name} is missing")
        elif before is None:
            changes.append(f"{name} was added")
        else:
            changes.append(f"{name} changed (sha256 {before[:12]} registered, {now[:12]} now)")
    return changes


def verify_files(model_id: str, folder: str, recorded: dict[str, str] | None) -> None:
    """Check a registered model's folder against the hashes recorded at registration.

    Args:
        model_id: the model, for the message.
        folder: its local folder, or its URI (checked through this machine's copy of it).
        recorded: the file hashes registered (None: registered before hashes were recorded; not checked).

    Raises:
        ArtifactChangedError: the folder is gone, or files changed, are missing or were added.
    """
    if recorded is None:
        return
    shown = folder if storage.is_uri(folder) else folder.removeprefix("file://")
    local = _readable_copy(model_id, folder)
    if local is None:
        raise ArtifactChangedError(
            f"{model_id}: its registered folder {shown} is gone; restore it from a backup (the registry records "
            "the sha256 of every file) or register the model again"
        )
    changes = describe_changes(recorded, folder_digests(local))
    if changes:
        raise ArtifactChangedError(
            f"{model_id}: the files in its registered folder {shown} are not those registered: "
            + "; ".join(changes)
            + ". A registered model's folder must not change: restore the files from a backup, or train and "
            "register a new version"
        )


def _readable_copy(model_id: str, folder: str) -> Path | None:
    """The folder to hash: itself when local, this machine's copy of it on object storage; None when it is gone."""
    if not storage.is_uri(folder):
        path = Path(folder.removeprefix("file://"))
        return path if path.is_dir() else None
    try:
        return storage.local_copy(folder) if storage.list_files(folder) else None
    except storage.StorageError as exc:
        raise ArtifactChangedError(f"{model_id}: its registered folder cannot be read: {exc}") from None


def verify_manifest(folder: Path) -> None:
    """Check a folder that holds a registration manifest (a registered model's folder) against it.

    Raises:
        ArtifactChangedError: files changed since registration (see :func:`verify_files`).
    """
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactChangedError(f"{manifest}: unreadable registration manifest ({exc})") from None
    verify_files(str(recorded.get("model_id", "?")), str(folder), recorded.get("files"))


@dataclass
class StagedArtifact:
    """An export's files linked (or copied) into the registry's artifacts folder, hashed, not yet named; or, on
    object storage, uploaded to their version folder (``uri``), not yet recorded."""

    folder: Path
    files: dict[str, str]
    uri: str | None = None  # object storage: the version folder, final from the start (no rename there)
    placed: bool = False

    @property
    def sha256(self) -> str:
        return combined_digest(self.files)


def stage_export(source: Path, artifacts_dir: Path) -> StagedArtifact:
    """Hard-link (else copy) every file of an exported folder into a fresh staging folder and hash them there.

    The hashes are those of the staged files themselves, so what is recorded is what the version folder
    holds even if ``source`` is replaced meanwhile.
    """
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    staging = artifacts_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    shutil.copytree(source, staging, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    return StagedArtifact(folder=staging, files=folder_digests(staging))


def stage_remote_export(source: str, artifacts_root: str, name: str) -> StagedArtifact:
    """Copy an export on object storage to a fresh version folder ``<artifacts_root>/<name>/<random>`` on the
    same store, and hash its files: those of this machine's copy of the export, which is what is uploaded.

    Raises:
        StorageError: the export cannot be read or the version folder written (naming the URI).
    """
    local = storage.local_copy(source)  # cached per version: ``orchestrator predict`` here reuses it
    target = storage.join(artifacts_root, name, uuid.uuid4().hex[:12])
    files = folder_digests(local)
    for relative in files:  # file by file: a manifest the export may hold is not copied (it is written on place)
        storage.upload(local / relative, storage.join(target, relative))
    return StagedArtifact(folder=local, files=files, uri=target)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # no second copy of the weights; a later export writes new files
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, destination)


def place_staged(staged: StagedArtifact, model_id: str, *, registry: Path) -> str:
    """Rename a staged folder to ``<artifacts>/<model_id>``, write its manifest and make its files read-only.

    Called inside the write transaction that assigns ``model_id``: no registered model has that id yet, so a
    folder already there is the leftover of a registration that failed after this step, and is replaced.

    Returns:
        The version folder (absolute path, or URI on object storage), which the registry records as the artifact.
    """
    if staged.uri is not None:
        storage.write_text(
            storage.join(staged.uri, MANIFEST_FILE), json.dumps(_manifest(staged, model_id, registry), indent=2) + "\n"
        )
        staged.placed = True
        return staged.uri
    target = staged.folder.parent / model_id
    if target.exists():
        shutil.rmtree(target)
    staged.folder.rename(target)
    (target / MANIFEST_FILE).write_text(json.dumps(_manifest(staged, model_id, registry), indent=2) + "\n")
    _make_read_only(target)
    return str(target.resolve())


def _manifest(staged: StagedArtifact, model_id: str, registry: Path) -> dict[str, Any]:
    return {"model_id": model_id, "registry": str(registry), "sha256": staged.sha256, "files": staged.files}


def discard_staged(staged: StagedArtifact) -> None:
    """Remove a staged folder whose registration did not happen."""
    if staged.uri is not None:
        if not staged.placed:
            storage.delete(staged.uri)
        return  # the local folder is this machine's cached copy of the export, not a staging folder
    if staged.folder.exists():
        shutil.rmtree(staged.folder, ignore_errors=True)


def _make_read_only(folder: Path) -> None:
    """Files read-only (an in-place write into ``final/``, which shares them, then fails instead of changing a
    registered model; the hashes catch what permissions cannot, e.g. writes as root)."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

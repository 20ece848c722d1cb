"""Registering a finished job in the model registry, and the W&B artifact that mirrors it.

Every job that exports a model registers it (:func:`register_run`, called from
:func:`orchestrator.cluster.launcher.run_training`): id ``<name>-v<N>``, parent (the registered model or the base
model folder it started from; the teacher for a distilled student), method, base model and its licence,
data files with sha256 and row counts, the full validated config, metrics per eval set, artifact location,
code version, time and status. The model is also logged as a W&B artifact with the same lineage, by its
training run resumed (:func:`orchestrator.lifecycle.wandb_lineage.log_model_version`).

This module must not import :mod:`orchestrator.cluster.launcher` (the launcher imports it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import orchestrator.storage as storage

# Defined with the job config (config/retrain.py checks a retrain file's job with it too); used from here as before.
from orchestrator.config.job import REGISTRY_FILE, registry_problem
from orchestrator.errors import ModelError
from orchestrator.lifecycle.artifact_store import (
    combined_digest,
    discard_staged,
    folder_digests,
    place_staged,
    stage_export,
    stage_remote_export,
)
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord, artifact_key
from orchestrator.lifecycle.wandb_lineage import log_model_version
from orchestrator.models.loading import resolve_quietly
from orchestrator.start_vs_end import by_eval_set, is_number
from orchestrator.version import __version__

if TYPE_CHECKING:
    from orchestrator.cluster.preflight import Preflight
    from orchestrator.cluster.results import TrainResult
    from orchestrator.config import JobConfig

logger = logging.getLogger(__name__)

EXPORTED_JOB_FILE = "orchestrator_job.yaml"  # what orchestrator.train.export writes into every exported folder


def registry_path(config: JobConfig) -> Path | None:
    """Where a job's registry lives: ``output.registry`` ('auto': ``<output.dir>/registry.sqlite``; null: none).
    None too where it would be on object storage, which preflight reports (:func:`registry_problem`)."""
    value = config.output.registry
    if value is None or registry_problem(config):
        return None
    if value == "auto":
        return Path(config.output.dir).expanduser().resolve() / REGISTRY_FILE
    return Path(value).expanduser().resolve()


def open_registry(config: JobConfig) -> Registry | None:
    path = registry_path(config)
    return Registry(path) if path is not None else None


# --------------------------------------------------------------------------------------------------
# What a registered model records
# --------------------------------------------------------------------------------------------------


def read_licence(model_path: str | None) -> str | None:
    """The licence a model folder declares: its README.md front matter (``license:``), else config.json."""
    if not model_path:
        return None
    if storage.is_uri(model_path):  # a model folder on object storage: this machine's copy without the weights
        from orchestrator.models.loading import inspectable_model_path

        try:
            model_path = inspectable_model_path(model_path)
        except ModelError:
            return None
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    readme = folder / "README.md"
    if readme.is_file():
        found = _licence_in_model_card(readme.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            value = json.loads(config_file.read_text()).get("license")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value:
            return str(value)
    return None


def _licence_in_model_card(text: str) -> str | None:
    """The ``license:`` (or ``licence:``) of a model card's YAML front matter, if it has one."""
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    meta: Any = None
    if end != -1:
        try:
            meta = yaml.safe_load(text[3:end])
        except yaml.YAMLError:
            meta = None
    if not isinstance(meta, dict):
        return None
    value = meta.get("license") or meta.get("licence")
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    if not value:
        return None
    if value == "other" and meta.get("license_name"):
        return f"other ({meta['license_name']})"
    return str(value)


def code_version() -> str:
    """The code that trained: ``ORCHESTRATOR_CODE_VERSION``, else the git commit of this checkout (``+dirty``
    with uncommitted changes), else the package version (an uploaded Ray working dir has no .git)."""
    pinned = os.environ.get("ORCHESTRATOR_CODE_VERSION")
    if pinned:
        return pinned
    root = Path(__file__).resolve().parents[2]  # the checkout: orchestrator/lifecycle/ is two levels down

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == root:
        rev = git("rev-parse", "HEAD")
        if rev:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return rev + ("+dirty" if dirty else "")
    return f"orchestrator {__version__}"


def metrics_by_eval_set(metrics: dict[str, Any]) -> dict[str, Any]:
    """``{'sst2/accuracy': .9, 'step': 6}`` → ``{'eval': {'sst2': {'accuracy': .9}}, 'step': 6}``."""
    out: dict[str, Any] = {"eval": by_eval_set(metrics)}
    out.update({k: metrics[k] for k in ("step", "epoch", "best_metric", "best_step") if is_number(metrics.get(k))})
    return out


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


# --------------------------------------------------------------------------------------------------
# Registering a finished job
# --------------------------------------------------------------------------------------------------


def register_run(
    config: JobConfig,
    result: TrainResult,
    checked: Preflight | None = None,
    *,
    name: str | None = None,
    status: str = "candidate",
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    round: int | None = None,
    registry: Registry | None = None,
) -> ModelRecord | None:
    """Register the model a finished job exported (its ``final`` folder, else ``best``) as a candidate.

    The export's files are hard-linked (else copied) into a version folder of the registry,
    ``<registry stem>-artifacts/<model id>/``, made read-only and hashed; the registry records that folder and
    the hashes (see :mod:`orchestrator.lifecycle.artifact_store`), so a later run of the same name, which
    replaces ``final/``, never changes a registered model.

    The parent is the registered model whose artifact is ``model.path`` (the teacher for ``method:
    distill``), else the path itself; base model and licence are inherited from a registered parent, else
    read from the folder. The model is also logged as a W&B artifact with the same lineage (offline files when W&B
    is offline; see :mod:`orchestrator.lifecycle.wandb_lineage`).

    Args:
        config: the job as run.
        result: what :func:`orchestrator.cluster.launcher.run_training` returned.
        checked: its preflight (for the resolved model path); resolved again when not given.
        name: registry name (default: the job name); versions count up per name.
        status: 'candidate' (default) or 'champion'.
        data: what to record as data (default: ``result.data``, every file with sha256 and rows).
        metrics: extra metrics to record beside those of ``result.metrics`` (e.g. forgetting).
        round: the continual-retraining round that produced it.
        registry: where to register (default: the job's ``output.registry``).

    Returns:
        The new record, or None when the job exported no model or the registry is disabled.
    """
    registry = registry or open_registry(config)
    artifact_dir = result.final_model or result.best_model
    if registry is None or artifact_dir is None:
        return None
    model_path = checked.model_path if checked is not None else resolve_quietly(config.model.path)
    lineage = lineage_fields(config, registry, model_path)
    recorded = metrics_by_eval_set(result.metrics)
    if result.start_vs_end:  # start, end and delta per eval set against the model the run started from
        recorded["start_vs_end"] = result.start_vs_end
    if metrics:
        recorded.update(metrics)
    # The export becomes a version folder of its own, hashed (artifact_store.py): a later run of the name
    # rewrites final/ but never the files the registry points at. On a bucket, the folder is on the same store.
    if storage.is_uri(str(artifact_dir)):
        root = storage.join(storage.normalize(config.output.dir), registry.artifacts_dir.name)
        staged = stage_remote_export(str(artifact_dir), root, name or config.name)  # a StorageError names the URI
    else:
        staged = stage_export(Path(artifact_dir), registry.artifacts_dir)
    try:
        record = registry.register(
            name or config.name,
            method=config.method,
            artifact=artifact_key(staged.uri or str(staged.folder)),
            config=config.to_dict(),
            data=data if data is not None else result.data,
            metrics=recorded,
            **lineage,
            checkpoint=result.checkpoint_path,
            code_version=code_version(),
            status=status,
            round=round,
            weights_sha256=staged.sha256,
            files=staged.files,
            place=lambda model_id: place_staged(staged, model_id, registry=registry.path),
        )
    finally:
        discard_staged(staged)  # left only when the registration failed before renaming it
    logger.info("registered %s (%s) in %s, files in %s", record.id, record.status, registry.path, record.artifact)
    ref = log_model_version(registry, record, run_dir=result.run_dir)  # W&B: parent used, this version logged
    if ref:
        record.wandb_artifact = ref
    return record


def protect_registered_exports(config: JobConfig, run_dir: Path) -> list[ModelRecord]:
    """Before a run writes into ``run_dir``: a model registered before version folders existed may point at this
    run folder's ``final/`` or ``best/``, which the run is about to replace. Give it its version folder first
    (hard links of what is there now, hashed), so the rerun cannot overwrite it.

    Returns:
        The models given a version folder now.
    """
    path = registry_path(config)
    if path is None or not path.is_file():  # no registry yet: nothing registered to protect
        return []
    registry = Registry(path)
    adopted = []
    for folder in (run_dir / "final", run_dir / "best"):
        record = registry.find_by_artifact(str(folder)) if folder.is_dir() else None
        if record is None or record.files is not None:
            continue
        staged = stage_export(folder, registry.artifacts_dir)
        try:
            found = registry.adopt_artifact(
                record.id,
                files=staged.files,
                weights_sha256=staged.sha256,
                place=lambda model_id, staged=staged: place_staged(staged, model_id, registry=registry.path),
            )
        finally:
            discard_staged(staged)
        if found is not None:
            logger.warning(
                "%s pointed at %s, which this run replaces; its files are kept in %s", found.id, folder, found.artifact
            )
            adopted.append(found)
    return adopted


def lineage_fields(config: JobConfig, registry: Registry, model_path: str) -> dict[str, Any]:
    """Parent, teacher, base model and licence of a job's model: a registered parent's (or teacher's) id and
    inherited fields, else the paths it started from and the licence its folder declares."""
    parent_path = model_path
    teacher_path = None
    distill = getattr(config, "distill", None)
    if config.method == "distill" and distill is not None:
        teacher_path = resolve_quietly(distill.teacher)
        parent_path = teacher_path  # a student derives from its teacher
    parent = _find_registered(registry, parent_path)
    teacher = _find_registered(registry, teacher_path) if teacher_path else None
    return {
        "parent_id": parent.id if parent else None,
        "parent_ref": None if parent else parent_path,
        "teacher_id": teacher.id if teacher else None,
        "teacher_ref": None if teacher or not teacher_path else teacher_path,
        "base_model": parent.base_model if parent else parent_path,
        "licence": config.model.license  # stated in the job (it wins: the user may hold other terms)
        or (parent.licence if parent else read_licence(parent_path))
        or read_licence(model_path),
    }


def _find_registered(registry: Registry, path: str) -> ModelRecord | None:
    """The registered model a job starts from: the one whose artifact is this folder, else (for a folder this
    project exported, e.g. a run's ``final/`` that a version folder was made from) the one with the same files."""
    if not _is_local(path):  # a URI: a registered model's version folder on a bucket, or not registered
        return registry.find_by_artifact(storage.normalize(path)) if storage.is_uri(path) else None
    found = registry.find_by_artifact(path)
    folder = Path(path.removeprefix("file://"))
    if found is None and (folder / EXPORTED_JOB_FILE).is_file():  # hashing a hub model's folder would be wasted
        found = registry.find_by_weights(combined_digest(folder_digests(folder)))
    return found


# --------------------------------------------------------------------------------------------------
# Local copies
# --------------------------------------------------------------------------------------------------


def artifact_model_path(record: ModelRecord) -> str:
    """What a job loads a registered model from (a continual round's ``model.path``): its local folder, or its
    URI on object storage as it is (``model.path`` takes URIs: every node copies the folder once, and the round's
    lineage finds the model by that URI)."""
    artifact = record.artifact
    return storage.normalize(artifact) if storage.is_uri(artifact) else artifact.removeprefix("file://")

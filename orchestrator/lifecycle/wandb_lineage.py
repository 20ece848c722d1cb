"""W&B lineage: the W&B model registry tells the story the SQLite registry records.

Every registered model version is a W&B artifact of type ``model``, named after the model's registry name (one
artifact collection per name, one W&B version per registered version). Its metadata is the registry record
that never changes (registry id and version, method, parent, teacher, base model, licence, code version,
metrics, data files with sha256 and rows, the sha256 of every file); its status lives in aliases, which move.
The files are added *by reference* (``file://`` or ``s3://``/``gs://`` URIs: nothing is uploaded again), one
reference per registered file with ``checksum=False``: the registry's version folders are immutable and
hashed by the registry itself (:mod:`orchestrator.lifecycle.artifact_store`, hashes in the metadata), so W&B
re-reading every byte (or listing a bucket, with credentials) at each registration and decision would buy
nothing. Without checksums an entry's digest is a hash of its URI, and the URI holds the model id, so the
same version always has the same W&B digest: re-declaring it (below) never makes a new W&B version.

Edges (``use_artifact`` -> ``log_artifact``): the run that trained a model uses its parent's artifact (the
registered parent: base model of a fine-tune, champion of a continual round, teacher of a student, source of
a quantized model; an unregistered base model gets a ``base-<name>`` artifact referring to its folder or hub
page) and logs the new one. Registration happens on the driver after training, so :func:`log_model_version`
*resumes the training run* (its id is in ``<run dir>/wandb_run_id``): the edge then starts at the run that
really trained the model. A model with no training run (``orchestrator quantize``, a run trained with W&B
disabled) is logged by a short run of job type ``registry`` (``quantize`` for method quantize).

Decisions (promote, reject, rollback) are made on the driver after training has finished: each is logged by a
short W&B run of job type ``registry`` (:func:`record_decision`) that *uses* the versions it judges and sets
their aliases; its config holds the decision, the models and the reason (the registry's ``events`` row). A
short run of its own rather than resuming the training run: the decision may come days later, from the CLI or
the scheduler, about a model whose training run is another job's, and a rollback concerns two training runs.
Aliases are unique within an artifact collection in W&B, so setting one on a version moves it from another:

* registered: ``<model id>`` (e.g. ``sst2-v3``, fixed: the handle of that version) and its status
  (``candidate``, or ``champion`` + ``production`` for a model registered as champion);
* promote: ``champion`` + ``production`` (moved from the old champion);
* reject: ``rejected`` (on the latest rejected version; each decision's run records the rest);
* rollback: ``rolled-back`` on the demoted champion, ``champion`` + ``production`` moved back.

``latest`` is W&B's own (wandb adds it to every logged or declared version), not a registry status.

W&B mode, project, entity and group are those of the model's job (``tracking.wandb`` in the registered
config): online when the job's mode resolves online, offline files otherwise (in ``<registry folder>/wandb``, for the
resumed training run too; ``wandb sync`` uploads them later), nothing when
disabled. W&B never fails a registration or a decision: any error is one warning and the SQLite registry,
which is the record, is unchanged (as :class:`orchestrator.tracking.Tracker` does for training).

Offline, wandb refuses ``run.use_artifact``; the use is then recorded as wandb's own ``use_artifact`` records a
not-yet-logged artifact (``_log_artifact(..., is_user_created=True, use_after_commit=True)``), which ``wandb
sync`` turns into the same edge.

For other derivation steps (engineer F's ``orchestrator quantize``), after ``Registry.register(...,
parent_id=source.id, method="quantize")``::

    from orchestrator.lifecycle.wandb_lineage import log_model_version, record_decision

    ref = log_model_version(registry, record)        # uses the source's artifact, logs the quantized one
    registry.promote(record.id, "quantized champion")  # only if it is promoted
    record_decision(registry, record.id)              # mirrors the registry's newest decision on it

Both return a falsy value (and warn) when W&B is disabled or fails; neither ever raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord
from orchestrator.storage import exists, is_uri, join, name_of, read_text
from orchestrator.tracking import WANDB_ID_FILE, redact_secrets, resolve_wandb_mode, sync_hint

logger = logging.getLogger(__name__)

CHAMPION = "champion"
PRODUCTION = "production"  # the registry's one serving stage: its champion
REJECTED = "rejected"
ROLLED_BACK = "rolled-back"
REGISTRY_JOB_TYPE = "registry"
DECISIONS = ("promote", "reject", "rollback")
# Registry runs are bookkeeping: no console capture, no system metrics, and none of the environment (git, pip
# packages, machine) that wandb otherwise gathers at every start: about 1 s a run, the training run has it.
_QUIET: dict[str, Any] = {
    "console": "off",
    "silent": True,
    "x_disable_stats": True,
    "x_disable_meta": True,
    "x_disable_machine_info": True,
    "x_save_requirements": False,
    "save_code": False,
    "disable_git": True,
}


@dataclass(frozen=True)
class WandbTarget:
    """Where a model's W&B records go: its job's ``tracking.wandb`` settings, the mode resolved."""

    mode: str  # online | offline
    project: str
    entity: str | None
    group: str | None


# --------------------------------------------------------------------------------------------------
# Names and artifacts
# --------------------------------------------------------------------------------------------------


def artifact_name(name: str) -> str:
    """W&B artifact names and aliases allow letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def artifact_ref(record: ModelRecord) -> str:
    """``<name>:<model id>``: the W&B version of a registered model, by its fixed alias."""
    return f"{artifact_name(record.name)}:{artifact_name(record.id)}"


def target_of(record: ModelRecord) -> WandbTarget | None:
    """The W&B settings of the job that made ``record`` (None: W&B disabled there)."""
    settings = (record.config.get("tracking") or {}).get("wandb") or {}
    mode = resolve_wandb_mode(str(settings.get("mode") or "auto"))
    if mode == "disabled":
        return None
    return WandbTarget(
        mode=mode,
        project=settings.get("project") or "orchestrator",
        entity=settings.get("entity"),
        group=settings.get("group"),
    )


def _metadata(record: ModelRecord) -> dict[str, Any]:
    """What never changes about a registered version (its status is in aliases)."""
    return {
        "registry_id": record.id,
        "registry_name": record.name,
        "registry_version": record.version,
        "method": record.method,
        "parent": record.parent,
        "teacher": record.teacher_id or record.teacher_ref,
        "base_model": record.base_model,
        "licence": record.licence,
        "round": record.round,
        "code_version": record.code_version,
        "created_at": record.created_at,
        "metrics": record.metrics,
        "data": record.data,
        "weights_sha256": record.weights_sha256,
        "files": record.files,
        "artifact": record.artifact,
    }


def _folder_uri(location: str) -> str:
    return location.rstrip("/") if is_uri(location) else Path(location).resolve().as_uri()


def model_artifact(wandb: Any, record: ModelRecord) -> Any:
    """The W&B artifact of a registered version: metadata and a reference to each registered file."""
    artifact = wandb.Artifact(name=artifact_name(record.name), type="model", metadata=_metadata(record))
    folder = _folder_uri(record.artifact)
    if record.files:
        for relative in sorted(record.files):
            artifact.add_reference(f"{folder}/{relative}", name=relative, checksum=False)
    else:  # registered before the registry hashed files: the folder as one reference
        artifact.add_reference(folder, checksum=False)
    return artifact


def _base_identity(ref: str) -> tuple[str, str]:
    """(artifact name, URI) of an unregistered starting point: a folder, a URI or a Hugging Face hub id."""
    if is_uri(ref):
        return f"base-{artifact_name(name_of(ref))}", ref
    path = Path(ref)
    hub_cache = next((p for p in path.parts if p.startswith("models--")), None)  # the HF cache of a hub model
    if hub_cache is not None:
        hub_id = hub_cache.removeprefix("models--").replace("--", "/")
        return f"base-{artifact_name(hub_id)}", f"https://huggingface.co/{hub_id}"
    if path.is_absolute() or path.exists():
        return f"base-{artifact_name(path.name)}", path.resolve().as_uri()
    return f"base-{artifact_name(ref)}", f"https://huggingface.co/{ref}"


def base_artifact(wandb: Any, ref: str) -> Any:
    """The artifact of a model the registry does not hold (the base of a first fine-tune, a hub teacher)."""
    name, uri = _base_identity(ref)
    artifact = wandb.Artifact(name=name, type="model", metadata={"registry_id": None, "parent": None, "source": ref})
    artifact.add_reference(uri, checksum=False)
    return artifact


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def training_run_id(run_dir: str | Path | None) -> str | None:
    """The W&B run id the training run kept in ``<run dir>/wandb_run_id`` (None: no such file)."""
    if run_dir is None:
        return None
    try:
        path = join(str(run_dir), WANDB_ID_FILE)
        if not exists(path):
            return None
        return read_text(path).strip() or None
    except Exception as exc:  # an unreachable bucket: a registry run instead
        logger.warning("W&B: the training run's id in %s could not be read (%s)", run_dir, exc)
        return None


def _init(wandb: Any, target: WandbTarget, mode: str, *, folder: Path, run_id: str | None, **fields: Any) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"id": run_id, "resume": "allow"} if run_id else fields
    return wandb.init(
        project=target.project,
        entity=target.entity,
        group=target.group,
        dir=str(folder),
        mode=mode,
        reinit="create_new",  # never finishes a run this process has open (a local training run, a test's)
        settings=wandb.Settings(**_QUIET),
        **extra,
    )


def start_run(target: WandbTarget, *, folder: Path, run_id: str | None = None, **fields: Any) -> tuple[Any, str] | None:
    """A W&B run (the training run ``run_id`` resumed, else a new one with ``fields``: job_type, name, config)
    and its mode; online failing, an offline one; failing too, None (warned once)."""
    import wandb

    try:
        return _init(wandb, target, target.mode, folder=folder, run_id=run_id, **fields), target.mode
    except Exception as exc:
        failure = f"W&B could not start ({target.mode}): {_describe(exc)}"
    if target.mode == "online":
        try:
            wandb.teardown()  # else the failed online run keeps its id "in use" and the offline one is refused
            run = _init(wandb, target, "offline", folder=folder, run_id=run_id, **fields)
        except Exception as exc:
            failure += f"; offline neither: {_describe(exc)}"
        else:
            logger.warning("%s; logged offline instead, %s", failure, sync_hint(folder / "wandb"))
            return run, "offline"
    logger.warning("%s; the registry keeps the record, W&B has no copy of it", failure)
    return None


def use(run: Any, artifact: Any, mode: str, aliases: list[str] | None = None) -> None:
    """Declare ``artifact`` an input of ``run`` (setting ``aliases`` on it), online or offline."""
    if mode != "offline":
        run.use_artifact(artifact, aliases=aliases) if aliases else run.use_artifact(artifact)
        return
    # Offline wandb refuses use_artifact; this is what use_artifact itself does with an artifact not yet logged
    # (minus waiting for the server): the record that `wandb sync` turns into the input edge.
    run._log_artifact(artifact, aliases=aliases or [], is_user_created=True, use_after_commit=True)


def _describe(exc: BaseException) -> str:
    """One line for a warning: the error's type and first line, secret values masked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact_secrets(f"{type(exc).__name__}: {text}"[:300])


def _finish(run: Any) -> None:
    try:
        run.finish()
    except Exception as exc:
        logger.warning("W&B: the run did not finish cleanly (%s); what it logged is kept", _describe(exc))


# --------------------------------------------------------------------------------------------------
# Registration: the run that trained a model uses its parent and logs it
# --------------------------------------------------------------------------------------------------


def registration_aliases(record: ModelRecord) -> list[str]:
    """Aliases of a newly registered version: its id and its status (champion: also production)."""
    aliases = [artifact_name(record.id), record.status]
    return [*aliases, PRODUCTION] if record.status == CHAMPION else aliases


def log_model_version(registry: Registry, record: ModelRecord, *, run_dir: str | Path | None = None) -> str | None:
    """Log a registered model as the next W&B version of its name, its parent's artifact used first.

    Args:
        registry: the registry holding ``record`` (its parent and teacher are looked up there).
        record: the model just registered.
        run_dir: the training run's folder; its W&B run (``wandb_run_id``) is resumed to log the model, so the
            lineage edge starts at the run that trained it. None, or no id there: a run of job type
            ``registry`` (``quantize`` for method quantize).

    Returns:
        The W&B reference recorded in the registry (``<name>:<model id>``), or None when W&B is disabled for the
        job or failed (warned; never raised).
    """
    try:
        import wandb

        target = target_of(record)
        if target is None:
            return None
        run_id = training_run_id(run_dir)
        # Offline files beside the registry, not in the run folder: the run folder keeps exactly the training
        # run's own files (a resumed offline run is a second folder with the same id; `wandb sync` merges them).
        started = start_run(
            target,
            folder=registry.path.parent,
            run_id=run_id,
            job_type="quantize" if record.method == "quantize" else REGISTRY_JOB_TYPE,
            name=f"register-{record.id}",
            config={"model_id": record.id, "parent": record.parent, "method": record.method},
        )
        if started is None:
            return None
        run, mode = started
        try:
            _use_parents(wandb, run, mode, record, registry)
            run.log_artifact(model_artifact(wandb, record), aliases=registration_aliases(record))
        finally:
            _finish(run)
        ref = artifact_ref(record)
        registry.set_wandb_artifact(record.id, ref)
        return ref
    except Exception as exc:
        logger.warning("W&B: could not log %s as an artifact (%s); the registry keeps it", record.id, _describe(exc))
        return None


def _use_parents(wandb: Any, run: Any, mode: str, record: ModelRecord, registry: Registry) -> None:
    """Declare what the model was derived from as inputs of ``run``: the registered parent and teacher (by
    their fixed alias online; rebuilt offline, the same W&B digest), else the unregistered base or teacher."""
    inputs: list[tuple[str, Any]] = []
    for ref in dict.fromkeys(r for r in (record.parent_id, record.teacher_id) if r):
        inputs.append((ref, registry.get(ref)))
    for ref in dict.fromkeys(r for r in (record.parent_ref, record.teacher_ref) if r):
        inputs.append((ref, None))
    for ref, parent in inputs:
        try:
            if parent is None:
                use(run, base_artifact(wandb, ref), mode)
            elif mode == "online":
                _use_registered_online(wandb, run, parent)
            else:
                use(run, model_artifact(wandb, parent), mode)
        except Exception as exc:
            logger.warning("W&B: %s not recorded as the input of %s (%s)", ref, record.id, _describe(exc))


def _use_registered_online(wandb: Any, run: Any, parent: ModelRecord) -> None:
    """Use the parent's W&B version by its alias; one registered while W&B was off is declared from its record."""
    try:
        run.use_artifact(artifact_ref(parent))
    except Exception as exc:
        found = artifact_ref(parent)
        logger.warning("W&B: %s not found (%s); declared from its registry record", found, _describe(exc))
        use(run, model_artifact(wandb, parent), "online")


# --------------------------------------------------------------------------------------------------
# Decisions: a short registry run uses the versions judged and moves their aliases
# --------------------------------------------------------------------------------------------------


def latest_decision(registry: Registry, model_id: str) -> dict[str, Any] | None:
    """The newest promote / reject / rollback event of the registry about ``model_id`` (the model promoted,
    rejected or restored), or None."""
    record = registry.get(model_id)
    found = [e for e in registry.events(record.name) if e["kind"] in DECISIONS and e["model_id"] == model_id]
    return found[-1] if found else None


def decision_aliases(kind: str) -> tuple[list[str], list[str]]:
    """(aliases of the model the event is about, aliases of the other one: the demoted champion of a rollback)."""
    if kind == "promote":
        return [CHAMPION, PRODUCTION], []
    if kind == "reject":
        return [REJECTED], []
    return [CHAMPION, PRODUCTION], [ROLLED_BACK]


def record_decision(registry: Registry, model_id: str) -> bool:
    """Mirror the registry's newest decision about ``model_id`` in W&B: call it after ``Registry.promote`` /
    ``decide`` (with the candidate's id) or ``rollback`` (with the restored champion's id).

    A run of job type ``registry`` (config: the decision, model, previous model, reason and the event's id and
    time) uses the version(s) concerned and sets their aliases (see the module docstring).

    Returns:
        True when W&B recorded it; False when W&B is disabled for the model's job, the registry has no such
        decision, or W&B failed (warned; never raised: the decision stands in the registry).
    """
    try:
        event = latest_decision(registry, model_id)
        if event is None:
            logger.warning("W&B: the registry has no promote/reject/rollback of %s to record", model_id)
            return False
        record = registry.get(model_id)
        target = target_of(record)
        if target is None:
            return False
        return _log_decision(registry, target, event, record)
    except Exception as exc:
        logger.warning("W&B: the decision on %s was not recorded (%s); the registry has it", model_id, _describe(exc))
        return False


def _log_decision(registry: Registry, target: WandbTarget, event: dict[str, Any], record: ModelRecord) -> bool:
    import wandb

    kind = event["kind"]
    other = registry.get(event["previous_id"]) if event.get("previous_id") else None
    started = start_run(
        target,
        folder=registry.path.parent,
        job_type=REGISTRY_JOB_TYPE,
        name=f"{kind}-{record.id}",
        config={
            "decision": kind,
            "model_id": record.id,
            "previous_id": other.id if other else None,
            "reason": event.get("reason"),
            "event_id": event.get("id"),
            "at": event.get("at"),
            "registry": str(registry.path),
        },
    )
    if started is None:
        return False
    run, mode = started
    mine, theirs = decision_aliases(kind)
    try:
        if theirs and other is not None:  # the demoted one first: then the restored one's aliases are the last
            use(run, model_artifact(wandb, other), mode, [artifact_name(other.id), *theirs])
        use(run, model_artifact(wandb, record), mode, [artifact_name(record.id), *mine])
    finally:
        _finish(run)
    return True

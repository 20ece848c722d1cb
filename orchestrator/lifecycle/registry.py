"""Model registry and lineage: one SQLite file beside the artifacts (no server needed).

:class:`Registry` is the one entry point; it delegates to the modules that hold each part:

* :mod:`orchestrator.lifecycle.registry_schema`: the schema, connections and ``BEGIN IMMEDIATE`` transactions;
* :mod:`orchestrator.lifecycle.model_queries`: reading and adding models (``<name>-v<N>``);
* :mod:`orchestrator.lifecycle.registry_promotion`: promotion, gate decisions, rollback and the ``events`` table;
* :mod:`orchestrator.lifecycle.registry_lineage`: the lineage tree;
* :mod:`orchestrator.lifecycle.round_claims`: continual-retraining rounds (claimed, running, finished), so that
  no two rounds of one model run at once and a restarted scheduler carries on where it stopped;
* :mod:`orchestrator.lifecycle.registry_records`: the records these return, and :class:`RegistryError`.
* :mod:`orchestrator.lifecycle.artifact_store`: registered models' immutable version folders and the hashes of
  their files, checked before a model is promoted or rolled back to;
* :mod:`orchestrator.lifecycle.shard_retries`: continual shards whose rounds keep failing (attempts, quarantine).

Registering a finished job is :func:`orchestrator.lifecycle.run_registration.register_run`.

Concurrency: the database runs in WAL mode and every write is one ``BEGIN IMMEDIATE`` transaction (the
write lock is taken up front, so two writers never interleave read-then-write; a busy writer waits up to
``busy_timeout_s``). Two retraining rounds finishing at the same moment get distinct versions and never
corrupt the file. WAL needs every writer on one host (or a filesystem with working shared memory): on NFS
shared by several machines pass ``journal_mode="delete"`` (env ``ORCHESTRATOR_REGISTRY_JOURNAL=delete``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.lifecycle.artifact_store import verify_files
from orchestrator.lifecycle.model_queries import (
    adopt_artifact_row,
    insert_model,
    select_model,
    select_models,
    unknown_model,
)
from orchestrator.lifecycle.registry_lineage import LineageNode, lineage_tree
from orchestrator.lifecycle.registry_promotion import (
    promote_model,
    record_decision,
    roll_back,
    rollback_plan,
    select_events,
)
from orchestrator.lifecycle.registry_records import (
    STATUSES,
    ModelRecord,
    RegistryError,
    RoundRecord,
    artifact_key,
    now_iso,
)
from orchestrator.lifecycle.registry_schema import RegistryDatabase
from orchestrator.lifecycle.round_claims import (
    insert_round,
    lapse_dead_claims,
    round_columns,
    select_round,
    select_rounds,
    update_round_row,
)
from orchestrator.lifecycle.shard_retries import (
    QuarantinedShard,
    ShardAttempts,
    release_shard,
    select_attempts,
    select_quarantine,
    settle_failed_rounds,
)


class Registry:
    """The registry in one SQLite file. Cheap to create; each operation opens its own connection, so one
    instance may be used from several threads and any number of processes may share the file."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 60.0, journal_mode: str | None = None):
        self.path = Path(path).expanduser().resolve()
        self.busy_timeout_s = busy_timeout_s
        self.journal_mode = (journal_mode or os.environ.get("ORCHESTRATOR_REGISTRY_JOURNAL") or "wal").lower()
        if self.journal_mode not in ("wal", "delete"):
            raise RegistryError(f"journal mode must be 'wal' or 'delete'; got {self.journal_mode!r}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = self.path.parent
            raise RegistryError(f"cannot create the registry folder {where}: {exc.strerror or exc}") from None
        self._db = RegistryDatabase(self.path, busy_timeout_s=busy_timeout_s, journal_mode=self.journal_mode)
        self._db.initialise()

    # -- models ------------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        method: str,
        artifact: str,
        config: dict[str, Any],
        data: dict[str, Any],
        metrics: dict[str, Any],
        parent_id: str | None = None,
        parent_ref: str | None = None,
        teacher_id: str | None = None,
        teacher_ref: str | None = None,
        base_model: str | None = None,
        licence: str | None = None,
        checkpoint: str | None = None,
        code_version: str | None = None,
        status: str = "candidate",
        round: int | None = None,
        created_at: str | None = None,
        weights_sha256: str | None = None,
        files: dict[str, str] | None = None,
        place: Callable[[str], str] | None = None,
    ) -> ModelRecord:
        """Add a model as ``<name>-v<N>`` (N = the next version of that name, assigned in the transaction).

        ``files`` (sha256 by relative path) and ``weights_sha256`` (their combined hash) are what promotion and
        rollback check the artifact folder against; ``place`` is called with the new id inside the transaction
        and returns the artifact to record (see :func:`orchestrator.lifecycle.run_registration.register_run`).
        """
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {', '.join(STATUSES)}; got {status!r}")
        at = created_at or now_iso()
        fields = {
            "method": method,
            "artifact": artifact,
            "config": config,
            "data": data,
            "metrics": metrics,
            "parent_id": parent_id,
            "parent_ref": parent_ref,
            "teacher_id": teacher_id,
            "teacher_ref": teacher_ref,
            "base_model": base_model,
            "licence": licence,
            "checkpoint": checkpoint,
            "code_version": code_version,
            "round": round,
            "weights_sha256": weights_sha256,
            "files": files,
        }
        with self._db.transaction() as conn:
            return insert_model(conn, name, fields, status=status, at=at, place=place)

    def get(self, model_id: str) -> ModelRecord:
        with self._db.reading() as conn:
            record = select_model(conn, model_id)
            if record is None:
                raise unknown_model(conn, model_id, self.path)
        return record

    def find(self, model_id: str) -> ModelRecord | None:
        try:
            return self.get(model_id)
        except RegistryError:
            return None

    def models(self, name: str | None = None, status: str | None = None) -> list[ModelRecord]:
        """Registered models, oldest first, optionally of one name and/or status."""
        clauses, params = [], []
        if name is not None:
            clauses.append("name = ?")
            params.append(name)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        with self._db.reading() as conn:
            return select_models(conn, clauses, params)

    def names(self) -> list[str]:
        with self._db.reading() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT name FROM models ORDER BY name")]

    def find_by_artifact(self, path: str) -> ModelRecord | None:
        """The model whose artifact is this folder (or URI), if registered (newest wins)."""
        key = artifact_key(path)
        with self._db.reading() as conn:
            found = select_models(conn, ["artifact = ?"], [key], order="version DESC", limit=1)
        return found[0] if found else None

    def find_by_weights(self, weights_sha256: str) -> ModelRecord | None:
        """The newest model whose artifact's files have this combined hash, if registered."""
        with self._db.reading() as conn:
            found = select_models(conn, ["weights_sha256 = ?"], [weights_sha256], order="created_at DESC", limit=1)
        return found[0] if found else None

    @property
    def artifacts_dir(self) -> Path:
        """Where registered models' version folders live: ``<registry stem>-artifacts/`` beside the file."""
        return self.path.with_name(f"{self.path.stem}-artifacts")

    def verify(self, model_id: str) -> ModelRecord:
        """The model, after checking that its artifact folder holds the files registered.

        Raises:
            ArtifactChangedError: files changed, are missing or were added (each one named).
        """
        record = self.get(model_id)
        verify_files(record.id, record.artifact, record.files)
        return record

    def adopt_artifact(
        self, model_id: str, *, files: dict[str, str], weights_sha256: str, place: Callable[[str], str]
    ) -> ModelRecord | None:
        """Record a version folder and hashes for a model registered before they existed (see
        :func:`orchestrator.lifecycle.run_registration.protect_registered_exports`); None if it has them."""
        with self._db.transaction() as conn:
            return adopt_artifact_row(conn, model_id, files, weights_sha256, place)

    def champion(self, name: str) -> ModelRecord | None:
        found = self.models(name, "champion")
        return found[0] if found else None

    def ancestors(self, model_id: str) -> list[ModelRecord]:
        """The model, its parent, grandparent, ... up to the first one not derived from a registered model."""
        chain, seen = [], set()
        current: str | None = model_id
        while current is not None and current not in seen:
            seen.add(current)
            record = self.get(current)
            chain.append(record)
            current = record.parent_id
        return chain

    def children(self, model_id: str) -> list[ModelRecord]:
        with self._db.reading() as conn:
            return select_models(conn, ["parent_id = ?"], [model_id], order="created_at, version")

    # -- decisions -----------------------------------------------------------------------------------

    def promote(self, model_id: str, reason: str = "promoted by hand") -> ModelRecord:
        """Make a model the champion of its name; the current champion becomes archived."""
        self.verify(model_id)  # before the write lock: hashing a large model takes seconds
        with self._db.transaction() as conn:
            promote_model(conn, model_id, reason, self.path)
        return self.get(model_id)

    def decide(self, model_id: str, decision: str, reason: str) -> ModelRecord:
        """Record a promotion gate's decision: 'promote' makes the candidate champion, 'reject' marks it rejected."""
        if decision not in ("promote", "reject"):
            raise RegistryError(f"decision must be 'promote' or 'reject'; got {decision!r}")
        if decision == "promote":
            self.verify(model_id)
        with self._db.transaction() as conn:
            record_decision(conn, model_id, decision, reason, self.path)
        return self.get(model_id)

    def rollback(self, name: str | None = None, reason: str = "rollback") -> tuple[ModelRecord, ModelRecord]:
        """Restore the champion that the current champion replaced; the current one becomes archived.

        Args:
            name: the model name; may be left out when only one name has a champion.

        Returns:
            (restored champion, demoted model).
        """
        with self._db.reading() as conn:
            planned, _ = rollback_plan(conn, name)
        self.verify(planned)  # the model restored must still be the one registered
        with self._db.transaction() as conn:
            previous, current = roll_back(conn, name, reason, expect=planned)
        return self.get(previous), self.get(current)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._db.reading() as conn:
            return select_events(conn, name)

    def set_wandb_artifact(self, model_id: str, ref: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("UPDATE models SET wandb_artifact = ? WHERE id = ?", (ref, model_id))

    # -- lineage -------------------------------------------------------------------------------------

    def lineage(self, model_id: str) -> LineageNode:
        """The tree from the base model of ``model_id`` to every model derived from that base."""
        record = self.get(model_id)
        base = record.base_model or self.ancestors(model_id)[-1].parent_ref or "(unknown base)"
        with self._db.reading() as conn:
            family = select_models(conn, ["base_model = ?"], [base], order="created_at, version")
        if all(m.id != record.id for m in family):
            family.append(record)
        return lineage_tree(base, family)

    # -- continual-retraining rounds -------------------------------------------------------------------

    def claim_round(
        self,
        name: str,
        *,
        new_data: list[dict[str, Any]] | None = None,
        spec: dict[str, Any] | None = None,
        submission_id: str | None = None,
        host: str | None = None,
        pid: int | None = None,
        at: str | None = None,
    ) -> RoundRecord | None:
        """Start a round of ``name`` unless one is active (claimed or running). Returns None when one is.

        A round claimed by a local process (host + pid, no submission id) whose process is gone is marked
        abandoned first, so a killed ``orchestrator retrain`` does not block the name forever. ``at`` is the
        claim's time (default now; the scheduler passes its own clock's).
        """
        at = at or now_iso()
        with self._db.transaction() as conn:
            if not lapse_dead_claims(conn, name, at):
                return None
            return insert_round(
                conn, name, new_data=new_data, spec=spec, submission_id=submission_id, host=host, pid=pid, at=at
            )

    def update_round(self, round_id: int, **values: Any) -> RoundRecord:
        columns = round_columns(values)
        with self._db.transaction() as conn:
            record = update_round_row(conn, round_id, columns)
        if record is None:
            raise RegistryError(f"no round with id {round_id}")
        return record

    def get_round(self, round_id: int) -> RoundRecord:
        with self._db.reading() as conn:
            record = select_round(conn, round_id)
        if record is None:
            raise RegistryError(f"no round with id {round_id} in {self.path}")
        return record

    def rounds(self, name: str, *, active_only: bool = False) -> list[RoundRecord]:
        with self._db.reading() as conn:
            return select_rounds(conn, name, active_only=active_only)

    # -- shards whose rounds keep failing ---------------------------------------------------------------

    def settle_failed_rounds(
        self, name: str, *, at: float, max_attempts: int
    ) -> tuple[dict[str, ShardAttempts], list[QuarantinedShard]]:
        """Count the failed rounds of ``name`` not yet counted (one attempt per shard, stamped ``at``: the
        scheduler's clock) and quarantine the shards with ``max_attempts`` failed attempts.

        Returns:
            (the failed attempts of each shard by content hash, the shards quarantined now).
        """
        with self._db.transaction() as conn:
            return settle_failed_rounds(conn, name, at=at, max_attempts=max_attempts)

    def shard_attempts(self, name: str) -> dict[str, ShardAttempts]:
        with self._db.reading() as conn:
            return select_attempts(conn, name)

    def quarantined(self, name: str | None = None) -> list[QuarantinedShard]:
        """Quarantined shards (of one name, or all), oldest first."""
        with self._db.reading() as conn:
            return select_quarantine(conn, name)

    def release(self, sha256: str, name: str | None = None) -> list[QuarantinedShard]:
        """Lift the quarantine of a shard (its full hash or a unique prefix); its attempts count from zero."""
        with self._db.transaction() as conn:
            return release_shard(conn, sha256, name)

    def integrity_check(self) -> str:
        with self._db.reading() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]

"""Continual retraining: one round = new data found by content hash, warm start from the champion, replay of
earlier data, evaluation on every eval set seen so far, and a promotion gate.

The parts are pure functions, testable without a cluster:

* :func:`orchestrator.lifecycle.new_data.detect_new_data`: files in the watched folder whose sha256 no model of
  this name was trained on;
* :func:`orchestrator.lifecycle.replay.split_holdout` and :func:`orchestrator.lifecycle.replay.sample_replay`:
  seeded, reproducible row choices;
* :func:`orchestrator.lifecycle.forgetting_gate.compute_forgetting` and
  :func:`orchestrator.lifecycle.forgetting_gate.gate_decision`: best earlier score − new score per old eval set,
  and champion or rejected candidate with the reason.

:func:`run_round` assembles them: it claims the round in the registry, plans it
(:func:`orchestrator.lifecycle.round_plan.plan_round`: the round's training file, eval holdout and job config
``round.yaml`` under the round's run dir), trains it with :func:`orchestrator.cluster.launcher.run_training`,
registers the candidate with its lineage, applies the gate and writes the round's summary (``round.json``).
A new label space grows the head over the union of the labels (see :mod:`orchestrator.lifecycle.label_space`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orchestrator.storage as storage
from orchestrator.config.retrain import LoadedRetrain, retrain_from_dict
from orchestrator.errors import DataError, OrchestratorError
from orchestrator.lifecycle.forgetting_gate import (
    Gate,
    compute_forgetting,
    gate_decision,
    gate_for,
    gate_scores,
    score_history,
)
from orchestrator.lifecycle.model_card import write_run_cards
from orchestrator.lifecycle.new_data import DataFile, detect_new_data, find_new_data, scan_watch
from orchestrator.lifecycle.quantization import quantize_champion
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord, RoundRecord
from orchestrator.lifecycle.round_plan import RoundPlan, check_round_output, plan_round
from orchestrator.lifecycle.run_registration import register_run, registry_path, registry_problem
from orchestrator.lifecycle.wandb_lineage import record_decision

if TYPE_CHECKING:
    from orchestrator.cluster.results import TrainResult

logger = logging.getLogger(__name__)

ROUND_SUMMARY_FILE = "round.json"


class RoundBusyError(OrchestratorError):
    """Another round of the same model is running."""


@dataclass
class RoundResult:
    name: str
    round: int | None
    status: str  # succeeded | skipped
    candidate: ModelRecord | None = None
    decision: str | None = None
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    forgetting: dict[str, float] = field(default_factory=dict)
    new_files: list[DataFile] = field(default_factory=list)
    run_dir: Path | str | None = None  # a URI when the base job's output.dir is one
    quantized: ModelRecord | None = None  # the promoted champion quantized (retrain file's quantize section)


@dataclass(frozen=True)
class _Verdict:
    """The gate's judgement of a trained candidate."""

    gate: Gate
    scores: dict[str, float]
    forgetting: dict[str, float]
    decision: str
    reason: str


def open_round_registry(loaded: LoadedRetrain) -> Registry:
    """The base job's registry.

    Raises:
        OrchestratorError: the base job has no registry.
    """
    path = registry_path(loaded.job)
    if path is None:
        problem = registry_problem(loaded.job)  # a registry on object storage, else none at all
        raise OrchestratorError(f"the base job's output.registry: {problem}" if problem else
                                "the base job's output.registry is null; retraining needs a registry")
    return Registry(path)


def loaded_from_round(registry: Registry, round_id: int) -> LoadedRetrain:
    """The retrain config a claimed round was submitted with (stored resolved in the registry)."""
    record = registry.get_round(round_id)
    if record.spec is None:
        raise OrchestratorError(f"round id {round_id} has no stored retrain config")
    return retrain_from_dict(record.spec, source=f"{registry.path} (round {record.round} of {record.name})")


def run_round(
    loaded: LoadedRetrain,
    *,
    address: str | None = None,
    round_id: int | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    train: Callable[..., Any] | None = None,
) -> RoundResult:
    """Run one round locally (on the Ray cluster at ``address`` or a local one).

    Args:
        loaded: the validated retrain file.
        address: Ray address for the training run.
        round_id: a round already claimed in the registry (by the scheduler); claimed here when None.
        registry: default: the base job's registry.
        progress: passed to run_training.
        train: replaces :func:`orchestrator.cluster.launcher.run_training` (tests).

    Raises:
        RoundBusyError: another round of this model is running.
        StorageError: the base job's ``output.dir`` is a URI that cannot be written (before a round is claimed).
    """
    from orchestrator.cluster.launcher import run_training

    registry = registry or open_round_registry(loaded)
    try:
        check_round_output(loaded)
    except OrchestratorError as exc:
        if round_id is not None:  # the scheduler's claim: its round records why it never started
            registry.update_round(round_id, status="failed", message=str(exc)[:4000])
        raise
    claimed = _claim(loaded, registry, round_id)
    registry.update_round(claimed.id, status="running", host=socket.gethostname(), pid=os.getpid())
    try:
        new_files = _round_files(loaded, registry, claimed)
        if not new_files:
            registry.update_round(claimed.id, status="skipped", message="no new data")
            return RoundResult(name=loaded.name, round=claimed.round, status="skipped", reason="no new data")
        registry.update_round(claimed.id, new_data=[f.to_dict() for f in new_files])
        plan = plan_round(loaded, registry, claimed.round, new_files)
        _log_plan(plan)
        result = (train or run_training)(plan.job, address=address, progress=progress)
        verdict = _judge(loaded, registry, plan, result.metrics)
        record = _register_candidate(registry, plan, result, verdict)
        quantized = _quantize_if_promoted(loaded, registry, plan, record)
        _write_summary(plan, record, verdict, quantized)
        registry.update_round(
            claimed.id, status="succeeded", candidate_id=record.id, decision=verdict.decision, message=verdict.reason
        )
        return RoundResult(
            name=loaded.name,
            round=claimed.round,
            status="succeeded",
            candidate=record,
            decision=verdict.decision,
            reason=verdict.reason,
            scores=verdict.scores,
            forgetting=verdict.forgetting,
            new_files=new_files,
            run_dir=plan.run_dir,
            quantized=quantized,
        )
    except BaseException as exc:
        registry.update_round(claimed.id, status="failed", message=f"{type(exc).__name__}: {exc}"[:4000])
        raise


def _claim(loaded: LoadedRetrain, registry: Registry, round_id: int | None) -> RoundRecord:
    """Claim the next round of the model, or take the round the scheduler claimed (``round_id``).

    Raises:
        RoundBusyError: another round of this model is active.
        OrchestratorError: ``round_id`` is a round of another model, or no longer active.
    """
    name = loaded.name
    if round_id is None:
        claimed = registry.claim_round(name, spec=loaded.resolved(), host=socket.gethostname(), pid=os.getpid())
        if claimed is None:
            active = registry.rounds(name, active_only=True)
            detail = ", ".join(
                f"round {r.round} ({r.status}, job {r.submission_id or f'pid {r.pid}@{r.host}'})" for r in active
            )
            raise RoundBusyError(f"a round of {name} is already running: {detail}; wait for it to finish")
        return claimed
    claimed = registry.get_round(round_id)
    if claimed.name != name or not claimed.active:
        raise OrchestratorError(f"round id {round_id} is {claimed.status} round {claimed.round} of {claimed.name}")
    return claimed


def _round_files(loaded: LoadedRetrain, registry: Registry, claimed: RoundRecord) -> list[DataFile]:
    """The files the round trains on: exactly those the scheduler chose when it claimed the round, else the
    new files in the watched folder now.

    Raises:
        DataError: a file the scheduler chose changed or is gone.
    """
    if not claimed.new_data:
        return find_new_data(loaded, registry, own_round=claimed.id)
    wanted = {item["sha256"] for item in claimed.new_data}
    watch = loaded.config.watch
    found = [f for f in scan_watch(watch.dir, watch.glob) if f.sha256 in wanted]
    new_files = detect_new_data(found, set())
    missing = wanted - {f.sha256 for f in new_files}
    if missing:
        paths = [item["path"] for item in claimed.new_data if item["sha256"] in missing]
        raise DataError(f"the round's files changed or are gone since it was scheduled: {', '.join(paths)}")
    return new_files


def _log_plan(plan: RoundPlan) -> None:
    """Log the plan's warnings, and the labels it adds to the head."""
    for warning in plan.warnings:
        logger.warning("round %s of %s: %s", plan.round, plan.name, warning)
    if plan.labels_added:
        logger.info(
            "round %s of %s: new labels %s; the head grows to %s and each eval set is scored over its own labels",
            plan.round, plan.name, plan.labels_added, plan.label_names,
        )  # fmt: skip


def _judge(loaded: LoadedRetrain, registry: Registry, plan: RoundPlan, metrics: dict[str, Any]) -> _Verdict:
    """Score the trained candidate on every eval set, measure its forgetting against the champion's lineage and
    apply the gate."""
    gate = gate_for(loaded)
    scores = gate_scores(metrics, gate.metric)
    chain = registry.ancestors(plan.champion.id) if plan.champion else []
    forgetting = compute_forgetting(score_history(chain, gate.metric), scores, gate.mode)
    decision, reason = gate_decision(gate, scores, forgetting, plan.new_eval)
    return _Verdict(gate=gate, scores=scores, forgetting=forgetting, decision=decision, reason=reason)


def _register_candidate(registry: Registry, plan: RoundPlan, result: TrainResult, verdict: _Verdict) -> ModelRecord:
    """Register the round's model as a candidate with the round's lineage and data, then record the gate's
    decision on it (in the registry, then in W&B).

    Raises:
        OrchestratorError: the round exported no model.
    """
    # The candidate's cards, with the round's lineage and data (the round's job names no registry of its own).
    write_run_cards(plan.job, result.run_dir, model_path=plan.job.model.path, data=plan.data_record(result.data),
                    registry=registry, final_metrics=result.metrics)  # fmt: skip
    record = register_run(
        plan.job,
        result,
        name=plan.name,
        data=plan.data_record(result.data),
        metrics={"forgetting": verdict.forgetting, "gate": {"metric": verdict.gate.metric, "mode": verdict.gate.mode}},
        round=plan.round,
        registry=registry,
    )
    if record is None:
        raise OrchestratorError(f"round {plan.round} exported no model (set output.save_final: true)")
    decided = registry.decide(record.id, verdict.decision, verdict.reason)
    record_decision(registry, decided.id)  # W&B aliases: champion + production, or rejected
    return decided


def _quantize_if_promoted(
    loaded: LoadedRetrain, registry: Registry, plan: RoundPlan, record: ModelRecord
) -> ModelRecord | None:
    """The new champion quantized, when the retrain file asks for it (``quantize:``) and the gate promoted it."""
    settings = loaded.config.quantize
    if settings is None or record.status != "champion":
        return None
    out = storage.join(str(plan.run_dir), f"quantized-{settings.method}")  # quantize_model takes URIs
    return quantize_champion(registry, record, settings, out if storage.is_uri(out) else Path(out))


def _write_summary(
    plan: RoundPlan, record: ModelRecord, verdict: _Verdict, quantized: ModelRecord | None = None
) -> None:
    """Write the round's outcome as ``round.json`` in its run dir (on the bucket when the run dir is a URI)."""
    summary = {
        "name": plan.name,
        "round": plan.round,
        "candidate": record.id,
        "parent": record.parent,
        "decision": verdict.decision,
        "reason": verdict.reason,
        "scores": verdict.scores,
        "forgetting": verdict.forgetting,
        "new_files": [f.to_dict() for f in plan.new_files],
        "replay": plan.replay,
        "label_names": plan.label_names,
        "labels_added": plan.labels_added,
        "warnings": plan.warnings,
        "quantized": quantized.id if quantized else None,
    }
    storage.write_text(storage.join(str(plan.run_dir), ROUND_SUMMARY_FILE), json.dumps(summary, indent=2))

"""Planning a continual-retraining round, before any cluster resource is used.

:func:`plan_round` warm-starts from the champion (or the base job's model in the first round), reads the new
files and grows the label space over their labels (:mod:`orchestrator.lifecycle.label_space`), writes the round's
training file (new rows + a replay sample of earlier rows, :mod:`orchestrator.lifecycle.replay`) and the new
data's eval holdout under the round's run dir, gathers every eval set seen so far, and writes the round's job
config (``round.yaml``, which ``orchestrator train`` reruns unregistered).

The round's run dir is ``<base job's output.dir>/<name>-round<N>``, the run folder its training run writes into:
a local folder, or a prefix on object storage when ``output.dir`` is a URI. Then every file the round writes for
itself goes to the bucket too, each in one PUT (``orchestrator.storage.write_bytes``): the workers read the
round's data from there like any data URI, and a later round replays and scores it from there. Nothing of the
round is written to a local folder; the registry stays a local SQLite file (``output.registry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import orchestrator.storage as storage
from orchestrator.config import DataSource, JobConfig, config_from_dict
from orchestrator.config.retrain import LoadedRetrain
from orchestrator.errors import DataError
from orchestrator.lifecycle.label_space import growth_refused, label_groups, sort_labels, task_labels, union_label_names
from orchestrator.lifecycle.new_data import DataFile
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord
from orchestrator.lifecycle.replay import replay_pool, sample_replay, split_holdout
from orchestrator.lifecycle.row_io import Rows, RowTriple, jsonl_source, labels_in, read_rows, write_jsonl
from orchestrator.lifecycle.run_registration import artifact_model_path
from orchestrator.run_outputs import run_folder

ROUND_JOB_FILE = "round.yaml"


@dataclass
class RoundPlan:
    """Everything a round will train and evaluate, written to disk, before any cluster resource is used."""

    name: str
    round: int
    champion: ModelRecord | None
    start_model: str
    new_files: list[DataFile]
    job: JobConfig
    run_dir: Path | str  # a Path for a local output.dir, the URI string for a bucket's (as TrainResult.run_dir)
    new_eval: str | None
    learned: dict[str, Any]  # the new rows this round trains on (file, sha256, rows): replayable later
    replay: list[dict[str, Any]]
    label_names: list[str] | None
    warnings: list[str] = field(default_factory=list)
    labels_added: list[str] = field(default_factory=list)  # labels the champion did not know (head grown)

    def data_record(self, summary: dict[str, Any]) -> dict[str, Any]:
        """What the registry records as the candidate's data: the job's files plus where they came from."""
        return {
            **summary,
            "continual": {
                "round": self.round,
                "new": [f.to_dict() for f in self.new_files],
                "learned": self.learned,
                "replay": self.replay,
                "new_eval": self.new_eval,
                "labels_added": self.labels_added,
                "warnings": self.warnings,
            },
        }


@dataclass
class _Planning:
    """What the steps of :func:`plan_round` share: the round, where it writes, and what it starts from."""

    loaded: LoadedRetrain
    round_no: int
    champion: ModelRecord | None
    chain: list[ModelRecord]  # the champion and its registered ancestors, newest first
    out_root: str  # the base job's output.dir: a normalised URI, or an absolute local path
    start_model: str
    label_names: list[str] | None  # grown by the new data's labels (see _grow_label_space)
    labels_added: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def task(self) -> str:
        return self.loaded.job.model.task

    @property
    def classification(self) -> bool:
        return self.task == "sequence-classification"

    @property
    def on_bad_rows(self) -> str:
        return self.loaded.job.data.on_bad_rows

    @property
    def job_name(self) -> str:
        return f"{self.name}-round{self.round_no}"

    @property
    def run_dir(self) -> Path | str:
        """The round's run folder (the training run's too): a URI when ``output.dir`` is one."""
        folder = run_folder(self.out_root, self.job_name)
        return folder if storage.is_uri(folder) else Path(folder)

    def path(self, *parts: str) -> str:
        """A file of the round in its run folder (a URI or an absolute local path)."""
        return storage.join(str(self.run_dir), *parts)

    def read(self, source: DataSource) -> Rows:
        """A file's rows, labels named as the round's label space names them."""
        return read_rows(source, task=self.task, on_bad_rows=self.on_bad_rows, label_names=self.label_names)


def check_round_output(loaded: LoadedRetrain) -> None:
    """Probe the base job's ``output.dir`` when it is a URI, before a round is claimed or a file written: the
    bucket exists, the credentials hold and a small object can be written and deleted there (a local folder is
    checked by the round's training run, as for any job).

    Raises:
        StorageError: naming ``job.output.dir``, the URI and the fix (a missing bucket, wrong credentials, an
            endpoint that does not answer).
    """
    out = loaded.job.output.dir
    if not storage.is_uri(out):
        return
    try:
        storage.check(out, write=True)
    except storage.StorageError as exc:
        raise storage.StorageError(f"job.output.dir: {exc}") from exc


def plan_round(
    loaded: LoadedRetrain,
    registry: Registry,
    round_no: int,
    new_files: Sequence[DataFile],
) -> RoundPlan:
    """Write the round's data files and build its job config (no training yet).

    Raises:
        DataError: a new file brings labels the model does not know and the label space may not grow (see
            :mod:`orchestrator.lifecycle.label_space`), or a file cannot be read.
    """
    plan = _start_planning(loaded, registry, round_no)
    new_sources, new_rows = _read_new_files(plan, new_files)
    _grow_label_space(plan, new_sources, new_rows)
    train_rows, holdout_rows = _split_new_rows(plan, new_files, new_rows)
    has_pairs = _any_pairs(train_rows + holdout_rows)
    learned = _write_learned_rows(plan, train_rows, has_pairs)
    replay_rows, replay_record = _replay_rows(plan)
    has_pairs = has_pairs or _any_pairs(replay_rows)
    train_path = plan.path("data", "train.jsonl")
    write_jsonl(train_path, train_rows + replay_rows)
    evals = _earlier_eval_sets(plan)
    new_eval = _add_holdout(plan, evals, new_files, holdout_rows, has_pairs)
    if plan.classification:
        _set_eval_labels(plan, evals)
    round_job = _round_job(plan, train_path, evals, has_pairs)
    _write_round_job(plan, round_job)
    return RoundPlan(
        name=plan.name,
        round=round_no,
        champion=plan.champion,
        start_model=plan.start_model,
        new_files=list(new_files),
        job=round_job,
        run_dir=plan.run_dir,
        new_eval=new_eval,
        learned=learned,
        replay=replay_record,
        label_names=plan.label_names if plan.classification else None,
        warnings=plan.warnings,
        labels_added=plan.labels_added,
    )


def _start_planning(loaded: LoadedRetrain, registry: Registry, round_no: int) -> _Planning:
    """The champion and its lineage, and the model and labels the round starts from: the champion's (its folder
    or URI), else the base job's."""
    base = loaded.job
    champion = registry.champion(loaded.name)
    chain = registry.ancestors(champion.id) if champion else []
    out_root = storage.normalize(base.output.dir)  # a URI stays one (Path() would make it <cwd>/s3:/...)
    if champion is not None:
        start_model = artifact_model_path(champion)  # a URI stays one: model.path takes URIs
        label_names = champion.data.get("label_names") or base.data.label_names
    else:
        start_model = base.model.path
        label_names = base.data.label_names
    return _Planning(
        loaded=loaded,
        round_no=round_no,
        champion=champion,
        chain=chain,
        out_root=out_root,
        start_model=start_model,
        label_names=label_names,
    )


def _read_new_files(plan: _Planning, new_files: Sequence[DataFile]) -> tuple[list[DataSource], list[Rows]]:
    """Each new file as a data source (read like the base job's training file) and its rows."""
    base = plan.loaded.job
    new_sources = [plan.loaded.config.watch.source_for(f.path, base.data.train) for f in new_files]
    return new_sources, [plan.read(s) for s in new_sources]


def _grow_label_space(plan: _Planning, new_sources: Sequence[DataSource], new_rows: Sequence[Rows]) -> None:
    """Classification: the round's labels become the union of the model's and the new data's (or the new
    data's, sorted, when neither the champion nor the base job names any).

    Raises:
        DataError: the new data brings labels and the label space may not grow in this round.
    """
    if not plan.classification:
        return
    found = {label for rows in new_rows for label in rows.labels if label is not None}
    if plan.label_names is None:
        plan.label_names = sort_labels(found)
        return
    known = list(plan.label_names)
    plan.label_names = union_label_names(known, found)
    plan.labels_added = plan.label_names[len(known) :]
    refused = growth_refused(plan.loaded, plan.champion) if plan.labels_added else None
    if refused:
        paths = ", ".join(s.path for s in new_sources)
        raise DataError(
            f"{paths}: the new data's labels {sort_labels(found)} include {plan.labels_added}, which the model's "
            f"label set {known} does not have; {refused}"
        )


def _split_new_rows(
    plan: _Planning, new_files: Sequence[DataFile], new_rows: Sequence[Rows]
) -> tuple[list[RowTriple], list[RowTriple]]:
    """Each new file split into training rows and a held-out eval slice, both fixed by seed and content.

    Raises:
        DataError: a file's content changed since it was found.
    """
    rc = plan.loaded.config
    train_rows: list[RowTriple] = []
    holdout_rows: list[RowTriple] = []
    for rows, f in zip(new_rows, new_files):
        if rows.sha256 != f.sha256:
            raise DataError(f"{f.path} changed while the round was being planned; run the round again")
        keep, held = split_holdout(
            len(rows), fraction=rc.eval.holdout_fraction, seed=rc.replay.seed, sha256=f.sha256,
            max_rows=rc.eval.holdout_max,
        )  # fmt: skip
        train_rows += rows.pick(keep)
        holdout_rows += rows.pick(held)
    return train_rows, holdout_rows


def _any_pairs(rows: Sequence[RowTriple]) -> bool:
    """Whether any row has a text pair."""
    return any(p is not None for _, p, _ in rows)


def _write_learned_rows(plan: _Planning, train_rows: Sequence[RowTriple], has_pairs: bool) -> dict[str, Any]:
    """Write the new training rows (``new_train.jsonl``), which later rounds replay; returns their record."""
    learned_path = plan.path("data", "new_train.jsonl")
    written = write_jsonl(learned_path, train_rows)
    learned_source = jsonl_source(learned_path, name="new_train", pairs=has_pairs, labels=plan.classification)
    return {"source": learned_source, "sha256": written.sha256, "rows": written.rows}


def _replay_rows(plan: _Planning) -> tuple[list[RowTriple], list[dict[str, Any]]]:
    """A seeded sample of the rows the champion and its ancestors learned, and the record of where they came
    from; a file that changed since it was trained on is skipped with a warning."""
    rc = plan.loaded.config
    pool = replay_pool(plan.chain, plan.warnings)
    k = rc.replay.amount(sum(e.rows for e in pool))
    picks = sample_replay(pool, k, seed=rc.replay.seed, round_no=plan.round_no)
    replay_rows: list[RowTriple] = []
    replay_record = []
    for entry in sorted(pool, key=lambda e: e.sha256):
        if entry.sha256 not in picks:
            continue
        source = DataSource.model_validate(entry.source)
        rows = plan.read(source)
        if rows.sha256 != entry.sha256 or len(rows) != entry.rows:
            plan.warnings.append(f"replay: {source.path} changed since it was trained on; its rows are not replayed")
            continue
        chosen = picks[entry.sha256]
        replay_rows += rows.pick(chosen)
        replay_record.append({"path": source.path, "sha256": entry.sha256, "rows": int(len(chosen))})
    return replay_rows, replay_record


def _earlier_eval_sets(plan: _Planning) -> dict[str, dict[str, Any]]:
    """The eval sets by name: the base job's, the extra ones, then every one an ancestor was scored on (oldest
    first); the first of a name wins, and a file that is gone is skipped with a warning."""
    evals: dict[str, dict[str, Any]] = {}

    def add_eval(source: dict[str, Any], origin: str) -> None:
        display = source.get("name") or Path(source["path"]).stem
        if display in evals:
            return
        if not storage.is_file(source["path"]):
            plan.warnings.append(f"eval set {display} ({origin}): {source['path']} is gone; not scored this round")
            return
        evals[display] = {**source, "name": display}

    for s in plan.loaded.job.data.eval:
        add_eval(s.model_dump(), "base job")
    for s in plan.loaded.config.eval.extra:
        add_eval(s.model_dump(), "eval.extra")
    for record in reversed(plan.chain):  # oldest first
        for s in (record.config.get("data") or {}).get("eval", []):
            add_eval(s, record.id)
    return evals


def _add_holdout(
    plan: _Planning,
    evals: dict[str, dict[str, Any]],
    new_files: Sequence[DataFile],
    holdout_rows: Sequence[RowTriple],
    has_pairs: bool,
) -> str | None:
    """Write the new data's held-out rows (``new_eval.jsonl``) and add them as an eval set; returns its name
    (None: no rows were held out)."""
    if not holdout_rows:
        return None
    new_eval = _eval_name_for(new_files, plan.round_no, set(evals))
    holdout_path = plan.path("data", "new_eval.jsonl")
    write_jsonl(holdout_path, holdout_rows)
    evals[new_eval] = jsonl_source(holdout_path, name=new_eval, pairs=has_pairs, labels=plan.classification)
    return new_eval


def _eval_name_for(new_files: Sequence[DataFile], round_no: int, taken: set[str]) -> str:
    """The name of the new data's eval set: the file's stem (one file) or ``round<N>``, made unique."""
    stem = Path(new_files[0].path).stem if len(new_files) == 1 else f"round{round_no}"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or f"round{round_no}"
    while name in taken:
        name = f"{name}_r{round_no}"
    return name


def _set_eval_labels(plan: _Planning, evals: dict[str, dict[str, Any]]) -> None:
    """Per-task evaluation once the label space has grown: each eval set keeps the labels it sets or an earlier
    round recorded for it, else gets those of the label groups its rows use (see
    :mod:`orchestrator.lifecycle.label_space`)."""
    assert plan.label_names is not None
    recorded: dict[str, list[str]] = {}
    for record in plan.chain:  # newest first: the latest recorded subset wins
        for s in (record.config.get("data") or {}).get("eval", []):
            if s.get("labels"):
                recorded.setdefault(s.get("name") or Path(s["path"]).stem, s["labels"])
    groups = label_groups([*(r.data.get("label_names") for r in reversed(plan.chain)), plan.label_names])
    for display, source in evals.items():
        subset = source.get("labels") or recorded.get(display)
        if subset is None and len(groups) > 1:
            found_here = labels_in(source, task=plan.task, label_names=plan.label_names, on_bad_rows=plan.on_bad_rows)
            subset = task_labels(found_here, groups)
        source["labels"] = subset


def _round_job(plan: _Planning, train_path: str, evals: dict[str, dict[str, Any]], has_pairs: bool) -> JobConfig:
    """The base job with the round's model, data, label space, output and tracking, validated.

    Raises:
        ConfigError: the round's job does not validate.
    """
    rc = plan.loaded.config
    job = plan.loaded.job.to_dict()
    job["name"] = plan.job_name
    job["model"]["path"] = plan.start_model
    job["data"]["train"] = {**jsonl_source(train_path, name="train", pairs=has_pairs, labels=plan.classification)}
    job["data"]["eval"] = list(evals.values())
    if plan.classification:
        job["data"]["label_names"] = plan.label_names
        job["model"]["grow_head"] = bool(plan.labels_added)  # warm start: the champion's head gets rows for them
    job["output"]["dir"] = plan.out_root
    job["output"]["registry"] = None  # the round registers its candidate itself, with the round's lineage
    if rc.l2_to_champion > 0 and plan.champion is not None:
        job["regularization"] = {**job.get("regularization", {}), "l2_to_start": rc.l2_to_champion}
    wandb = job.setdefault("tracking", {}).setdefault("wandb", {})
    wandb["group"] = wandb.get("group") or plan.name
    wandb["tags"] = [*wandb.get("tags", []), "retrain", f"round{plan.round_no}"]
    return config_from_dict(job, source=f"{plan.job_name} (round job)")


def _write_round_job(plan: _Planning, round_job: JobConfig) -> None:
    """Write the round's job config as ``round.yaml`` in its run dir."""
    path = plan.path(ROUND_JOB_FILE)
    # A job file is read from a local disk (orchestrator train takes no URI for it): say so for a bucket's copy.
    rerun = f"a local copy of {path}" if storage.is_uri(path) else path
    storage.write_text(
        path,
        f"# round {plan.round_no} of {plan.name}: orchestrator train {rerun} reruns it (unregistered)\n"
        + yaml.safe_dump(round_job.to_dict(), sort_keys=False),
    )

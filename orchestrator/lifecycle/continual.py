"""Continual retraining: one round = new data found by content hash, warm start from the champion, replay of
earlier data, evaluation on every eval set seen so far, and a promotion gate.

The parts are pure functions, testable without a cluster:

* :func:`detect_new_data`: files in the watched folder whose sha256 no model of this name was trained on;
* :func:`split_holdout` and :func:`sample_replay`: seeded, reproducible row choices;
* :func:`compute_forgetting` and :func:`gate_decision`: best earlier score − new score per old eval set, and
  champion or rejected candidate with the reason.

:func:`run_round` assembles them: it writes the round's training file (new rows + replay sample) and eval
holdout under the round's run dir, writes the round's job config (``round.yaml``), trains it with
:func:`orchestrator.cluster.launcher.run_training`, registers the candidate with its lineage and applies the gate.

A new label space (SST-2 negative/positive, then AG News World/Sports/Business/Sci/Tech) grows the head
over the union of the labels, so forgetting across tasks can be measured:

* **Union label space.** The round's labels are the champion's, ids unchanged, then the labels it does not
  know, sorted (:func:`union_label_names`: the order never depends on the order rows or files arrive in).
* **Expanded head.** The round job sets ``model.grow_head``: each worker loads the champion with its own
  label count and grows the classifier's output layer (:func:`orchestrator.models.loading.grow_classifier`): old rows
  (weights and bias) copied, new rows initialised like a fresh head, everything else loaded as is. The
  exported model's config (num_labels, id2label, label2id) is the union.
* **Evaluation per task.** Each label group (the labels one round added, :func:`label_groups`) is a task.
  Once there are two, every eval set is scored over the labels of the groups its rows use (task-incremental
  evaluation, :func:`task_labels`; labels set on the eval set, or recorded for it by an earlier round, win):
  its ``data.eval[].labels`` are set, the logits of the other labels are
  masked out before argmax, loss and macro-F1, so SST-2 accuracy stays comparable across rounds while the head
  also knows AG News. A subset is recorded in the round's job config (and so carried to later rounds) and with
  each eval set in the registry's data record.
* **Replay** mixes earlier rows with their own labels (SST-2 rows keep negative/positive) into the new round;
  the training loss is over the whole union.

Refused, with both label sets named: new labels with ``new_labels: refuse`` in the retrain file, in the first
round (no champion to grow: the base job's ``data.label_names`` must list them), with ``method: distill`` (the
teacher's head does not know them), and integer labels beyond the model's ids when its labels are names
(a third label, or a typo?). Causal LMs have no labels and are unaffected; so are plain training jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from orchestrator.config import DataSource, JobConfig, config_from_dict
from orchestrator.config.retrain import LoadedRetrain, retrain_from_dict
from orchestrator.errors import DataError, OrchestratorError
from orchestrator.lifecycle.registry import ModelRecord, Registry, RoundRecord, local_artifact, registry_path

logger = logging.getLogger(__name__)

ROUND_JOB_FILE = "round.yaml"
ROUND_SUMMARY_FILE = "round.json"


class RoundBusyError(OrchestratorError):
    """Another round of the same model is running."""


# --------------------------------------------------------------------------------------------------
# New data by content hash
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFile:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, recomputed only when size or mtime change (the scheduler polls the same files)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int, str]] = {}

    def __call__(self, path: Path) -> str:
        stat = path.stat()
        key = str(path)
        cached = self._known.get(key)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = sha256_file(path)
        self._known[key] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest


def scan_watch(
    folder: str,
    pattern: str,
    *,
    settle_s: float = 0.0,
    now: float | None = None,
    hasher: Callable[[Path], str] = lambda p: sha256_file(p),
) -> list[DataFile]:
    """Data files in the watched folder (sorted by path), skipping files modified in the last ``settle_s``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"watch.dir {folder}: not a folder (check the path; the round job must see it too)")
    now = time.time() if now is None else now
    files = []
    for path in sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        if settle_s > 0 and now - stat.st_mtime < settle_s:
            continue
        files.append(DataFile(path=str(path.resolve()), sha256=hasher(path), size=stat.st_size))
    return files


def trained_hashes(models: Iterable[ModelRecord], rounds: Iterable[RoundRecord] = ()) -> set[str]:
    """Content hashes of every file a model of this name was trained on (rejected candidates included, so a
    shard that failed the gate is not retried each round), plus those of rounds now running."""
    seen: set[str] = set()
    for m in models:
        train = m.data.get("train") or {}
        if train.get("sha256") and not m.data.get("continual"):
            seen.add(train["sha256"])
        for item in (m.data.get("continual") or {}).get("new", []):
            seen.add(item["sha256"])
    for r in rounds:
        if r.active:
            seen.update(item["sha256"] for item in r.new_data)
    return seen


def detect_new_data(files: Sequence[DataFile], seen: set[str]) -> list[DataFile]:
    """Files whose content was never trained on; a file copied twice (same hash) counts once."""
    new, taken = [], set(seen)
    for f in files:
        if f.sha256 not in taken:
            new.append(f)
            taken.add(f.sha256)
    return new


# --------------------------------------------------------------------------------------------------
# Reproducible row choices
# --------------------------------------------------------------------------------------------------


def _hash_seed(sha256: str) -> int:
    return int(sha256[:15], 16)


def split_holdout(
    n_rows: int, *, fraction: float, seed: int, sha256: str, max_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train row indices, held-out row indices) of one file, fixed by seed and the file's content."""
    k = 0 if fraction <= 0 else max(1, round(n_rows * fraction))
    if max_rows is not None:
        k = min(k, max_rows)
    k = min(k, n_rows - 1)  # keep at least one training row
    order = np.random.default_rng([seed, _hash_seed(sha256)]).permutation(n_rows)
    return np.sort(order[k:]), np.sort(order[:k])


@dataclass(frozen=True)
class PoolEntry:
    """Earlier training data: one file (as read), its sha256 and its number of training rows."""

    source: dict[str, Any]
    sha256: str
    rows: int


def sample_replay(pool: Sequence[PoolEntry], k: int, *, seed: int, round_no: int) -> dict[str, np.ndarray]:
    """Choose k earlier rows without replacement: ``{sha256: sorted row indices}``.

    The pool is ordered by content hash, so the sample depends only on (seed, round, pool contents), not on
    paths or the order files were found in; each round draws a fresh sample."""
    ordered = sorted(pool, key=lambda e: e.sha256)
    total = sum(e.rows for e in ordered)
    k = min(k, total)
    if k <= 0:
        return {}
    chosen = np.sort(np.random.default_rng([seed, round_no]).choice(total, size=k, replace=False))
    starts = np.cumsum([0] + [e.rows for e in ordered])
    out: dict[str, np.ndarray] = {}
    for i, e in enumerate(ordered):
        rows = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(rows):
            out[e.sha256] = rows
    return out


# --------------------------------------------------------------------------------------------------
# Forgetting and the promotion gate
# --------------------------------------------------------------------------------------------------


def score_history(chain: Sequence[ModelRecord], metric: str) -> dict[str, list[float]]:
    """``{eval set: [score of each earlier model that was scored on it]}`` from registry records."""
    history: dict[str, list[float]] = {}
    for record in chain:
        for eval_set, values in record.eval_metrics.items():
            if metric in values and values[metric] is not None and math.isfinite(values[metric]):
                history.setdefault(eval_set, []).append(float(values[metric]))
    return history


def compute_forgetting(history: dict[str, list[float]], new_scores: dict[str, float], mode: str) -> dict[str, float]:
    """Per earlier eval set: best earlier score − new score (max mode) or new − best earlier (min mode).
    Positive means the new model forgot; eval sets without an earlier score are left out."""
    out = {}
    for name, earlier in history.items():
        if not earlier or name not in new_scores:
            continue
        if mode == "max":
            out[name] = max(earlier) - new_scores[name]
        else:
            out[name] = new_scores[name] - min(earlier)
    return out


@dataclass(frozen=True)
class Gate:
    """The gate's thresholds (see :class:`orchestrator.config.retrain.GateSection`), 'auto' decided."""

    metric: str
    mode: str
    min_new: float | None = None
    max_forgetting: float | None = None
    floor: float | None = None


def gate_decision(
    gate: Gate, new_scores: dict[str, float], forgetting: dict[str, float], new_eval: str | None
) -> tuple[str, str]:
    """'promote' or 'reject', with a reason naming every check and its numbers."""
    better = (lambda a, b: a >= b) if gate.mode == "max" else (lambda a, b: a <= b)
    word = "≥" if gate.mode == "max" else "≤"
    failed, passed = [], []
    if gate.min_new is not None:
        if new_eval is None or new_eval not in new_scores:
            failed.append(f"no score on the new data ({new_eval or 'no holdout'}) to compare with min_new")
        else:
            value = new_scores[new_eval]
            ok = better(value, gate.min_new)
            (passed if ok else failed).append(
                f"new data {new_eval} {gate.metric} {value:.4f} {'' if ok else 'not '}{word} {gate.min_new:g}"
            )
    if gate.max_forgetting is not None and forgetting:
        worst = max(forgetting, key=lambda n: forgetting[n])
        too_much = {n: f for n, f in forgetting.items() if f > gate.max_forgetting + 1e-12}
        if too_much:
            items = ", ".join(f"{n} {f:+.4f}" for n, f in sorted(too_much.items()))
            failed.append(f"forgetting above {gate.max_forgetting:g} on {items}")
        else:
            passed.append(f"max forgetting {forgetting[worst]:+.4f} ({worst}) ≤ {gate.max_forgetting:g}")
    if gate.floor is not None and new_scores:
        below = {n: v for n, v in new_scores.items() if not better(v, gate.floor)}
        if below:
            items = ", ".join(f"{n} {v:.4f}" for n, v in sorted(below.items()))
            failed.append(f"{'below' if gate.mode == 'max' else 'above'} the floor {gate.floor:g}: {items}")
        else:
            edge = min(new_scores.values()) if gate.mode == "max" else max(new_scores.values())
            passed.append(f"every eval set {word} floor {gate.floor:g} (worst {edge:.4f})")
    if failed:
        return "reject", "rejected: " + "; ".join(failed) + (f" (passed: {'; '.join(passed)})" if passed else "")
    return "promote", "promoted: " + ("; ".join(passed) if passed else "no gate checks configured")


# --------------------------------------------------------------------------------------------------
# Reading and writing rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Rows of one file as (text, text pair, label name), and the file's content hash."""

    texts: list[str]
    pairs: list[str | None]
    labels: list[str | None]
    sha256: str

    def __len__(self) -> int:
        return len(self.texts)


def read_rows(source: DataSource, *, task: str, on_bad_rows: str, label_names: list[str] | None) -> Rows:
    """Read a file's valid rows with label names.

    With ``label_names`` (the model's labels in id order), a label that is one of them, or the 0-based id of
    one, becomes that name; any other label is kept as it is: a label the model does not know yet (see
    :func:`union_label_names`).

    Raises:
        DataError: unreadable file or bad row; or an integer label beyond the model's ids while its labels are
            names (a new label or a typo?), naming both label sets.
    """
    from orchestrator.data.readers import RowReader
    from orchestrator.data.sources import scan_source

    discovered: dict[str, int] = {}
    scanned = scan_source(source, task=task, label_to_id=None, on_bad_rows=on_bad_rows, collect_labels=discovered)
    by_provisional = {i: key for key, i in discovered.items()}
    if task == "sequence-classification" and label_names is not None:
        ids_are_names = all(n.isdigit() for n in label_names)
        ambiguous = [k for k in discovered if k not in label_names and k.isdigit() and not ids_are_names]
        ambiguous = [k for k in ambiguous if int(k) >= len(label_names)]
        if ambiguous:
            raise DataError(
                f"{source.path}: its labels {_sort_labels(discovered)} include ids {_sort_labels(ambiguous)} beyond "
                f"the model's label set {label_names} (ids 0-{len(label_names) - 1}); write new labels as names, "
                "not numbers"
            )

    def name_of(key: str) -> str:
        if label_names is None or key in label_names or not (key.isdigit() and int(key) < len(label_names)):
            return key
        return label_names[int(key)]

    reader = RowReader(scanned)
    texts, pairs, labels = [], [], []
    try:
        for i in range(len(scanned)):
            text, pair, provisional = reader.get(i)
            label = None
            if task == "sequence-classification":
                label = name_of(by_provisional[int(provisional)])
            texts.append(text)
            pairs.append(pair)
            labels.append(label)
    finally:
        reader.close()
    return Rows(texts=texts, pairs=pairs, labels=labels, sha256=scanned.sha256)


def write_jsonl(path: Path, rows: Iterable[tuple[str, str | None, str | None]]) -> int:
    """Write rows as jsonl ({text, text_pair?, label?}); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for text, pair, label in rows:
            row: dict[str, Any] = {"text": text}
            if pair is not None:
                row["text_pair"] = pair
            if label is not None:
                row["label"] = label
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def jsonl_source(path: Path, *, name: str, pairs: bool, labels: bool) -> dict[str, Any]:
    return {
        "path": str(path),
        "name": name,
        "format": "jsonl",
        "text_column": "text",
        "text_pair_column": "text_pair" if pairs else None,
        "label_column": "label" if labels else None,
    }


def _sort_labels(names: Iterable[str]) -> list[str]:
    names = list(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


# --------------------------------------------------------------------------------------------------
# A growing label space
# --------------------------------------------------------------------------------------------------


def union_label_names(known: Sequence[str], found: Iterable[str]) -> list[str]:
    """The model's labels (ids unchanged), then the labels it does not know yet, sorted (numbers numerically),
    so the order does not depend on the order rows or files arrive in."""
    known = list(known)
    return known + _sort_labels(set(found) - set(known))


def label_groups(spaces: Iterable[Sequence[str] | None]) -> list[list[str]]:
    """The label space as groups of labels added together (one task each), from the label spaces of a lineage,
    oldest first: each group is what a space added to the ones before it."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    for space in spaces:
        added = [n for n in space or [] if n not in seen]
        if added:
            groups.append(added)
            seen.update(added)
    return groups


def task_labels(found: Iterable[str], groups: Sequence[Sequence[str]]) -> list[str] | None:
    """The labels an eval set is scored over: every group its labels touch, in id order. None (all labels) when
    there is one group, when that is every label, or when fewer than 2 labels would be left."""
    found = set(found)
    chosen = [n for group in groups if found & set(group) for n in group]
    if len(groups) <= 1 or len(chosen) < 2 or len(chosen) == sum(len(g) for g in groups):
        return None
    return chosen


def _labels_in(source: dict[str, Any], *, task: str, label_names: list[str], on_bad_rows: str) -> set[str]:
    """The label names that occur in an eval file (ids mapped to names as training maps them)."""
    from orchestrator.data.sources import scan_source

    scanned = scan_source(
        DataSource.model_validate(source),
        task=task,
        label_to_id={n: i for i, n in enumerate(label_names)},
        on_bad_rows=on_bad_rows,
    )
    return {label_names[int(i)] for i in np.unique(scanned.labels)}


def _growth_refused(loaded: LoadedRetrain, champion: ModelRecord | None) -> str | None:
    """Why the label space may not grow in this round (None: it may)."""
    if loaded.config.new_labels == "refuse":
        return (
            "new_labels: refuse keeps the model's label space (set new_labels: grow to add them to the head, or "
            "train a file from another task under its own model name)"
        )
    if champion is None:
        return (
            "the first round has no champion whose head could grow; list them in the base job's data.label_names "
            "(or leave label_names unset to take the labels from the new data)"
        )
    if loaded.job.method == "distill":
        return "method: distill cannot grow the label space (the teacher's classifier does not know the new labels)"
    return None


# --------------------------------------------------------------------------------------------------
# One round
# --------------------------------------------------------------------------------------------------


@dataclass
class RoundPlan:
    """Everything a round will train and evaluate, written to disk, before any cluster resource is used."""

    name: str
    round: int
    champion: ModelRecord | None
    start_model: str
    new_files: list[DataFile]
    job: JobConfig
    run_dir: Path
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


def _eval_name_for(new_files: Sequence[DataFile], round_no: int, taken: set[str]) -> str:
    stem = Path(new_files[0].path).stem if len(new_files) == 1 else f"round{round_no}"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or f"round{round_no}"
    while name in taken:
        name = f"{name}_r{round_no}"
    return name


def _replay_pool(chain: Sequence[ModelRecord], warnings: list[str]) -> list[PoolEntry]:
    pool: dict[str, PoolEntry] = {}
    for record in chain:
        continual = record.data.get("continual")
        if continual:
            learned = continual.get("learned") or {}
            if learned.get("sha256") and learned.get("rows"):
                pool.setdefault(learned["sha256"], PoolEntry(learned["source"], learned["sha256"], learned["rows"]))
            continue
        train = record.data.get("train") or {}
        source = (record.config.get("data") or {}).get("train")
        if train.get("sha256") and source:
            pool.setdefault(train["sha256"], PoolEntry(source, train["sha256"], int(train.get("rows", 0))))
    available = []
    for entry in pool.values():
        path = Path(entry.source["path"])
        if not path.is_file():
            warnings.append(f"replay: {path} is gone; its {entry.rows} rows are not replayed")
            continue
        available.append(entry)
    return available


def plan_round(
    loaded: LoadedRetrain,
    registry: Registry,
    round_no: int,
    new_files: Sequence[DataFile],
    *,
    cache_dir: Path | None = None,
) -> RoundPlan:
    """Write the round's data files and build its job config (no training yet).

    Raises:
        DataError: a new file brings labels the model does not know and the label space may not grow (see the
            module docstring), or a file cannot be read.
    """
    rc, base = loaded.config, loaded.job
    name = loaded.name
    task = base.model.task
    classification = task == "sequence-classification"
    champion = registry.champion(name)
    chain = registry.ancestors(champion.id) if champion else []
    warnings: list[str] = []
    out_root = Path(base.output.dir).expanduser().resolve()
    job_name = f"{name}-round{round_no}"
    run_dir = out_root / job_name
    data_dir = run_dir / "data"

    if champion is not None:
        start_model = local_artifact(champion, cache_dir or out_root / ".artifact-cache")
        label_names = champion.data.get("label_names") or base.data.label_names
    else:
        start_model = base.model.path
        label_names = base.data.label_names

    # New rows: each file split into train rows and a held-out eval slice, both fixed by seed and content.
    new_sources = [rc.watch.source_for(f.path, base.data.train) for f in new_files]
    new_rows = [
        read_rows(s, task=task, on_bad_rows=base.data.on_bad_rows, label_names=label_names) for s in new_sources
    ]
    found = {label for rows in new_rows for label in rows.labels if label is not None}
    labels_added: list[str] = []
    if classification and label_names is None:
        label_names = _sort_labels(found)
    elif classification:
        known = list(label_names)
        label_names = union_label_names(known, found)
        labels_added = label_names[len(known) :]
        refused = _growth_refused(loaded, champion) if labels_added else None
        if refused:
            paths = ", ".join(s.path for s in new_sources)
            raise DataError(
                f"{paths}: the new data's labels {_sort_labels(found)} include {labels_added}, which the model's "
                f"label set {known} does not have; {refused}"
            )
    train_rows: list[tuple[str, str | None, str | None]] = []
    holdout_rows: list[tuple[str, str | None, str | None]] = []
    for rows, f in zip(new_rows, new_files):
        if rows.sha256 != f.sha256:
            raise DataError(f"{f.path} changed while the round was being planned; run the round again")
        keep, held = split_holdout(
            len(rows), fraction=rc.eval.holdout_fraction, seed=rc.replay.seed, sha256=f.sha256,
            max_rows=rc.eval.holdout_max,
        )  # fmt: skip
        train_rows += [(rows.texts[i], rows.pairs[i], rows.labels[i]) for i in keep]
        holdout_rows += [(rows.texts[i], rows.pairs[i], rows.labels[i]) for i in held]
    has_pairs = any(p is not None for _, p, _ in train_rows + holdout_rows)

    learned_path = data_dir / "new_train.jsonl"
    write_jsonl(learned_path, train_rows)
    learned_source = jsonl_source(learned_path, name="new_train", pairs=has_pairs, labels=classification)
    learned = {"source": learned_source, "sha256": sha256_file(learned_path), "rows": len(train_rows)}

    # Replay: a seeded sample of the rows the champion and its ancestors learned.
    pool = _replay_pool(chain, warnings)
    k = rc.replay.amount(sum(e.rows for e in pool))
    picks = sample_replay(pool, k, seed=rc.replay.seed, round_no=round_no)
    replay_rows: list[tuple[str, str | None, str | None]] = []
    replay_record = []
    for entry in sorted(pool, key=lambda e: e.sha256):
        if entry.sha256 not in picks:
            continue
        source = DataSource.model_validate(entry.source)
        rows = read_rows(source, task=task, on_bad_rows=base.data.on_bad_rows, label_names=label_names)
        if rows.sha256 != entry.sha256 or len(rows) != entry.rows:
            warnings.append(f"replay: {source.path} changed since it was trained on; its rows are not replayed")
            continue
        chosen = picks[entry.sha256]
        replay_rows += [(rows.texts[i], rows.pairs[i], rows.labels[i]) for i in chosen]
        replay_record.append({"path": source.path, "sha256": entry.sha256, "rows": int(len(chosen))})
    has_pairs = has_pairs or any(p is not None for _, p, _ in replay_rows)
    train_path = data_dir / "train.jsonl"
    write_jsonl(train_path, train_rows + replay_rows)

    # Eval sets: the base job's, the extra ones, every one an ancestor was scored on, and the new holdout.
    evals: dict[str, dict[str, Any]] = {}

    def add_eval(source: dict[str, Any], origin: str) -> None:
        display = source.get("name") or Path(source["path"]).stem
        if display in evals:
            return
        if not Path(source["path"]).expanduser().is_file():
            warnings.append(f"eval set {display} ({origin}): {source['path']} is gone; not scored this round")
            return
        evals[display] = {**source, "name": display}

    for s in base.data.eval:
        add_eval(s.model_dump(), "base job")
    for s in rc.eval.extra:
        add_eval(s.model_dump(), "eval.extra")
    for record in reversed(chain):  # oldest first
        for s in (record.config.get("data") or {}).get("eval", []):
            add_eval(s, record.id)
    new_eval = None
    if holdout_rows:
        new_eval = _eval_name_for(new_files, round_no, set(evals))
        holdout_path = data_dir / "new_eval.jsonl"
        write_jsonl(holdout_path, holdout_rows)
        evals[new_eval] = jsonl_source(holdout_path, name=new_eval, pairs=has_pairs, labels=classification)

    # Per-task evaluation once the label space has grown: each eval set keeps the labels an earlier round
    # recorded for it, else gets those of the label groups its rows use (see the module docstring).
    if classification:
        recorded: dict[str, list[str]] = {}
        for record in chain:  # newest first: the latest recorded subset wins
            for s in (record.config.get("data") or {}).get("eval", []):
                if s.get("labels"):
                    recorded.setdefault(s.get("name") or Path(s["path"]).stem, s["labels"])
        groups = label_groups([*(r.data.get("label_names") for r in reversed(chain)), label_names])
        for display, source in evals.items():
            subset = source.get("labels") or recorded.get(display)
            if subset is None and len(groups) > 1:
                found_here = _labels_in(source, task=task, label_names=label_names, on_bad_rows=base.data.on_bad_rows)
                subset = task_labels(found_here, groups)
            source["labels"] = subset

    job = base.to_dict()
    job["name"] = job_name
    job["model"]["path"] = start_model
    job["data"]["train"] = {**jsonl_source(train_path, name="train", pairs=has_pairs, labels=classification)}
    job["data"]["eval"] = list(evals.values())
    if classification:
        job["data"]["label_names"] = label_names
        job["model"]["grow_head"] = bool(labels_added)  # warm start: the champion's head gets rows for them
    job["output"]["dir"] = str(out_root)
    job["output"]["registry"] = None  # the round registers its candidate itself, with the round's lineage
    if rc.l2_to_champion > 0 and champion is not None:
        job["regularization"] = {**job.get("regularization", {}), "l2_to_start": rc.l2_to_champion}
    wandb = job.setdefault("tracking", {}).setdefault("wandb", {})
    wandb["group"] = wandb.get("group") or name
    wandb["tags"] = [*wandb.get("tags", []), "retrain", f"round{round_no}"]
    round_job = config_from_dict(job, source=f"{job_name} (round job)")
    (run_dir / ROUND_JOB_FILE).write_text(
        f"# round {round_no} of {name}: orchestrator train {run_dir / ROUND_JOB_FILE} reruns it (unregistered)\n"
        + yaml.safe_dump(round_job.to_dict(), sort_keys=False)
    )
    return RoundPlan(
        name=name,
        round=round_no,
        champion=champion,
        start_model=start_model,
        new_files=list(new_files),
        job=round_job,
        run_dir=run_dir,
        new_eval=new_eval,
        learned=learned,
        replay=replay_record,
        label_names=label_names if classification else None,
        warnings=warnings,
        labels_added=labels_added,
    )


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
    run_dir: Path | None = None


def gate_for(loaded: LoadedRetrain) -> Gate:
    metric, mode = loaded.config.gate.resolved(loaded.job.model.task)
    g = loaded.config.gate
    return Gate(metric=metric, mode=mode, min_new=g.min_new, max_forgetting=g.max_forgetting, floor=g.floor)


def open_round_registry(loaded: LoadedRetrain) -> Registry:
    path = registry_path(loaded.job)
    if path is None:
        raise OrchestratorError("the base job's output.registry is null; retraining needs a registry")
    return Registry(path)


def find_new_data(
    loaded: LoadedRetrain,
    registry: Registry,
    *,
    hasher: Callable[[Path], str] | None = None,
    now: float | None = None,
    own_round: int | None = None,
) -> list[DataFile]:
    """New files in the watched folder for this model name (files of running rounds other than
    ``own_round`` are not new: that round is training on them)."""
    watch = loaded.config.watch
    files = scan_watch(watch.dir, watch.glob, settle_s=watch.settle_s, now=now, hasher=hasher or sha256_file)
    others = [r for r in registry.rounds(loaded.name, active_only=True) if r.id != own_round]
    seen = trained_hashes(registry.models(loaded.name), others)
    return detect_new_data(files, seen)


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
    """
    from orchestrator.cluster.launcher import run_training
    from orchestrator.lifecycle.registry import register_run

    registry = registry or open_round_registry(loaded)
    name = loaded.name
    if round_id is None:
        claimed = registry.claim_round(name, spec=loaded.resolved(), host=socket.gethostname(), pid=os.getpid())
        if claimed is None:
            active = registry.rounds(name, active_only=True)
            detail = ", ".join(
                f"round {r.round} ({r.status}, job {r.submission_id or f'pid {r.pid}@{r.host}'})" for r in active
            )
            raise RoundBusyError(f"a round of {name} is already running: {detail}; wait for it to finish")
    else:
        claimed = registry.get_round(round_id)
        if claimed.name != name or not claimed.active:
            raise OrchestratorError(f"round id {round_id} is {claimed.status} round {claimed.round} of {claimed.name}")
    registry.update_round(claimed.id, status="running", host=socket.gethostname(), pid=os.getpid())
    try:
        if claimed.new_data:  # the scheduler chose the files when it claimed the round: train on exactly those
            wanted = {item["sha256"] for item in claimed.new_data}
            watch = loaded.config.watch
            found = [f for f in scan_watch(watch.dir, watch.glob) if f.sha256 in wanted]
            new_files = detect_new_data(found, set())
            missing = wanted - {f.sha256 for f in new_files}
            if missing:
                paths = [item["path"] for item in claimed.new_data if item["sha256"] in missing]
                raise DataError(f"the round's files changed or are gone since it was scheduled: {', '.join(paths)}")
        else:
            new_files = find_new_data(loaded, registry, own_round=claimed.id)
        if not new_files:
            registry.update_round(claimed.id, status="skipped", message="no new data")
            return RoundResult(name=name, round=claimed.round, status="skipped", reason="no new data")
        registry.update_round(claimed.id, new_data=[f.to_dict() for f in new_files])
        plan = plan_round(loaded, registry, claimed.round, new_files)
        for warning in plan.warnings:
            logger.warning("round %s of %s: %s", claimed.round, name, warning)
        if plan.labels_added:
            logger.info(
                "round %s of %s: new labels %s; the head grows to %s and each eval set is scored over its own labels",
                claimed.round, name, plan.labels_added, plan.label_names,
            )  # fmt: skip
        result = (train or run_training)(plan.job, address=address, progress=progress)
        gate = gate_for(loaded)
        scores = {
            key.rsplit("/", 1)[0]: float(value)
            for key, value in result.metrics.items()
            if key.endswith(f"/{gate.metric}") and isinstance(value, (int, float)) and not key.startswith("train/")
        }
        chain = registry.ancestors(plan.champion.id) if plan.champion else []
        forgetting = compute_forgetting(score_history(chain, gate.metric), scores, gate.mode)
        decision, reason = gate_decision(gate, scores, forgetting, plan.new_eval)
        record = register_run(
            plan.job,
            result,
            name=name,
            data=plan.data_record(result.data),
            metrics={"forgetting": forgetting, "gate": {"metric": gate.metric, "mode": gate.mode}},
            round=claimed.round,
            registry=registry,
        )
        if record is None:
            raise OrchestratorError(f"round {claimed.round} exported no model (set output.save_final: true)")
        record = registry.decide(record.id, decision, reason)
        summary = {
            "name": name,
            "round": claimed.round,
            "candidate": record.id,
            "parent": record.parent,
            "decision": decision,
            "reason": reason,
            "scores": scores,
            "forgetting": forgetting,
            "new_files": [f.to_dict() for f in new_files],
            "replay": plan.replay,
            "label_names": plan.label_names,
            "labels_added": plan.labels_added,
            "warnings": plan.warnings,
        }
        (plan.run_dir / ROUND_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        registry.update_round(claimed.id, status="succeeded", candidate_id=record.id, decision=decision, message=reason)
        return RoundResult(
            name=name,
            round=claimed.round,
            status="succeeded",
            candidate=record,
            decision=decision,
            reason=reason,
            scores=scores,
            forgetting=forgetting,
            new_files=new_files,
            run_dir=plan.run_dir,
        )
    except BaseException as exc:
        registry.update_round(claimed.id, status="failed", message=f"{type(exc).__name__}: {exc}"[:4000])
        raise


def loaded_from_round(registry: Registry, round_id: int) -> LoadedRetrain:
    """The retrain config a claimed round was submitted with (stored resolved in the registry)."""
    record = registry.get_round(round_id)
    if record.spec is None:
        raise OrchestratorError(f"round id {round_id} has no stored retrain config")
    return retrain_from_dict(record.spec, source=f"{registry.path} (round {record.round} of {record.name})")

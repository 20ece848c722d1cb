"""A growing label space across continual-retraining rounds.

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

Refused, with both label sets named (:func:`growth_refused`): new labels with ``new_labels: refuse`` in the
retrain file, in the first round (no champion to grow: the base job's ``data.label_names`` must list them), with
``method: distill`` (the teacher's head does not know them), and integer labels beyond the model's ids when its
labels are names (a third label, or a typo?: :func:`orchestrator.lifecycle.row_io.read_rows`). Causal LMs have
no labels and are unaffected; so are plain training jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from orchestrator.config.retrain import LoadedRetrain
from orchestrator.lifecycle.registry_records import ModelRecord


def sort_labels(names: Iterable[str]) -> list[str]:
    """Label names sorted, numerically when they all are numbers."""
    names = list(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def union_label_names(known: Sequence[str], found: Iterable[str]) -> list[str]:
    """The model's labels (ids unchanged), then the labels it does not know yet, sorted (numbers numerically),
    so the order does not depend on the order rows or files arrive in."""
    known = list(known)
    return known + sort_labels(set(found) - set(known))


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


def growth_refused(loaded: LoadedRetrain, champion: ModelRecord | None) -> str | None:
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

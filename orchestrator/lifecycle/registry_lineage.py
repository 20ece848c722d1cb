"""Lineage in the registry: the tree from a base model to every model derived from it (warm starts,
retraining rounds, distilled students)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from orchestrator.lifecycle.registry_records import ModelRecord


@dataclass
class LineageNode:
    label: str
    record: ModelRecord | None
    children: list[LineageNode] = field(default_factory=list)

    def walk(self) -> Iterator[LineageNode]:
        yield self
        for child in self.children:
            yield from child.walk()


def lineage_tree(base: str, family: Sequence[ModelRecord]) -> LineageNode:
    """The tree rooted at ``base``: its children are the models of ``family`` whose parent is not in the family
    (derived from the base itself), each with the models derived from it below (oldest first, as given)."""
    by_parent: dict[str | None, list[ModelRecord]] = {}
    ids = {m.id for m in family}
    for m in family:
        key = m.parent_id if m.parent_id in ids else None
        by_parent.setdefault(key, []).append(m)

    def build(m: ModelRecord, seen: frozenset[str]) -> LineageNode:
        kids = [build(c, seen | {m.id}) for c in by_parent.get(m.id, []) if c.id not in seen]
        return LineageNode(label=m.id, record=m, children=kids)

    return LineageNode(label=base, record=None, children=[build(m, frozenset()) for m in by_parent.get(None, [])])

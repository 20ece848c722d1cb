"""A student cut from its teacher (DistilBERT-style initialisation): the teacher's class with fewer blocks, each
a copy of a kept teacher block, embeddings and head copied as they are; from a teacher whole on the rank or
partitioned across the workers (ZeRO-3)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchestrator.errors import ConfigError, ConfigIssue, ModelError
from orchestrator.models.layers import find_blocks_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def _kept_layers(n_teacher: int, keep_every: int | None, keep_layers: Sequence[int] | None) -> list[int]:
    if keep_every is not None and keep_layers is not None:
        raise ConfigError(
            [ConfigIssue("distill.keep_layers", "set either distill.keep_every or distill.keep_layers, not both")]
        )
    if keep_layers is None:
        every = 2 if keep_every is None else keep_every
        if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= n_teacher:
            raise ConfigError(
                [
                    ConfigIssue(
                        "distill.keep_every",
                        f"must be an int in 1..{n_teacher} (the teacher has {n_teacher} blocks); got {every!r}",
                    )
                ]
            )
        return list(range(every - 1, n_teacher, every))
    kept = list(keep_layers)
    problems = []
    if not kept:
        problems.append("is empty; list the teacher blocks the student keeps")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in kept):
        problems.append(f"must hold ints; got {kept!r}")
    elif any(not 0 <= i < n_teacher for i in kept):
        problems.append(f"{kept!r} has blocks outside 0..{n_teacher - 1} (the teacher has {n_teacher} blocks)")
    elif any(b <= a for a, b in zip(kept, kept[1:])):
        problems.append(f"must be strictly increasing, bottom block first; got {kept!r}")
    if problems:
        raise ConfigError([ConfigIssue("distill.keep_layers", p) for p in problems])
    return kept


def student_from_teacher(
    teacher: PreTrainedModel,
    keep_every: int | None = None,
    keep_layers: list[int] | None = None,
) -> PreTrainedModel:
    """A shallower copy of the teacher (DistilBERT-style initialisation): same class, fewer blocks.

    Student block ``j`` starts as a copy of teacher block ``keep_layers[j]``; embeddings, final norms and the
    head (LM head or classifier) are copied as they are. The teacher is not changed and shares no tensors with
    the student. The student is built fresh from a copy of the teacher's config with the layer count
    (``num_hidden_layers``, GPT-2's ``n_layer``) and any per-layer list (``layer_types``) cut down, so
    per-block state such as the attention's ``layer_idx`` (the KV-cache slot) is right for the new depth.

    By default every ``keep_every``-th block is kept counting from the bottom and ending on a multiple of k:
    blocks ``k-1, 2k-1, ...`` (6 blocks, k=3 → ``[2, 5]``). Unlike DistilBERT's ``0, 2, 4, ...`` this keeps the
    top block whenever k divides the depth, so the head keeps the block it was trained on; it also matches the
    ``"auto"`` layer map of :func:`parse_layer_map`.

    Args:
        teacher: a Hugging Face model (BERT, GPT-2, Llama and others whose blocks sit in one ``nn.ModuleList``).
        keep_every: keep every k-th block (default 2 when ``keep_layers`` is not given either).
        keep_layers: the teacher blocks to keep, strictly increasing; excludes ``keep_every``.

    Returns:
        The student, in train/eval mode, dtype and device of the teacher.

    Raises:
        ConfigError: bad ``keep_every`` / ``keep_layers``.
        ModelError: the blocks cannot be found, or the config's layer count does not match them.
    """
    prefix, blocks = find_blocks_module(teacher)
    n_teacher = len(blocks)
    config = copy.deepcopy(teacher.config)
    declared = getattr(config, "num_hidden_layers", None)
    if declared != n_teacher:
        raise ModelError(
            f"{type(teacher).__name__}: found {n_teacher} blocks in {prefix!r} but the config says "
            f"num_hidden_layers={declared}; cannot cut a student from this model automatically"
        )
    kept = _kept_layers(n_teacher, keep_every, keep_layers)
    config.num_hidden_layers = len(kept)  # GPT2Config maps this name to n_layer
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_teacher:
        config.layer_types = [layer_types[i] for i in kept]
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        logger.warning(
            "scale_attn_by_inverse_layer_idx is on: kept blocks move to new indices and scale their "
            "attention differently from the teacher"
        )

    new_index = {old: new for new, old in enumerate(kept)}
    block_prefix = f"{prefix}."
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _teacher_tensors(teacher):
        if name.startswith(block_prefix):
            index, rest = name[len(block_prefix) :].split(".", 1)
            if int(index) not in new_index:
                continue
            name = f"{block_prefix}{new_index[int(index)]}.{rest}"
        state[name] = tensor
    student = type(teacher)(config).to(dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)  # copies: nothing is shared with the teacher
    tied = {name for name, param in student.named_parameters(remove_duplicate=False)} - set(
        dict(student.named_parameters()))
    if unexpected or set(missing) - tied:
        raise ModelError(f"cutting a student from {type(teacher).__name__}: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    student.to(teacher.device)
    student.train(teacher.training)
    return student


def _teacher_tensors(teacher: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The teacher's state, whole: its state dict, or for a teacher partitioned across the workers (ZeRO-3)
    gathered a module at a time on every rank (each rank copies what the student keeps; a tied weight comes once)."""
    if not any(hasattr(p, "ds_id") for p in teacher.parameters()):
        yield from teacher.state_dict().items()
        return
    from orchestrator.models.weight_stream import WeightStream

    for name, tensor in WeightStream(teacher, is_rank0=True).tensors():  # every rank keeps its copies
        assert tensor is not None
        yield name, tensor

"""Layer-unfreezing schedules and discriminative learning rates.

Groups are numbered bottom to top: 0 = embeddings, 1..n = transformer blocks, n+1 = head. A schedule
is a pure function of the optimizer step: which groups train at that step. ``group_lr_scale`` is a
pure function too: the multiplier of the base LR for a group at a step (0 while frozen, γ^depth once
trainable, ramped up over ``warmup_steps`` after the group is unfrozen).

How freezing works under DeepSpeed, and why. DeepSpeed partitions parameters, gradients and
optimizer state when the engine is built, and ignores ``requires_grad`` changes made afterwards
(DeepSpeed issues #5639, #1767, #5341); rebuilding the engine at every milestone would cost a
checkpoint round trip each time. What the engine sees is therefore decided once, before
``deepspeed.initialize``, and a frozen group is in one of two tiers:

- **Frozen for the whole run** (``groups_frozen_for_run``: the body below the head for ``head_only``,
  below the top k blocks for ``top_k``, below the cap for a capped ``gradual``, groups no milestone
  names for ``explicit``, groups whose turn comes after the last step of the run's budget): their
  parameters get ``requires_grad=False`` before the engine is built and are left out of the optimizer
  (``freeze_groups``). DeepSpeed supports parameters frozen at initialize under every ZeRO stage: they
  cost no optimizer step, no gradient buffers and no optimizer state, which LR-0 freezing still pays
  for over every parameter it holds at LR 0. They stay module parameters: ZeRO-3 still partitions them (exports
  gather them like any other), and checkpoints still hold them (the module state under ZeRO 0/1, the
  frozen-parameter fragments DeepSpeed writes under ZeRO 2/3; a universal-checkpoint resume on another
  world size keeps the values the model was built with, which are the same since they never train).
- **Frozen until a later step**: every such parameter stays in the optimizer from the start, frozen by
  two means that hold under ZeRO 0, 1, 2 and 3 alike:

  1. its learning rate is exactly 0 (per-group LambdaLR), so AdamW leaves it bit for bit unchanged;
  2. the output of the block just below the lowest trainable group is detached in forward, so backward
     stops there: frozen blocks below cost no backward compute and get no gradients (``BackwardStop``).

Both tiers depend on the schedule and the run's step budget only, so resuming mid-schedule needs no
extra state (a resume must keep the budget: the optimizer state it loads was built for the same tiers).

A group frozen until a later step still takes part in every optimizer step (at LR 0, with the zero gradients
DeepSpeed fills in below the backward stop): its Adam moments stay 0 while its step count t grows, so its first
update would be (1 - b1) / (1 - b1^t) / sqrt((1 - b2) / (1 - b2^t)) times a fresh Adam's: 0.58x after 3 frozen
steps, 2.5x after 1000, toward (1 - b1) / sqrt(1 - b2) ≈ 3.2x. ``restart_optimizer_state`` therefore puts such a
group's state back to a fresh optimizer's
(moments and step 0) at the step it becomes trainable (``groups_unfrozen_at``; the ``FreshAdamOnUnfreeze``
callback), wherever DeepSpeed keeps that state (see ``_state_tensors``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.errors import ModelError
from orchestrator.models.layers import LayerGroups, find_layer_groups

if TYPE_CHECKING:
    from orchestrator.budget import StepBudget
    from orchestrator.config import JobConfig


@dataclass(frozen=True)
class Schedule:
    """A resolved unfreezing schedule (all step counts in optimizer steps)."""

    kind: str
    num_blocks: int
    k: int = 1
    every_steps: int | None = None
    start_blocks: int = 0
    cap: int | None = None
    milestones: tuple[tuple[int, frozenset[int]], ...] = ()
    lr_decay: float = 1.0
    warmup_steps: int = 0

    @property
    def num_groups(self) -> int:
        return self.num_blocks + 2


def _top(n_top: int, num_groups: int) -> frozenset[int]:
    n_top = max(1, min(n_top, num_groups))
    return frozenset(range(num_groups - n_top, num_groups))


def trainable_groups(schedule: Schedule, step: int) -> frozenset[int]:
    """The groups that train at an optimizer step (0-based count of steps already taken)."""
    g = schedule.num_groups
    if schedule.kind == "none":
        return frozenset(range(g))
    if schedule.kind == "head_only":
        return _top(1, g)
    if schedule.kind == "top_k":
        return _top(1 + min(schedule.k, schedule.num_blocks), g)
    if schedule.kind == "gradual":
        assert schedule.every_steps is not None
        blocks = schedule.start_blocks + step // schedule.every_steps
        limit = schedule.num_blocks + 1 if schedule.cap is None else min(schedule.cap, schedule.num_blocks)
        return _top(1 + min(blocks, limit), g)
    if schedule.kind == "explicit":
        current = _top(1, g)
        for at, groups in schedule.milestones:
            if at <= step:
                current = groups
        return current
    raise ValueError(f"unknown unfreeze kind {schedule.kind!r}")


def first_trainable_step(schedule: Schedule, group: int, horizon: int) -> int | None:
    """The first step at which a group trains (None if never within the horizon)."""
    if schedule.kind in ("none", "head_only", "top_k"):
        return 0 if group in trainable_groups(schedule, 0) else None
    if schedule.kind == "explicit":
        for at, groups in sorted(schedule.milestones):
            if group in groups:
                return at if at <= horizon else None
        return None
    depth = schedule.num_groups - 1 - group  # 0 for the head
    blocks_needed = depth - schedule.start_blocks
    if blocks_needed <= 0:
        return 0
    step = blocks_needed * (schedule.every_steps or 1)
    return step if group in trainable_groups(schedule, step) and step <= horizon else None


def groups_frozen_for_run(schedule: Schedule, total_steps: int) -> frozenset[int]:
    """The groups that train at no step of a run of ``total_steps`` optimizer steps (steps 0 .. total_steps - 1).

    These can leave the optimizer altogether (see the module docstring); every other group is in it.
    """
    last_step = max(0, total_steps - 1)
    return frozenset(
        g for g in range(schedule.num_groups) if first_trainable_step(schedule, g, horizon=last_step) is None
    )


def group_lr_scale(schedule: Schedule, group: int, step: int) -> float:
    """Multiplier of the scheduled LR for a group at a step: 0 when frozen, else γ^depth × warmup ramp."""
    if group not in trainable_groups(schedule, step):
        return 0.0
    depth = schedule.num_groups - 1 - group
    scale = schedule.lr_decay**depth
    if schedule.warmup_steps:
        start = first_trainable_step(schedule, group, horizon=step) or 0
        if start > 0:
            scale *= min(1.0, (step - start + 1) / schedule.warmup_steps)
    return scale


def resolve_schedule(unfreeze: Any, num_blocks: int, *, steps_per_epoch: int) -> Schedule:
    """Turn the config section into a Schedule (epochs become steps, group names become indices)."""
    every = unfreeze.every_steps
    if unfreeze.kind == "gradual" and every is None:
        every = max(1, round(unfreeze.every_epochs * steps_per_epoch))
    milestones = tuple(
        (m.step, frozenset(group_indices(m.groups, num_blocks)))
        for m in sorted(unfreeze.milestones, key=lambda m: m.step)
    )
    return Schedule(
        kind=unfreeze.kind,
        num_blocks=num_blocks,
        k=unfreeze.k,
        every_steps=every,
        start_blocks=unfreeze.start_blocks,
        cap=unfreeze.cap,
        milestones=milestones,
        lr_decay=unfreeze.lr_decay,
        warmup_steps=unfreeze.warmup_steps,
    )


def group_indices(names: list[str], num_blocks: int) -> list[int]:
    """Group names → indices: 'embeddings', 'head', 'blockN' (0 = lowest), 'top:N' (head + top N blocks), 'all'."""
    g = num_blocks + 2
    result: set[int] = set()
    for name in names:
        if name == "all":
            result.update(range(g))
        elif name == "embeddings":
            result.add(0)
        elif name == "head":
            result.add(g - 1)
        elif name.startswith("block") and name[5:].isdigit() and int(name[5:]) < num_blocks:
            result.add(1 + int(name[5:]))
        elif name.startswith("top:") and name[4:].isdigit():
            result.update(_top(1 + int(name[4:]), g))
        else:
            raise ValueError(
                f"unfreeze.milestones: unknown group {name!r}; use embeddings, head, all, top:N or "
                f"block0..block{num_blocks - 1}"
            )
    return sorted(result)


def groups_unfrozen_at(schedule: Schedule, step: int) -> frozenset[int]:
    """The groups that train at ``step`` but did not at ``step - 1`` (none at step 0: nothing trained before)."""
    if step <= 0:
        return frozenset()
    return trainable_groups(schedule, step) - trainable_groups(schedule, step - 1)


def restart_optimizer_state(optimizer: torch.optim.Optimizer, layer_groups: Iterable[int], *,
                            engine_optimizer: Any = None) -> int:
    """Put the optimizer state of some layer groups back to what a fresh optimizer starts from: every state tensor
    (Adam's moments and, for torch's fused AdamW, the ``step`` tensor) zeroed in place, a step count kept as a
    number set to 0. In place, because DeepSpeed keeps references to these tensors (ZeRO 1/2 link them to each
    parameter's fragment); its next update is then a fresh AdamW's first, bit for bit.

    Args:
        optimizer: the torch optimizer the engine was built with; its param groups carry ``layer_group``.
        layer_groups: indices of the groups to restart (``groups_unfrozen_at``).
        engine_optimizer: the engine's optimizer (``engine.optimizer``: DeepSpeed's ZeRO optimizer, or
            ``optimizer`` itself under ZeRO 0 without mixed precision).

    Returns:
        How many parameters' (or flat partitions') states were restarted on this rank.
    """
    wanted = set(layer_groups)
    states = [optimizer.state]
    backup = getattr(engine_optimizer, "backup_optimizer", None)  # ZeRO-3 partial offload steps some groups here
    if backup is not None:
        states.append(backup.state)
    tensors = _state_tensors(optimizer, engine_optimizer)
    restarted = 0
    for index, group in enumerate(optimizer.param_groups):
        if group.get("layer_group") not in wanted:
            continue
        if "step" in group:  # optimizers that count steps per group (DeepSpeed's FusedAdam)
            group["step"] = 0
        for tensor in tensors.get(index, []):
            for state in (s[tensor] for s in states if tensor in s):
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
                    elif key == "step":
                        state[key] = type(value)(0)  # DeepSpeedCPUAdam counts in a Python int
                restarted += 1
    return restarted


def _state_tensors(optimizer: torch.optim.Optimizer, engine_optimizer: Any) -> dict[int, list[torch.Tensor]]:
    """The tensors the optimizer's state is keyed by, per param group.

    Without ZeRO those are the model's parameters; under ZeRO 1/2 (and DeepSpeed's bf16/fp16 optimizers) each
    group's params are this rank's flat fp32 partition, still listed in the group. ZeRO-3 empties every group's
    params between steps (it puts one flat sub-group in at a time, ``DeepSpeedZeroOptimizer_Stage3._optimizer_step``),
    so there the partitions come from ``fp32_partitioned_groups_flat`` and ``sub_group_to_group_id``.
    """
    flat = getattr(engine_optimizer, "fp32_partitioned_groups_flat", None)
    owner = getattr(engine_optimizer, "sub_group_to_group_id", None)
    if flat is not None and owner is not None:
        by_group: dict[int, list[torch.Tensor]] = {}
        for sub_group, tensor in enumerate(flat):
            by_group.setdefault(owner[sub_group], []).append(tensor)
        return by_group
    return {index: list(group["params"]) for index, group in enumerate(optimizer.param_groups)}


class GroupLR:
    """Picklable per-param-group LR lambda: the base warmup/decay schedule × the group's scale."""

    def __init__(self, base: Any, schedule: Schedule, group: int):
        self.base, self.schedule, self.group = base, schedule, group

    def __call__(self, step: int) -> float:
        return self.base(step) * group_lr_scale(self.schedule, self.group, step)


def freeze_groups(model: torch.nn.Module, groups: LayerGroups, indices: Iterable[int]) -> None:
    """Set ``requires_grad=False`` on every parameter of the given groups. Call it before
    ``deepspeed.initialize`` (DeepSpeed ignores later changes) and before building the optimizer groups."""
    by_name = dict(model.named_parameters())
    ordered = groups.ordered()
    for index in indices:
        for name in ordered[index]:
            by_name[name].requires_grad_(False)


def layered_param_groups(model: torch.nn.Module, groups: LayerGroups, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups per layer group (bottom to top) and decay/no-decay; each carries 'layer_group'.
    Parameters that do not require grad (frozen for the run, LoRA bases) are left out."""
    by_name = dict(model.named_parameters())
    result = []
    for index, names in enumerate(groups.ordered()):
        decay = [by_name[n] for n in names if by_name[n].ndim >= 2 and "norm" not in n.lower()]
        no_decay = [by_name[n] for n in names if not (by_name[n].ndim >= 2 and "norm" not in n.lower())]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            params = [p for p in params if p.requires_grad]
            if params:
                result.append({"params": params, "weight_decay": wd, "layer_group": index})
    return result


class BackwardStop:
    """The thin hook: detaches the hidden states entering the lowest trainable group, so backward stops
    there. Re-armed only when that group changes; holds no state of its own (it follows the step)."""

    def __init__(self, model: torch.nn.Module, groups: LayerGroups, schedule: Schedule):
        self.model, self.groups, self.schedule = model, groups, schedule
        self._handle: Any = None
        self.lowest: int | None = None
        modules = dict(model.named_modules())
        missing = [name for name in groups.block_modules if name not in modules]
        if missing:
            raise ModelError(
                f"the blocks {missing} are not modules of {type(model).__name__}; check unfreeze.block_pattern"
            )
        self._blocks = [modules[name] for name in groups.block_modules]

    def update(self, step: int) -> int:
        """Arm the hook for this step; returns the lowest trainable group index."""
        lowest = min(trainable_groups(self.schedule, step))
        if lowest == self.lowest:
            return lowest
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.lowest = lowest
        # lowest == 0: embeddings train, nothing to cut. Otherwise cut the output of the group below.
        if lowest >= 1 and self._blocks:
            below = lowest - 2  # block index just below (group index - 1 is block index; minus 1 more)
            if below >= 0:
                self._handle = self._blocks[below].register_forward_hook(_detach_output)
            else:
                self._handle = self._blocks[0].register_forward_pre_hook(_detach_input, with_kwargs=True)
        return lowest

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _detach_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].detach(), *output[1:])
    return output


def _detach_input(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].detach(), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
    return args, kwargs


@dataclass
class Unfreezing:
    """The unfreezing schedule of a run and the hook that stops backward below the trainable groups."""

    groups: LayerGroups
    schedule: Schedule
    stop: BackwardStop

    def log_values(self, step: int) -> dict[str, float]:
        trainable = trainable_groups(self.schedule, step)
        return {"unfreeze/trainable_groups": len(trainable), "unfreeze/lowest_group": min(trainable)}


def build_unfreezing(model: torch.nn.Module, config: JobConfig, budget: StepBudget) -> Unfreezing | None:
    """None for plain runs (every layer at the same LR); else the layer groups, schedule and hook."""
    u = config.unfreeze
    if u.kind == "none" and u.lr_decay == 1.0:
        return None
    groups = find_layer_groups(
        model, block_pattern=u.block_pattern, embedding_patterns=u.embedding_patterns, head_patterns=u.head_patterns
    )
    steps_per_epoch = max(1, budget.batches_per_epoch // config.training.grad_accumulation)
    schedule = resolve_schedule(u, groups.num_blocks, steps_per_epoch=steps_per_epoch)
    return Unfreezing(groups=groups, schedule=schedule, stop=BackwardStop(model, groups, schedule))

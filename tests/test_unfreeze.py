"""Unfreezing schedules and discriminative LRs as pure functions of the step; layer groups of real
architectures; the backward-stop hook."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import UnfreezeSection
from orchestrator.models.layers import find_layer_groups
from orchestrator.train.unfreezing import (
    BackwardStop,
    Schedule,
    first_trainable_step,
    freeze_groups,
    group_indices,
    group_lr_scale,
    groups_frozen_for_run,
    layered_param_groups,
    resolve_schedule,
    trainable_groups,
)

# 4 blocks → groups: 0 embeddings, 1..4 blocks (bottom→top), 5 head
N = 4
HEAD, TOP_BLOCK, EMB = 5, 4, 0


def schedule(**kwargs) -> Schedule:
    section = UnfreezeSection(**kwargs)
    return resolve_schedule(section, N, steps_per_epoch=10)


def test_none_trains_everything_and_head_only_trains_the_head():
    assert trainable_groups(schedule(kind="none"), 0) == frozenset(range(6))
    assert trainable_groups(schedule(kind="head_only"), 0) == {HEAD}
    assert trainable_groups(schedule(kind="head_only"), 10_000) == {HEAD}


def test_top_k_trains_the_head_and_k_top_blocks():
    assert trainable_groups(schedule(kind="top_k", k=1), 0) == {HEAD, TOP_BLOCK}
    assert trainable_groups(schedule(kind="top_k", k=2), 7) == {HEAD, 4, 3}
    assert trainable_groups(schedule(kind="top_k", k=99), 0) == {1, 2, 3, 4, HEAD}  # blocks only, not embeddings


def test_gradual_unfreezes_one_more_block_from_the_top_every_n_steps_then_embeddings():
    s = schedule(kind="gradual", every_steps=5)
    assert trainable_groups(s, 0) == {HEAD}
    assert trainable_groups(s, 4) == {HEAD}
    assert trainable_groups(s, 5) == {HEAD, 4}
    assert trainable_groups(s, 10) == {HEAD, 4, 3}
    assert trainable_groups(s, 20) == {HEAD, 4, 3, 2, 1}
    assert trainable_groups(s, 25) == set(range(6))
    assert trainable_groups(s, 10_000) == set(range(6))


def test_gradual_in_epochs_with_a_cap_and_start_blocks():
    s = schedule(kind="gradual", every_epochs=0.5, cap=2, start_blocks=1)  # 0.5 epoch = 5 steps
    assert s.every_steps == 5
    assert trainable_groups(s, 0) == {HEAD, 4}
    assert trainable_groups(s, 5) == {HEAD, 4, 3}
    assert trainable_groups(s, 500) == {HEAD, 4, 3}  # capped at 2 blocks


def test_explicit_milestones():
    s = schedule(
        kind="explicit",
        milestones=[{"step": 0, "groups": ["head"]}, {"step": 3, "groups": ["top:2"]}, {"step": 8, "groups": ["all"]}],
    )
    assert trainable_groups(s, 2) == {HEAD}
    assert trainable_groups(s, 3) == {HEAD, 4, 3}
    assert trainable_groups(s, 8) == set(range(6))
    assert group_indices(["embeddings", "block0", "head"], N) == [0, 1, 5]
    with pytest.raises(ValueError, match="unknown group 'block9'"):
        group_indices(["block9"], N)


def test_resume_mid_schedule_gives_the_same_groups_because_they_depend_on_the_step_only():
    s = schedule(kind="gradual", every_steps=3)
    fresh = [trainable_groups(s, step) for step in range(20)]
    resumed = [trainable_groups(schedule(kind="gradual", every_steps=3), step) for step in range(20)]
    assert fresh == resumed
    assert first_trainable_step(s, TOP_BLOCK, horizon=100) == 3
    assert first_trainable_step(s, EMB, horizon=100) == 15
    assert first_trainable_step(s, EMB, horizon=10) is None


def test_discriminative_lr_decays_by_depth_from_the_top_embeddings_lowest():
    s = schedule(kind="none", lr_decay=0.5)
    scales = [group_lr_scale(s, g, 0) for g in range(6)]
    assert scales == [0.5**5, 0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]


def test_frozen_groups_get_lr_zero_and_a_newly_unfrozen_block_warms_up_at_its_own_lr():
    s = schedule(kind="gradual", every_steps=4, lr_decay=0.8, warmup_steps=2)
    assert group_lr_scale(s, TOP_BLOCK, 3) == 0.0
    assert group_lr_scale(s, TOP_BLOCK, 4) == pytest.approx(0.8 * 0.5)
    assert group_lr_scale(s, TOP_BLOCK, 5) == pytest.approx(0.8)
    assert group_lr_scale(s, TOP_BLOCK, 50) == pytest.approx(0.8)
    assert group_lr_scale(s, HEAD, 0) == 1.0  # trainable from the start: no ramp


def test_config_errors_for_incomplete_schedules():
    with pytest.raises(ValueError, match="exactly one of unfreeze.every_steps or unfreeze.every_epochs"):
        UnfreezeSection(kind="gradual")
    with pytest.raises(ValueError, match="first milestone must be at step 0"):
        UnfreezeSection(kind="explicit", milestones=[{"step": 2, "groups": ["head"]}])


@pytest.mark.parametrize(
    ("arch", "block_prefix", "embedding", "head"),
    [
        ("bert", "bert.encoder.layer.", "bert.embeddings.word_embeddings.weight", "classifier.weight"),
        ("gpt2", "transformer.h.", "transformer.wte.weight", "transformer.ln_f.weight"),
        ("llama", "model.layers.", "model.embed_tokens.weight", "model.norm.weight"),
    ],
)
def test_layer_groups_of_known_architectures(arch, block_prefix, embedding, head, tiny_models):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if arch == "bert":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_models[arch], num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    groups = find_layer_groups(model)
    assert groups.num_blocks == 2
    assert all(name.startswith(f"{block_prefix}{i}.") for i, block in enumerate(groups.blocks) for name in block)
    assert embedding in groups.embeddings
    assert head in groups.head
    every = [n for g in groups.ordered() for n in g]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each parameter in exactly one group


def test_unknown_architecture_is_a_clear_error_and_patterns_name_the_groups():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Linear(4, 4)
            self.stage0 = torch.nn.Linear(4, 4)
            self.stage1 = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 2)

    with pytest.raises(Exception, match="unfreeze.block_pattern"):
        find_layer_groups(Odd())
    groups = find_layer_groups(Odd(), block_pattern=r"^stage(\d+)\.", embedding_patterns=["^stem"])
    assert groups.blocks == [["stage0.weight", "stage0.bias"], ["stage1.weight", "stage1.bias"]]
    assert groups.embeddings == ["stem.weight", "stem.bias"]
    assert groups.head == ["out.weight", "out.bias"]
    with pytest.raises(Exception, match="matches no parameter"):
        find_layer_groups(Odd(), block_pattern=r"layer(\d+)")


def test_backward_stops_below_the_lowest_trainable_block(tiny_models):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    groups = find_layer_groups(model)
    _assert_top_1_backward_stops_below_the_top_block(model, groups)


def _assert_top_1_backward_stops_below_the_top_block(model, groups) -> None:
    """top_k 1 with the backward stop: no gradient below the top block, gradients from it up."""
    s = resolve_schedule(UnfreezeSection(kind="top_k", k=1), groups.num_blocks, steps_per_epoch=1)
    stop = BackwardStop(model, groups, s)
    stop.update(0)
    batch = {"input_ids": torch.tensor([[101, 2023, 102]]), "labels": torch.tensor([1])}
    model(**batch).loss.backward()
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in groups.embeddings + groups.blocks[0])
    assert all(params[n].grad is not None for n in groups.blocks[1] + groups.head)


def test_groups_frozen_for_the_whole_run_by_kind():
    assert groups_frozen_for_run(schedule(kind="none", lr_decay=0.5), 100) == set()
    assert groups_frozen_for_run(schedule(kind="head_only"), 100) == {EMB, 1, 2, 3, 4}
    assert groups_frozen_for_run(schedule(kind="top_k", k=1), 100) == {EMB, 1, 2, 3}
    assert groups_frozen_for_run(schedule(kind="top_k", k=99), 100) == {EMB}
    # gradual with a cap: everything below the cap, however long the run
    capped = schedule(kind="gradual", every_steps=5, cap=2)
    assert groups_frozen_for_run(capped, 10_000) == {EMB, 1, 2}
    # gradual without a cap: the groups whose turn comes after the last step (step total_steps - 1)
    gradual = schedule(kind="gradual", every_steps=5)
    assert groups_frozen_for_run(gradual, 10_000) == set()
    assert groups_frozen_for_run(gradual, 25) == {EMB}  # embeddings' turn is step 25, the run ends at step 24
    assert groups_frozen_for_run(gradual, 26) == set()
    assert groups_frozen_for_run(gradual, 11) == {EMB, 1, 2}  # block at group 3 unfreezes at step 10
    # explicit: groups no milestone names, or named only by a milestone after the run's last step
    explicit = schedule(
        kind="explicit", milestones=[{"step": 0, "groups": ["head"]}, {"step": 30, "groups": ["top:2"]}]
    )
    assert groups_frozen_for_run(explicit, 100) == {EMB, 1, 2}
    assert groups_frozen_for_run(explicit, 30) == {EMB, 1, 2, 3, 4}


def test_a_group_frozen_for_the_run_is_never_trainable_at_any_step():
    cases = [
        schedule(kind="head_only"),
        schedule(kind="top_k", k=2),
        schedule(kind="gradual", every_steps=3, cap=2, start_blocks=1),
        schedule(kind="gradual", every_epochs=0.3),
        schedule(kind="explicit", milestones=[{"step": 0, "groups": ["top:1"]}, {"step": 4, "groups": ["block1"]}]),
    ]
    for s in cases:
        for total in (1, 5, 12, 40):
            ever = set().union(*(trainable_groups(s, step) for step in range(total)))
            assert groups_frozen_for_run(s, total) == set(range(s.num_groups)) - ever, (s.kind, total)


def _tiny_bert(tiny_models):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)


def test_groups_frozen_for_the_run_leave_the_optimizer_and_later_groups_stay_in_it(tiny_models):
    model = _tiny_bert(tiny_models)
    groups = find_layer_groups(model)  # 0 embeddings, 1-2 blocks, 3 head
    s = resolve_schedule(UnfreezeSection(kind="gradual", every_steps=3, cap=1), groups.num_blocks, steps_per_epoch=1)
    frozen = groups_frozen_for_run(s, total_steps=6)
    assert frozen == {0, 1}  # embeddings and the lower block; the top block unfreezes at step 3
    freeze_groups(model, groups, frozen)

    optimizer_groups = layered_param_groups(model, groups, weight_decay=0.1)
    in_optimizer = {id(p) for g in optimizer_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for index, names in enumerate(groups.ordered()):
        for name in names:
            assert params[name].requires_grad == (index not in frozen), name
            assert (id(params[name]) in in_optimizer) == (index not in frozen), name
    assert sorted({g["layer_group"] for g in optimizer_groups}) == [2, 3]

    from orchestrator.train.weight_anchor import WeightAnchor

    anchor = WeightAnchor.capture(model, 0.1)  # pulls only what can train
    assert anchor is not None and {id(p) for p in anchor.params} == in_optimizer


def test_lora_with_head_only_leaves_only_the_head_in_the_optimizer(tiny_models, shared_data, tmp_path):
    from orchestrator.config import config_from_dict
    from orchestrator.methods.base import MethodContext
    from orchestrator.methods.lora import LoraMethod
    from tests.conftest import tiny_job

    config = config_from_dict({**tiny_job("l", tiny_models["bert"], shared_data, tmp_path), "method": "lora"})
    context = MethodContext(
        model_path=str(tiny_models["bert"]), device=torch.device("cpu"), precision="fp32", world_size=1
    )
    model = LoraMethod().prepare_model(_tiny_bert(tiny_models), config, context)
    groups = find_layer_groups(model)
    s = resolve_schedule(UnfreezeSection(kind="head_only"), groups.num_blocks, steps_per_epoch=1)
    freeze_groups(model, groups, groups_frozen_for_run(s, total_steps=6))

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("classifier" in n for n in trainable)  # adapters in the frozen blocks: out
    in_optimizer = {id(p) for g in layered_param_groups(model, groups, 0.1) for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_block_pattern_names_the_same_blocks_and_block_modules_as_the_automatic_search(tiny_models):
    model = _tiny_bert(tiny_models)
    found = find_layer_groups(model)
    named = find_layer_groups(model, block_pattern=r"encoder\.layer\.(\d+)\.")
    assert named.blocks == found.blocks
    assert named.block_modules == found.block_modules == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert (named.embeddings, named.head) == (found.embeddings, found.head)


def test_backward_stops_below_the_lowest_trainable_block_named_by_a_block_pattern(tiny_models):
    model = _tiny_bert(tiny_models)
    groups = find_layer_groups(model, block_pattern=r"encoder\.layer\.(\d+)\.")
    _assert_top_1_backward_stops_below_the_top_block(model, groups)


def test_a_block_pattern_whose_blocks_share_no_module_is_a_clear_error():
    class Flat(torch.nn.Module):  # block i's weight in one module, its bias in another: no module per block
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2)) for _ in range(2)])
            self.biases = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2)) for _ in range(2)])

    with pytest.raises(Exception, match=r"unfreeze\.block_pattern .*block 0.*no module of its own"):
        find_layer_groups(Flat(), block_pattern=r"\.(\d+)$")
    stages = find_layer_groups(
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), block_pattern=r"^(\d+)\."
    )
    assert stages.block_modules == ["0", "1"]

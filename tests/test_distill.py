"""Specs for the pure parts of teacher-student distillation (orchestrator/distill.py), on CPU and tiny models."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from orchestrator.errors import ConfigError
from orchestrator.methods.student_init import student_from_teacher
from orchestrator.methods.teacher_student import (
    HiddenProjector,
    check_vocab_match,
    distillation_loss,
    hidden_index,
    hidden_state_loss,
    logit_kd_loss,
    parse_layer_map,
)
from orchestrator.models.layers import find_blocks_module, find_layer_groups


def _softmax(z: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in z]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


STUDENT_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
TEACHER_LOGITS = [[3.0, 1.0, 0.0], [0.5, 0.5, 0.5]]


# --- logit KD -----------------------------------------------------------------------------------------------


def test_kd_loss_matches_hand_computation() -> None:
    temperature = 2.0
    # Row 0 at T=2: p = softmax([1.5, 0.5, 0]) = [0.62853, 0.23122, 0.14024] (teacher),
    #               q = softmax([0.5, 1.0, 1.5]) = [0.18632, 0.30720, 0.50648] (student),
    #               KL(p||q) = sum p·(log p - log q) = 0.51845.
    p0 = _softmax(TEACHER_LOGITS[0], temperature)
    q0 = _softmax(STUDENT_LOGITS[0], temperature)
    assert p0 == pytest.approx([0.62853, 0.23122, 0.14024], abs=1e-5)
    assert q0 == pytest.approx([0.18632, 0.30720, 0.50648], abs=1e-5)
    kl0 = _kl(p0, q0)
    assert kl0 == pytest.approx(0.51845, abs=1e-5)
    # Row 1: the teacher is uniform, p = [1/3, 1/3, 1/3]; KL = 0.02910.
    kl1 = _kl(_softmax(TEACHER_LOGITS[1], temperature), _softmax(STUDENT_LOGITS[1], temperature))
    assert kl1 == pytest.approx(0.02910, abs=1e-5)
    # batchmean over the 2 rows, times T² = 4: (0.51845 + 0.02910) / 2 · 4 = 1.09510.
    expected = (kl0 + kl1) / 2 * temperature**2
    assert expected == pytest.approx(1.09510, abs=1e-5)

    loss = logit_kd_loss(torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS), temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # PyTorch's own batchmean KL agrees.
    reference = F.kl_div(
        F.log_softmax(torch.tensor(STUDENT_LOGITS) / temperature, -1),
        F.softmax(torch.tensor(TEACHER_LOGITS) / temperature, -1),
        reduction="batchmean",
    )
    assert loss.item() == pytest.approx(reference.item() * 4, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits() -> None:
    logits = torch.randn(4, 7)
    assert logit_kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    lm_logits = torch.randn(2, 5, 11)
    assert logit_kd_loss(lm_logits, lm_logits.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_scales_with_t_squared_of_softened_kl() -> None:
    student, teacher = torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS)
    at_t1 = (
        _kl(_softmax(TEACHER_LOGITS[0], 1.0), _softmax(STUDENT_LOGITS[0], 1.0))
        + _kl(_softmax(TEACHER_LOGITS[1], 1.0), _softmax(STUDENT_LOGITS[1], 1.0))
    ) / 2
    assert logit_kd_loss(student, teacher, 1.0).item() == pytest.approx(at_t1, rel=1e-5)
    for temperature in (0.5, 2.0, 4.0):
        softened = logit_kd_loss(student / temperature, teacher / temperature, 1.0)
        assert logit_kd_loss(student, teacher, temperature).item() == pytest.approx(
            temperature**2 * softened.item(), rel=1e-5
        )


def test_kd_loss_causal_lm_ignores_padded_positions() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = logit_kd_loss(student, teacher, 2.0, mask)

    # The mean over the 6 real tokens of the per-token KL, times T².
    per_token = [
        _kl(_softmax(teacher[b, i].tolist(), 2.0), _softmax(student[b, i].tolist(), 2.0))
        for b in range(2)
        for i in range(4)
        if mask[b, i]
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 6 * 4, rel=1e-5)

    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[1, 2:] = 100.0 * torch.randn(2, 6)
    changed_teacher[1, 2:] = -50.0
    assert logit_kd_loss(changed_student, changed_teacher, 2.0, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # Without the mask the padded positions count.
    assert logit_kd_loss(changed_student, changed_teacher, 2.0).item() != pytest.approx(loss.item(), rel=1e-3)


def test_kd_loss_rejects_mismatched_shapes_and_bad_temperature() -> None:
    with pytest.raises(ValueError, match="same label set or vocabulary"):
        logit_kd_loss(torch.zeros(2, 5), torch.zeros(2, 6), 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logit_kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), 0.0)


# --- hidden-state loss --------------------------------------------------------------------------------------

STUDENT_HIDDEN = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
TEACHER_HIDDEN = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])


def test_hidden_mse_matches_hand_computation() -> None:
    # token 0: ((1-1)² + (0-1)²) / 2 = 0.5; token 1: ((0-0)² + (2+2)²) / 2 = 8.0
    assert hidden_state_loss(STUDENT_HIDDEN, TEACHER_HIDDEN, "mse").item() == pytest.approx((0.5 + 8.0) / 2)
    only_first = torch.tensor([[1, 0]])
    assert hidden_state_loss(STUDENT_HIDDEN, TEACHER_HIDDEN, "mse", only_first).item() == pytest.approx(0.5)


def test_hidden_cosine_matches_hand_computation() -> None:
    # token 0: 1 - (1·1 + 0·1) / (1 · √2) = 1 - 1/√2; token 1: 1 - (2·-2) / (2 · 2) = 2
    expected = ((1 - 1 / math.sqrt(2)) + 2.0) / 2
    assert hidden_state_loss(STUDENT_HIDDEN, TEACHER_HIDDEN, "cosine").item() == pytest.approx(expected, rel=1e-6)
    only_second = torch.tensor([[0, 1]])
    assert hidden_state_loss(STUDENT_HIDDEN, TEACHER_HIDDEN, "cosine", only_second).item() == pytest.approx(2.0)


def test_hidden_loss_with_projector_trains_the_projector() -> None:
    torch.manual_seed(0)
    projector = HiddenProjector.from_sizes(16, 32, n_pairs=2)
    assert len(projector) == 2 and not projector.is_identity
    student = torch.randn(2, 3, 16, requires_grad=True)
    teacher = torch.randn(2, 3, 32)
    loss = hidden_state_loss(student, teacher, "mse", torch.tensor([[1, 1, 0], [1, 0, 0]]), projector[1])
    loss.backward()
    assert projector[1].weight.grad is not None and projector[1].weight.grad.abs().sum() > 0
    assert projector[0].weight.grad is None
    assert student.grad is not None

    with pytest.raises(ValueError, match="pass a projector"):
        hidden_state_loss(student, teacher, "mse")
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        hidden_state_loss(teacher, teacher, "l1")  # type: ignore[arg-type]


def test_projector_is_identity_when_sizes_match() -> None:
    projector = HiddenProjector.from_sizes(32, 32, n_pairs=3)
    assert projector.is_identity and len(projector) == 3
    assert sum(p.numel() for p in projector.parameters()) == 0
    x = torch.randn(2, 4, 32)
    assert torch.equal(projector(0, x), x)


# --- layer map ----------------------------------------------------------------------------------------------


def test_layer_map_auto_spreads_evenly_and_ends_on_the_last_block() -> None:
    assert parse_layer_map("auto", 2, 6) == [(0, 2), (1, 5)]
    assert parse_layer_map("auto", 3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert parse_layer_map("auto", 4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert parse_layer_map("auto", 4, 10) == [(0, 2), (1, 4), (2, 7), (3, 9)]  # 2.5 and 7.5 round up
    assert parse_layer_map("auto", 1, 5) == [(0, 4)]


def test_layer_map_explicit_list_and_mapping() -> None:
    assert parse_layer_map([[1, 5], [0, 1]], 2, 6) == [(0, 1), (1, 5)]
    assert parse_layer_map([(0, 3), (1, 3)], 2, 6) == [(0, 3), (1, 3)]  # two students may share a teacher block
    assert parse_layer_map({0: 0, 1: 4}, 2, 6) == [(0, 0), (1, 4)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ([[2, 1]], "[2, 1]: student block 2 is out of range 0..1"),
        ([[0, 6]], "[0, 6]: teacher block 6 is out of range 0..5"),
        ([[0, -1]], "[0, -1]: teacher block -1 is out of range 0..5"),
        ([[0, 1], [0, 2]], "[0, 2]: student block 0 is already mapped to teacher block 1"),
        ([[0, 1.5]], "[0, 1.5]: block indices must be ints"),
        ([["0", 1]], "['0', 1]: block indices must be ints"),
        ({"0": 1}, "['0', 1]: block indices must be ints"),
        ([[0, 1, 2]], "[0, 1, 2] is not a [student, teacher] pair"),
        ("spread", "must be 'auto' or a list of [student, teacher] pairs; got 'spread'"),
        ([], "is empty"),
    ],
)
def test_layer_map_errors_name_the_field_the_pair_and_the_ranges(spec: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_layer_map(spec, 2, 6)  # type: ignore[arg-type]
    message = str(info.value)
    assert "distill.layer_map" in message
    assert expected in message
    assert "student blocks are 0..1, teacher blocks 0..5" in message
    assert isinstance(info.value, ValueError)


def test_layer_map_reports_every_bad_pair_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_layer_map([[0, 9], [5, 0], [1, 1]], 2, 6)
    assert len(info.value.issues) == 2
    assert "[0, 9]" in str(info.value) and "[5, 0]" in str(info.value)


def test_hidden_index_skips_the_embedding_output() -> None:
    assert [hidden_index(b) for b in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError):
        hidden_index(-1)


# --- student from teacher -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4-block tiny models (BERT encoder, GPT-2 and Llama causal LMs)."""
    from tests.support.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny4")
    return {arch: make_tiny_model(root / arch, arch, layers=4) for arch in ("bert", "gpt2", "llama")}


def _load(path: Path, arch: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModel if arch == "bert" else AutoModelForCausalLM
    return loader.from_pretrained(path).eval()


def _assert_cut_from(student: torch.nn.Module, teacher: torch.nn.Module, kept: list[int]) -> None:
    teacher_prefix, teacher_blocks = find_blocks_module(teacher)
    student_prefix, student_blocks = find_blocks_module(student)
    assert student_prefix == teacher_prefix
    assert len(student_blocks) == len(kept) == student.config.num_hidden_layers
    for j, i in enumerate(kept):
        student_params = dict(student_blocks[j].named_parameters())
        teacher_params = dict(teacher_blocks[i].named_parameters())
        assert student_params.keys() == teacher_params.keys()
        for name, value in teacher_params.items():
            assert torch.equal(student_params[name], value), f"block {j} {name} != teacher block {i}"
            assert student_params[name].data_ptr() != value.data_ptr()  # a copy, not shared
        # Attention modules learn their new depth (the KV-cache slot), not the teacher's.
        for _, module in student_blocks[j].named_modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == j
    student_groups, teacher_groups = find_layer_groups(student), find_layer_groups(teacher)
    outside = student_groups.embeddings + student_groups.head
    assert outside == teacher_groups.embeddings + teacher_groups.head and outside
    student_params, teacher_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    for name in outside:
        assert torch.equal(student_params[name], teacher_params[name]), name


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_student_from_teacher_keeps_chosen_blocks(tiny4: dict[str, Path], arch: str) -> None:
    teacher = _load(tiny4[arch], arch)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    student = student_from_teacher(teacher, keep_every=2)
    assert type(student) is type(teacher)
    _assert_cut_from(student, teacher, [1, 3])
    assert teacher.config.num_hidden_layers == 4
    if arch == "gpt2":
        assert student.config.n_layer == 2

    explicit = student_from_teacher(teacher, keep_layers=[0, 3])
    _assert_cut_from(explicit, teacher, [0, 3])

    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    # Changing the student leaves the teacher alone.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_student_with_every_block_computes_what_the_teacher_does(tiny4: dict[str, Path], arch: str) -> None:
    teacher = _load(tiny4[arch], arch)
    student = student_from_teacher(teacher, keep_every=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = teacher(input_ids=ids).last_hidden_state if arch == "bert" else teacher(input_ids=ids).logits
        got = student(input_ids=ids).last_hidden_state if arch == "bert" else student(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_student_default_keeps_every_kth_ending_on_the_top_block(tmp_path: Path) -> None:
    from tests.support.tiny_models import make_tiny_model

    teacher = _load(make_tiny_model(tmp_path / "bert6", "bert", layers=6), "bert")
    _assert_cut_from(student_from_teacher(teacher, keep_every=3), teacher, [2, 5])
    _assert_cut_from(student_from_teacher(teacher), teacher, [1, 3, 5])  # default k = 2


def test_student_of_a_classifier_keeps_the_classifier(tiny4: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny4["bert"], num_labels=2).eval()
    student = student_from_teacher(teacher, keep_layers=[1, 3])
    _assert_cut_from(student, teacher, [1, 3])
    assert student.config.num_labels == 2
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 2)


def test_student_from_teacher_rejects_bad_choices(tiny4: dict[str, Path]) -> None:
    teacher = _load(tiny4["bert"], "bert")
    with pytest.raises(ConfigError, match="not both"):
        student_from_teacher(teacher, keep_every=2, keep_layers=[1, 3])
    with pytest.raises(ConfigError, match=r"distill.keep_layers: \[1, 4\] has blocks outside 0..3"):
        student_from_teacher(teacher, keep_layers=[1, 4])
    with pytest.raises(ConfigError, match="strictly increasing"):
        student_from_teacher(teacher, keep_layers=[3, 1])
    with pytest.raises(ConfigError, match=r"distill.keep_every: must be an int in 1..4"):
        student_from_teacher(teacher, keep_every=5)


# --- vocabulary ---------------------------------------------------------------------------------------------


def test_vocab_mismatch_names_both_sizes(tiny4: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny4["bert"])
    config = AutoConfig.from_pretrained(tiny4["bert"])
    vocab = config.vocab_size
    check_vocab_match(tokenizer, tokenizer, config, config)  # one vocabulary: fine

    other = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ConfigError) as info:
        check_vocab_match(tokenizer, tokenizer, config, other)
    message = str(info.value)
    assert f"vocab_size={vocab}" in message and "vocab_size=1000" in message
    assert "distill.teacher" in message and "model.path" in message

    bigger = AutoTokenizer.from_pretrained(tiny4["bert"])
    bigger.add_tokens(["<extra-token>"])
    with pytest.raises(ConfigError, match=rf"{len(tokenizer)} tokens, the student's \(model.path\) {len(bigger)}"):
        check_vocab_match(tokenizer, bigger, config, config)


def test_vocab_same_size_but_different_ids_is_a_mismatch(tiny4: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny4["bert"])
    config = AutoConfig.from_pretrained(tiny4["bert"])

    class Shuffled:
        def __len__(self) -> int:
            return len(tokenizer)

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [(i + 1) % len(tokenizer) for i in tokenizer.encode(text, add_special_tokens=add_special_tokens)]

    with pytest.raises(ConfigError, match="different ids"):
        check_vocab_match(tokenizer, Shuffled(), config, config)


# --- the combined loss --------------------------------------------------------------------------------------


def _outputs(logits: torch.Tensor, hidden: list[torch.Tensor] | None = None) -> SimpleNamespace:
    return SimpleNamespace(logits=logits, hidden_states=None if hidden is None else tuple(hidden))


NO_HIDDEN_ARGS = {
    "temperature": 2.0,
    "layer_pairs": [],
    "hidden_kind": "mse",
    "projector": None,
    "attention_mask": None,
}


def test_distillation_loss_with_only_alpha_is_cross_entropy() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    total, logged = distillation_loss(
        _outputs(student),
        _outputs(teacher),
        labels,
        alpha=1.0,
        beta_kd=0.0,
        gamma_hidden=0.0,
        task="sequence-classification",
        **NO_HIDDEN_ARGS,
    )
    assert total.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
    assert logged == {"loss_ce": pytest.approx(total.item()), "loss": pytest.approx(total.item())}


def test_distillation_loss_total_is_the_weighted_sum_of_the_logged_terms() -> None:
    torch.manual_seed(0)
    n_student, n_teacher = 2, 4
    student_hidden = [torch.randn(2, 3, 16, requires_grad=True) for _ in range(n_student + 1)]
    teacher_hidden = [torch.randn(2, 3, 32) for _ in range(n_teacher + 1)]
    student_logits = torch.randn(2, 3, requires_grad=True)
    pairs = parse_layer_map("auto", n_student, n_teacher)
    projector = HiddenProjector.from_sizes(16, 32, len(pairs))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    total, logged = distillation_loss(
        _outputs(student_logits, student_hidden),
        _outputs(torch.randn(2, 3), teacher_hidden),
        torch.tensor([0, 2]),
        alpha=0.5,
        beta_kd=0.3,
        gamma_hidden=0.2,
        temperature=2.0,
        layer_pairs=pairs,
        hidden_kind="cosine",
        projector=projector,
        attention_mask=mask,
        task="sequence-classification",
    )
    assert set(logged) == {"loss", "loss_ce", "loss_kd", "loss_hidden"}
    weighted = 0.5 * logged["loss_ce"] + 0.3 * logged["loss_kd"] + 0.2 * logged["loss_hidden"]
    assert total.item() == pytest.approx(weighted, rel=1e-6) and logged["loss"] == pytest.approx(weighted, rel=1e-6)
    expected_hidden = sum(
        hidden_state_loss(student_hidden[s + 1], teacher_hidden[t + 1], "cosine", mask, projector[k]).item()
        for k, (s, t) in enumerate(pairs)
    ) / len(pairs)
    assert logged["loss_hidden"] == pytest.approx(expected_hidden, rel=1e-6)
    total.backward()
    assert student_logits.grad is not None and all(p.grad is not None for p in projector.parameters())
    assert student_hidden[0].grad is None  # the embedding output is not in the map


def test_distillation_loss_rejects_zero_weights_and_missing_inputs() -> None:
    logits = _outputs(torch.randn(2, 3))
    with pytest.raises(ValueError, match="not all 0"):
        distillation_loss(
            logits,
            logits,
            torch.tensor([0, 1]),
            alpha=0.0,
            beta_kd=0.0,
            gamma_hidden=0.0,
            task="sequence-classification",
            **NO_HIDDEN_ARGS,
        )
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        distillation_loss(
            logits,
            logits,
            None,
            alpha=0.0,
            beta_kd=0.0,
            gamma_hidden=1.0,
            temperature=1.0,
            layer_pairs=[(0, 0)],
            hidden_kind="mse",
            projector=None,
            attention_mask=None,
            task="sequence-classification",
        )


def test_distillation_loss_causal_lm_shifts_and_masks(tiny4: dict[str, Path]) -> None:
    teacher = _load(tiny4["gpt2"], "gpt2")
    student = student_from_teacher(teacher, keep_every=2)  # in eval mode like its teacher: no dropout
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    student_out = student(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    pairs = parse_layer_map("auto", 2, 4)
    common = {
        "temperature": 2.0,
        "layer_pairs": pairs,
        "hidden_kind": "mse",
        "projector": None,
        "attention_mask": mask,
        "task": "causal-lm",
    }

    total, logged = distillation_loss(
        student_out, teacher_out, labels, alpha=1.0, beta_kd=0.0, gamma_hidden=0.0, **common
    )
    assert total.item() == pytest.approx(student_out.loss.item(), rel=1e-5)  # the model's own shifted CE

    total, logged = distillation_loss(
        student_out, teacher_out, labels, alpha=0.2, beta_kd=0.5, gamma_hidden=0.3, **common
    )
    weighted = 0.2 * logged["loss_ce"] + 0.5 * logged["loss_kd"] + 0.3 * logged["loss_hidden"]
    assert total.item() == pytest.approx(weighted, rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in find_blocks_module(student)[1].parameters())

    # KD compares logits[:, :-1] of both models where input and predicted token are real; logits at padding
    # (row 1, positions 3 and 4) and at the last position do not count.
    changed_student = _outputs(student_out.logits.detach().clone(), list(student_out.hidden_states))
    changed_teacher = _outputs(teacher_out.logits.clone(), list(teacher_out.hidden_states))
    for out in (changed_student, changed_teacher):
        out.logits[1, 3:] = 30.0 * torch.randn(2, out.logits.size(-1))
        out.logits[:, -1] = 0.0
    _, changed = distillation_loss(
        changed_student, changed_teacher, labels, alpha=0.0, beta_kd=1.0, gamma_hidden=0.0, **common
    )
    assert changed["loss_kd"] == pytest.approx(logged["loss_kd"], rel=1e-6)
    kept_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    expected = logit_kd_loss(student_out.logits[:, :-1], teacher_out.logits[:, :-1], 2.0, kept_mask)
    assert logged["loss_kd"] == pytest.approx(expected.item(), rel=1e-6)

"""Causal-LM distillation on instruction data (issue 19): the KD and hidden-state terms skip the tokens whose label
is -100 (prompts under data.train_on: completions, padding), and average over the tokens that carry loss only."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from orchestrator.methods.teacher_student import distillation_loss

B, L, V, D = 2, 6, 11, 8
# Row 0: a 3-token prompt, then the answer; row 1: a 2-token prompt, a 3-token answer, one padding token.
LABELS = torch.tensor([[-100, -100, -100, 4, 5, 6], [-100, -100, 7, 8, 9, -100]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def outputs(logits: torch.Tensor, hidden: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(logits=logits, hidden_states=(hidden, hidden))


def loss_terms(student_logits: torch.Tensor, student_hidden: torch.Tensor, teacher: SimpleNamespace) -> dict:
    _, logged = distillation_loss(
        outputs(student_logits, student_hidden),
        teacher,
        LABELS,
        alpha=0.0,
        beta_kd=1.0,
        gamma_hidden=1.0,
        temperature=1.0,
        layer_pairs=[(0, 0)],
        hidden_kind="mse",
        projector=None,
        attention_mask=ATTENTION,
        task="causal-lm",
    )
    return logged


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, SimpleNamespace]:
    generator = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, L, V, generator=generator)
    student_hidden = torch.randn(B, L, D, generator=generator)
    teacher = outputs(torch.randn(B, L, V, generator=generator), torch.randn(B, L, D, generator=generator))
    return student_logits, student_hidden, teacher


def test_logits_and_hidden_states_of_masked_tokens_have_no_effect() -> None:
    student_logits, student_hidden, teacher = inputs()
    before = loss_terms(student_logits, student_hidden, teacher)

    # Position 1 of row 0 predicts token 2, a prompt token; position 4 of row 1 predicts the padding token.
    # Tokens 0-2 of row 0 and token 5 of row 1 (padding) carry no loss themselves.
    changed_logits, changed_hidden = student_logits.clone(), student_hidden.clone()
    changed_logits[0, 1] += 50.0
    changed_logits[1, 4] -= 50.0
    changed_logits[:, -1] += 50.0  # the last position predicts nothing
    changed_hidden[0, :3] += 50.0
    changed_hidden[1, 5] += 50.0
    after = loss_terms(changed_logits, changed_hidden, teacher)
    assert after["loss_kd"] == before["loss_kd"]
    assert after["loss_hidden"] == before["loss_hidden"]

    answer_logits, answer_hidden = student_logits.clone(), student_hidden.clone()
    answer_logits[0, 2] += 5.0  # predicts token 3, the answer's first
    answer_hidden[1, 3] += 5.0
    moved = loss_terms(answer_logits, answer_hidden, teacher)
    assert moved["loss_kd"] != before["loss_kd"] and moved["loss_hidden"] != before["loss_hidden"]


def test_the_per_token_means_are_over_the_tokens_that_carry_loss_only() -> None:
    student_logits, student_hidden, teacher = inputs(seed=1)
    logged = loss_terms(student_logits, student_hidden, teacher)

    kl = F.kl_div(
        F.log_softmax(student_logits[:, :-1], -1),
        F.log_softmax(teacher.logits[:, :-1], -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    predicts_answer = LABELS[:, 1:] != -100  # 3 + 3 of the 10 positions
    assert torch.isclose(torch.tensor(logged["loss_kd"]), kl[predicts_answer].mean(), rtol=1e-5)
    per_token = (student_hidden - teacher.hidden_states[0]).pow(2).mean(-1)
    assert torch.isclose(torch.tensor(logged["loss_hidden"]), per_token[LABELS != -100].mean(), rtol=1e-5)

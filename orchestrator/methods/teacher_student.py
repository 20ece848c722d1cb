"""Teacher-student distillation: the loss terms and the layer map (a student cut from its teacher:
``orchestrator.methods.student_init``).

Pure functions that a training method assembles (composer style); nothing here holds training state.

* :func:`logit_kd_loss`: KL between temperature-softened teacher and student distributions, times T²
  (Hinton et al., 2015), for classification logits ``[B, C]`` or per-token causal-LM logits ``[B, L, V]``.
* :func:`hidden_state_loss`: MSE or cosine distance between a student and a teacher hidden state, averaged over
  real tokens, through an optional learned projection (:class:`HiddenProjector`) when the widths differ.
* :func:`parse_layer_map` / :func:`hidden_index`: which student block imitates which teacher block, and where
  a block's output sits in a Hugging Face ``output_hidden_states`` tuple.
* :func:`check_vocab_match`: logit distillation needs one shared vocabulary; fail early when there is not.
* :func:`distillation_loss`: ``alpha·CE + beta_kd·KD + gamma_hidden·hidden``, with each term for logging.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import ConfigError, ConfigIssue

logger = logging.getLogger(__name__)

LAYER_MAP_FIELD = "distill.layer_map"
Task = Literal["sequence-classification", "causal-lm"]
HiddenKind = Literal["mse", "cosine"]

# Strings whose token ids must agree between teacher and student tokenizers: words, casing, digits,
# accents, whitespace and punctuation, where differently trained vocabularies usually part ways.
VOCAB_PROBES = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Distillation keeps 12345 numbers, CamelCase and snake_case intact!",
    "naïve café résumé",
    "  leading spaces\tand\nnewlines",
)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is non-zero (all positions when mask is None)."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(values.shape)}")
    weights = mask.to(values.dtype)
    # An all-padding batch gives 0 rather than NaN.
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge-distillation loss on logits: ``T² · KL(softmax(teacher/T) || softmax(student/T))``.

    The KL divergence is taken over the last dimension (classes or vocabulary) at each position and averaged
    over positions: over the batch for classification logits ``[B, C]`` (PyTorch's ``batchmean``), over the
    real tokens for causal-LM logits ``[B, L, V]``. Multiplying by T² keeps the gradient scale independent of
    the temperature (Hinton et al., 2015), so the weight of this term need not change with T. Equivalently,
    ``logit_kd_loss(s, t, T) == T**2 * logit_kd_loss(s / T, t / T, 1)``.

    For causal LMs the caller aligns the logits with what they predict: this function compares position
    ``i`` of student and teacher as they are, and does no shift (:func:`distillation_loss` drops the last
    position and passes the matching mask). The teacher is treated as fixed: its logits are detached.
    Both are upcast to float32, so bf16 logits do not lose the small probabilities.

    Args:
        student_logits: ``[B, C]`` or ``[B, L, V]``.
        teacher_logits: the same shape as ``student_logits``.
        temperature: softening temperature T > 0 (1 = the models' own distributions).
        attention_mask: ``[B]`` or ``[B, L]`` (the logits' shape without the last dimension); positions where
            it is 0 (padding) are left out of the mean. None averages over every position.

    Returns:
        A scalar tensor (0 when the distributions are identical).

    Raises:
        ValueError: the shapes differ (e.g. two vocabularies) or the temperature is not positive.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ "
            "in shape; logit distillation needs the same label set or vocabulary (see check_vocab_match)"
        )
    if not temperature > 0:
        raise ValueError(f"distill.temperature must be > 0; got {temperature}")
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    return _masked_mean(per_position, attention_mask) * temperature**2


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    kind: HiddenKind = "mse",
    attention_mask: torch.Tensor | None = None,
    projector: nn.Module | None = None,
) -> torch.Tensor:
    """Distance between a student and a teacher hidden state, averaged over real tokens.

    Args:
        student_hidden: ``[B, L, D_student]`` (or ``[B, D_student]`` for pooled states).
        teacher_hidden: ``[B, L, D_teacher]``; detached (the teacher is fixed).
        kind: ``"mse"``: per token the mean squared difference over the hidden dimension (TinyBERT);
            ``"cosine"``: per token ``1 - cos(student, teacher)`` (DistilBERT), blind to the scale.
        attention_mask: ``[B, L]``; tokens where it is 0 (padding) are left out. None keeps every token.
        projector: applied to the student state first, e.g. an ``nn.Linear(D_student, D_teacher)`` when the
            widths differ (one entry of a :class:`HiddenProjector`); it learns with the student.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: unknown kind, or the shapes differ after the projection.
    """
    if projector is not None:
        student_hidden = projector(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        hint = "" if projector is not None else "; pass a projector (HiddenProjector) when the hidden sizes differ"
        raise ValueError(
            f"student hidden state {tuple(student_hidden.shape)} and teacher hidden state "
            f"{tuple(teacher_hidden.shape)} differ in shape{hint}"
        )
    student = student_hidden.float()
    teacher = teacher_hidden.detach().float()
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"distill.hidden_loss must be 'mse' or 'cosine'; got {kind!r}")
    return _masked_mean(per_token, attention_mask)


def hidden_index(block: int) -> int:
    """Index of transformer block ``block``'s output in a Hugging Face ``output_hidden_states`` tuple.

    Entry 0 of that tuple is the embedding output, so block ``b`` (0-based) is entry ``b + 1``. For GPT-2 and
    Llama the last entry already has the final layer norm applied (BERT's does not), so mapping the student's
    last block to the teacher's last block compares like with like; mapping it to a middle teacher block
    compares a normalised state with a raw one.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"a block index is an int >= 0; got {block!r}")
    return block + 1


def _auto_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    # round((i + 1) * n_teacher / n_student) - 1, rounding halves up (Python's round() rounds them to even).
    return [(i, ((i + 1) * n_teacher * 2 + n_student) // (2 * n_student) - 1) for i in range(n_student)]


def _layer_map_error(messages: list[str], ranges: str) -> ConfigError:
    return ConfigError([ConfigIssue(LAYER_MAP_FIELD, message, hint=ranges) for message in messages])


def parse_layer_map(
    spec: str | Sequence[Sequence[int]] | Mapping[int, int], n_student: int, n_teacher: int
) -> list[tuple[int, int]]:
    """Turn ``distill.layer_map`` into (student block, teacher block) pairs, sorted by student block.

    Indices are 0-based transformer blocks; each stands for the output of that block (see :func:`hidden_index`).

    Args:
        spec: ``"auto"`` spreads the student evenly over the teacher: student block ``i`` imitates teacher block
            ``round((i + 1) * n_teacher / n_student) - 1`` (halves round up), so the last maps to the last;
            for 2 student and 6 teacher blocks that is ``[(0, 2), (1, 5)]``. Otherwise explicit pairs, as a list
            of ``[student, teacher]`` or a mapping ``{student: teacher}``. Several student blocks may imitate
            one teacher block; one student block may not imitate several.
        n_student: number of student blocks.
        n_teacher: number of teacher blocks.

    Returns:
        The pairs, sorted by student block.

    Raises:
        ConfigError: (a ValueError) listing every bad entry at once: an index out of range, a student block
            given twice, a value that is not an int, an entry that is not a pair, or an empty map.
    """
    for what, n in (("student", n_student), ("teacher", n_teacher)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the {what} must have at least one block; got {n!r}")
    ranges = f"student blocks are 0..{n_student - 1}, teacher blocks 0..{n_teacher - 1}"
    if isinstance(spec, str):
        if spec == "auto":
            return _auto_layer_map(n_student, n_teacher)
        raise _layer_map_error([f"must be 'auto' or a list of [student, teacher] pairs; got {spec!r}"], ranges)
    if isinstance(spec, Mapping):
        entries: list[Any] = [list(item) for item in spec.items()]
    elif isinstance(spec, Sequence):
        entries = list(spec)
    else:
        kind = type(spec).__name__
        raise _layer_map_error([f"must be 'auto', a list of [student, teacher] pairs or a mapping; got {kind}"], ranges)
    if not entries:
        raise _layer_map_error(["is empty; use 'auto' or give [student, teacher] pairs"], ranges)

    issues: list[str] = []
    pairs: list[tuple[int, int]] = []
    teacher_of: dict[int, int] = {}
    for entry in entries:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            issues.append(f"{entry!r} is not a [student, teacher] pair")
            continue
        student, teacher = entry
        shown = [student, teacher]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in shown):
            issues.append(f"{shown!r}: block indices must be ints")
            continue
        if not 0 <= student < n_student:
            issues.append(f"{shown!r}: student block {student} is out of range 0..{n_student - 1}")
        elif not 0 <= teacher < n_teacher:
            issues.append(f"{shown!r}: teacher block {teacher} is out of range 0..{n_teacher - 1}")
        elif student in teacher_of:
            issues.append(
                f"{shown!r}: student block {student} is already mapped to teacher block "
                f"{teacher_of[student]}; each student block imitates one teacher block"
            )
        else:
            teacher_of[student] = teacher
            pairs.append((student, teacher))
    if issues:
        raise _layer_map_error(issues, ranges)
    return sorted(pairs)


class HiddenProjector(nn.Module):
    """One learned map per layer pair from the student's hidden width to the teacher's (TinyBERT's W_h).

    Linear layers when the widths differ, ``nn.Identity`` (no parameters) when they match. Its parameters
    train with the student, so they belong in the student's optimizer and checkpoint.

    The projections sit in an ``nn.ModuleDict`` keyed ``"0"``, ``"1"``, ... (parameter names as with a list),
    not an ``nn.ModuleList``: layer-group discovery (:func:`orchestrator.models.layers.find_blocks_module`) takes the
    longest ModuleList of identical modules for the transformer blocks, and a module holding student and
    projector together must not offer the projections as candidates.

    Args:
        projections: one module per layer pair, in the order of the pairs.
    """

    def __init__(self, projections: Sequence[nn.Module]):
        super().__init__()
        self.projections = nn.ModuleDict({str(i): p for i, p in enumerate(projections)})

    @classmethod
    def from_sizes(cls, student_hidden: int, teacher_hidden: int, n_pairs: int) -> HiddenProjector:
        """Linear student_hidden → teacher_hidden maps for ``n_pairs`` pairs, or identities when equal."""
        if student_hidden == teacher_hidden:
            return cls([nn.Identity() for _ in range(n_pairs)])
        return cls([nn.Linear(student_hidden, teacher_hidden) for _ in range(n_pairs)])

    @classmethod
    def from_configs(cls, student_config: Any, teacher_config: Any, n_pairs: int) -> HiddenProjector:
        """Like :meth:`from_sizes`, reading ``hidden_size`` from two Hugging Face configs."""
        return cls.from_sizes(student_config.hidden_size, teacher_config.hidden_size, n_pairs)

    @property
    def is_identity(self) -> bool:
        return all(isinstance(p, nn.Identity) for p in self.projections.values())

    def __len__(self) -> int:
        return len(self.projections)

    def __getitem__(self, pair: int) -> nn.Module:
        if not -len(self) <= pair < len(self):
            raise IndexError(f"layer pair {pair} out of range for {len(self)} projections")
        return self.projections[str(pair % len(self))]

    def forward(self, pair: int, student_hidden: torch.Tensor) -> torch.Tensor:
        """Project the student hidden state of layer pair number ``pair`` (its position in the layer map)."""
        return self[pair](student_hidden)


def _vocab_size(config: Any) -> int | None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "vocab_size", None)


def check_vocab_match(teacher_tokenizer: Any, student_tokenizer: Any, teacher_config: Any, student_config: Any) -> None:
    """Fail early when teacher and student do not share a vocabulary (logit distillation compares token ids).

    Checks the tokenizer sizes, the configs' ``vocab_size`` (the width of the logits) and the ids both
    tokenizers give a few probe strings (:data:`VOCAB_PROBES`).

    Raises:
        ConfigError: (a ValueError) naming ``distill.teacher`` and ``model.path`` and both sizes.
    """
    issues: list[ConfigIssue] = []
    hint = "distill from a teacher of the same model family (same tokenizer) as model.path"
    teacher_len, student_len = len(teacher_tokenizer), len(student_tokenizer)
    if teacher_len != student_len:
        issues.append(
            ConfigIssue(
                "distill.teacher",
                f"the teacher's tokenizer has {teacher_len} tokens, the student's (model.path) {student_len}",
                hint=hint,
            )
        )
    teacher_vocab, student_vocab = _vocab_size(teacher_config), _vocab_size(student_config)
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        issues.append(
            ConfigIssue(
                "distill.teacher",
                f"the teacher's config has vocab_size={teacher_vocab}, the "
                f"student's (model.path) vocab_size={student_vocab}",
                hint=hint,
            )
        )
    for text in VOCAB_PROBES:
        teacher_ids = teacher_tokenizer.encode(text, add_special_tokens=False)
        student_ids = student_tokenizer.encode(text, add_special_tokens=False)
        if teacher_ids != student_ids:
            issues.append(
                ConfigIssue(
                    "distill.teacher",
                    f"the teacher's tokenizer and the student's (model.path) "
                    f"give {text!r} different ids: {teacher_ids} vs "
                    f"{student_ids}",
                    hint=hint,
                )
            )
            break
    if issues:
        raise ConfigError(issues)


def distillation_loss(
    student_out: Any,
    teacher_out: Any,
    labels: torch.Tensor | None,
    *,
    alpha: float,
    beta_kd: float,
    gamma_hidden: float,
    temperature: float,
    layer_pairs: Sequence[tuple[int, int]],
    hidden_kind: HiddenKind,
    projector: HiddenProjector | None,
    attention_mask: torch.Tensor | None,
    task: Task,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``alpha·CE(labels) + beta_kd·logit_kd_loss + gamma_hidden·mean over layer pairs of hidden_state_loss``.

    For ``causal-lm`` the logits at position ``i`` predict token ``i + 1``: CE uses ``logits[:, :-1]`` against
    ``labels[:, 1:]`` (``-100`` ignored, like Hugging Face), and KD the same logits for both models, averaged
    over the positions whose predicted token carries loss (``labels[:, i + 1] != -100``) and where both the input
    and the predicted token are real (``attention_mask`` 1). So with ``data.train_on: completions`` the student
    imitates the teacher on the answers only, like the CE term; prompt and padding logits have no effect.
    Hidden states are compared position by position, unshifted, over the tokens that carry loss themselves
    (``labels != -100``) and are real. Without labels the masks are the attention mask alone.

    A term whose weight is 0 is not computed (the hidden states or labels it needs may be absent) and is left
    out of the returned dict.

    Args:
        student_out: the student's Hugging Face output (``.logits``; ``.hidden_states`` when gamma_hidden > 0).
        teacher_out: the teacher's output, computed under ``torch.no_grad()``; may be None when only CE is used.
        labels: class ids ``[B]`` or token ids ``[B, L]``; needed when alpha > 0.
        alpha: weight of the cross-entropy with the labels.
        beta_kd: weight of the logit distillation term.
        gamma_hidden: weight of the hidden-state term.
        temperature: KD temperature (see :func:`logit_kd_loss`).
        layer_pairs: (student block, teacher block) pairs from :func:`parse_layer_map`.
        hidden_kind: ``"mse"`` or ``"cosine"``.
        projector: one projection per layer pair (same order), or None when the widths match.
        attention_mask: ``[B, L]`` (1 = real token, 0 = padding) or None.
        task: ``"sequence-classification"`` or ``"causal-lm"``.

    Returns:
        The total loss and a dict of floats for logging: ``loss`` (total) and, for each term computed,
        ``loss_ce``, ``loss_kd``, ``loss_hidden`` (unweighted).

    Raises:
        ValueError: negative or all-zero weights, an unknown task, or an input a weighted term needs is missing.
    """
    _check_weights_and_task(alpha, beta_kd, gamma_hidden, task)
    causal = task == "causal-lm"
    student_logits = student_out.logits[:, :-1] if causal else student_out.logits
    terms: dict[str, torch.Tensor] = {}
    if alpha > 0:
        terms["loss_ce"] = _ce_term(student_logits, labels, causal=causal)
    if (beta_kd > 0 or gamma_hidden > 0) and teacher_out is None:
        raise ValueError("distill.beta_kd or distill.gamma_hidden > 0 needs the teacher's output")
    # Classification logits are one per row: KD averages over the batch, hidden states over real tokens.
    kd_mask, hidden_mask = _causal_masks(labels, attention_mask) if causal else (None, attention_mask)
    if beta_kd > 0:
        terms["loss_kd"] = _kd_term(student_logits, teacher_out, temperature, kd_mask, causal=causal)
    if gamma_hidden > 0:
        terms["loss_hidden"] = _hidden_term(student_out, teacher_out, layer_pairs, hidden_kind, projector, hidden_mask)
    return _weighted_total(terms, {"loss_ce": alpha, "loss_kd": beta_kd, "loss_hidden": gamma_hidden})


def _causal_masks(
    labels: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The causal-LM masks of the KD term (``[B, L - 1]``: position ``i`` predicts a token that carries loss, and
    both tokens are real) and of the hidden term (``[B, L]``: the token carries loss and is real); None when there
    are neither labels nor an attention mask."""
    hidden = None if labels is None else labels != -100
    if attention_mask is not None:
        real = attention_mask != 0
        hidden = real if hidden is None else hidden & real
    if hidden is None:
        return None, None
    kd = hidden[:, 1:]
    if attention_mask is not None:
        kd = kd & (attention_mask[:, :-1] != 0)
    return kd.long(), hidden.long()


def _check_weights_and_task(alpha: float, beta_kd: float, gamma_hidden: float, task: str) -> None:
    """Check the weights of :func:`distillation_loss` (>= 0, not all 0) and its task.

    Raises:
        ValueError: a negative weight, all weights 0, or an unknown task.
    """
    weights = {"alpha": alpha, "beta_kd": beta_kd, "gamma_hidden": gamma_hidden}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"distillation weights must be >= 0 and not all 0; got {weights}")
    if task not in ("sequence-classification", "causal-lm"):
        raise ValueError(f"task must be 'sequence-classification' or 'causal-lm'; got {task!r}")


def _ce_term(student_logits: torch.Tensor, labels: torch.Tensor | None, *, causal: bool) -> torch.Tensor:
    """The cross-entropy of the student's logits with the labels (for causal-lm, the next tokens: ``labels[:, 1:]``
    against the already shifted logits), ``-100`` ignored, in float32.

    Raises:
        ValueError: no labels.
    """
    if labels is None:
        raise ValueError("distill.alpha > 0 needs labels for the cross-entropy term")
    targets = labels[:, 1:] if causal else labels
    return F.cross_entropy(
        student_logits.reshape(-1, student_logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
    )


def _kd_term(
    student_logits: torch.Tensor,
    teacher_out: Any,
    temperature: float,
    mask: torch.Tensor | None,
    *,
    causal: bool,
) -> torch.Tensor:
    """The logit distillation term (:func:`logit_kd_loss`) over ``mask``'s positions (for causal-lm the shifted
    positions of :func:`_causal_masks`)."""
    teacher_logits = teacher_out.logits[:, :-1] if causal else teacher_out.logits
    return logit_kd_loss(student_logits, teacher_logits, temperature, mask)


def _hidden_term(
    student_out: Any,
    teacher_out: Any,
    layer_pairs: Sequence[tuple[int, int]],
    hidden_kind: HiddenKind,
    projector: HiddenProjector | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The hidden-state term: :func:`hidden_state_loss` of each layer pair (through its projection), averaged
    over the pairs.

    Raises:
        ValueError: no layer pairs, no hidden states, or a projector that does not match the pairs.
    """
    if not layer_pairs:
        raise ValueError("distill.gamma_hidden > 0 needs at least one pair in distill.layer_map")
    if student_out.hidden_states is None or teacher_out.hidden_states is None:
        raise ValueError("distill.gamma_hidden > 0 needs hidden states: run both models with output_hidden_states=True")
    if projector is not None and len(projector) != len(layer_pairs):
        raise ValueError(f"the projector has {len(projector)} projections for {len(layer_pairs)} layer pairs")
    per_pair = [
        hidden_state_loss(
            student_out.hidden_states[hidden_index(s)],
            teacher_out.hidden_states[hidden_index(t)],
            hidden_kind,
            attention_mask,
            None if projector is None else projector[k],
        )
        for k, (s, t) in enumerate(layer_pairs)
    ]
    return torch.stack(per_pair).mean()


def _weighted_total(terms: dict[str, torch.Tensor], scale: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the computed terms (in the order they were computed), and the values logged: each
    term unweighted and the total as ``loss``."""
    weighted = [scale[name] * value for name, value in terms.items()]
    total = sum(weighted[1:], weighted[0])
    logged = {name: float(value.detach()) for name, value in terms.items()}
    logged["loss"] = float(total.detach())
    return total, logged

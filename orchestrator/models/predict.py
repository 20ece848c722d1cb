"""Using an exported model: predictions with label names (the label map is saved in the folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import ModelError
from orchestrator.models.loading import read_model_config, resolve_model_path


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
    try:
        path = resolve_model_path(spec)
    except ModelError as exc:
        raise ModelError(
            f"{str(exc).removeprefix('model.path: ')}; predict takes an exported model folder (<run>/final or "
            "<run>/best) or a sequence classifier's hub id"
        ) from None
    if Path(path).is_dir():
        from orchestrator.lifecycle.artifact_store import verify_manifest

        verify_manifest(Path(path))  # a registered model's folder: its files are those registered (issue 20, item 5)
    architectures = read_model_config(path).get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        # A base model (e.g. the hub id 'gpt2') would get a freshly initialised head: random predictions.
        raise ModelError(
            f"{spec} is a {', '.join(architectures)}, not a sequence classifier, so its predictions would come "
            "from an untrained head; give a model trained for sequence-classification (a run's final/ folder)"
        )
    return path

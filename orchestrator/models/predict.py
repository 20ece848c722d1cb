"""Using an exported model: predictions with label names (the label map is saved in the folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import ModelError


def predict(model_dir: str | Path, texts: Sequence[str], *, batch_size: int = 64) -> list[tuple[str, float]]:
    """Return (label name, probability) for each text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not an exported model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
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

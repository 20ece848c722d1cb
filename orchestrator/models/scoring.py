"""Scoring exported models side by side in one process: a job's eval sets, weight bytes and CPU latency.

Used to compare a derived model with the model it came from (a quantized model with its source): both are scored
here in the same process, with the same threads, on the same batches, so the ratios compare like with like.

The eval sets are read exactly as training reads them (``orchestrator.data``: the scan, the token cache, the
collator) and scored with the training's own functions (``orchestrator.train.evaluation.evaluate``: loss,
accuracy, macro-F1 or perplexity; ``orchestrator.train.generation.generation_metrics``: exact match of sets with
``generate: true``), called with one worker (rank 0 of 1, no process group): the numbers are those a run records.
Those two modules need torch and the data layer only (no DeepSpeed, no Ray), so this runs anywhere, e.g. in the
CLI or a continual round's driver.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.errors import DataError
from orchestrator.models.quantize import load_model, weight_bytes

LATENCY_BATCH = 32  # rows per timed forward pass (the "per batch of 32")


@dataclass
class EvalSets:
    """A job's eval sets, scanned and tokenized once for every model scored on them."""

    data: Any  # the DataConfig
    task: str
    tokenizer: Any
    readers: list[Any]
    generation: list[Any]  # GenerationSet, for the eval sets with generate: true
    collator: Any
    batch_size: int

    @property
    def names(self) -> list[str]:
        return [r.scanned.name for r in self.readers]

    def close(self) -> None:
        for item in [*self.readers, *self.generation]:
            close = getattr(item, "close", None)
            if close is not None:
                close()


@dataclass
class ModelScores:
    """One model's scores: ``{eval set: {metric: value}}``, weight bytes and seconds per batch."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    weight_bytes: int = 0
    latency_s: float = 0.0


def eval_sources(data: Mapping[str, Any], recorded: Sequence[Mapping[str, Any]] = ()) -> Any:
    """The ``DataConfig`` of a job's recorded config, each eval set's path replaced by the absolute path that
    the job's data record names for it (a config's own paths may be relative to where the job ran).

    Raises:
        DataError: an eval file that does not exist, naming it and the fix.
    """
    from orchestrator.config.sections import DataConfig

    absolute = {str(e.get("name")): str(e["path"]) for e in recorded if e.get("path")}
    raw = dict(data)
    raw["eval"] = []
    for i, source in enumerate(data.get("eval") or []):
        item = dict(source)
        name = item.get("name") or Path(str(item["path"])).stem
        item["path"] = absolute.get(str(name), item["path"])
        if not storage.is_uri(item["path"]) and not Path(item["path"]).expanduser().is_file():
            raise DataError(
                f"data.eval[{i}] ({name}): the eval file {item['path']} of the source model's job does not exist "
                "here; run from the folder the job ran in (its paths are relative to it) or restore the file"
            )
        raw["eval"].append(item)
    return DataConfig.model_validate(raw)


def open_eval_sets(data: Any, *, task: str, tokenizer: Any, label_names: Sequence[str], batch_size: int) -> EvalSets:
    """Scan and tokenize ``data.eval`` (as a training worker does) for scoring.

    Args:
        data: the job's ``DataConfig`` (:func:`eval_sources`).
        label_names: the model's labels in id order (its ``id2label``); empty for a causal LM.

    Raises:
        DataError: a missing or malformed eval file, or none at all.
    """
    from orchestrator.data.batching import PackedExamples, PackingCollator, PaddingCollator, pad_token_id
    from orchestrator.data.encoding import make_encoder
    from orchestrator.data.readers import RowReader
    from orchestrator.data.sources import restrict_to_labels, scan_source
    from orchestrator.data.token_cache import open_token_cache
    from orchestrator.train.generation import GenerationSet

    if not data.eval:
        raise DataError("the source model's job has no eval sets (data.eval) to score the models on")
    label_to_id = {name: i for i, name in enumerate(label_names)} if task != "causal-lm" else None
    readers, generation = [], []
    for source in data.eval:
        scanned = scan_source(source, task=task, label_to_id=label_to_id, on_bad_rows=data.on_bad_rows)
        if source.labels is not None and task != "causal-lm":
            restrict_to_labels(scanned, source.labels, label_names, on_bad_rows=data.on_bad_rows)
        cache = open_token_cache(source, scanned, data, tokenizer, task=task, builder=True)
        readers.append(PackedExamples(cache, block_size=data.max_length) if data.packing else cache)
        if source.generate:
            encoder = make_encoder(source, data, tokenizer, task=task)
            generation.append(GenerationSet(scanned.name, RowReader(scanned), encoder, source.max_new_tokens))
    pad_id = pad_token_id(tokenizer)
    # sdpa: the attention a CPU model loads with; a packed batch then gets a bool block-diagonal mask.
    collator = (
        PackingCollator(pad_id, attention="sdpa", block_size=data.max_length)
        if data.packing
        else PaddingCollator(pad_id, task=task)
    )
    return EvalSets(data, task, tokenizer, readers, generation, collator, batch_size)


def score_model(model: Any, sets: EvalSets) -> dict[str, dict[str, float]]:
    """Every eval set's metrics of one model (loss, accuracy, f1_macro / perplexity; exact_match where the set
    is generated from)."""
    import torch

    from orchestrator.train.evaluation import evaluate
    from orchestrator.train.generation import generation_metrics

    cpu = torch.device("cpu")
    out: dict[str, dict[str, float]] = {}
    for reader in sets.readers:
        values = evaluate(
            model,
            reader,
            sets.collator,
            task=sets.task,
            num_labels=max(len(getattr(model.config, "id2label", {}) or {}), 1),
            batch_size=sets.batch_size,
            rank=0,
            world_size=1,
            device=cpu,
            label_ids=reader.scanned.label_subset,
        )
        out[reader.scanned.name] = dict(values)
    for generation_set in sets.generation:
        values = generation_metrics(
            model, generation_set, sets.tokenizer, batch_size=sets.batch_size, rank=0, world_size=1, device=cpu,
            zero_stage=0,
        )  # fmt: skip
        out.setdefault(generation_set.name, {}).update(values)
    model.eval()  # evaluate() hands the model back in train mode
    return out


def latency_batch(sets: EvalSets, size: int = LATENCY_BATCH) -> dict[str, Any]:
    """The first ``size`` examples of the first eval set, collated: the batch every model is timed on."""
    reader = sets.readers[0]
    batch = sets.collator([reader.get(i) for i in range(min(size, len(reader)))])
    return {k: v for k, v in batch.items() if k != "labels"}


def time_models(models: Mapping[str, Any], batch: Mapping[str, Any], *, repeats: int = 11) -> dict[str, float]:
    """Seconds of one forward pass of ``batch`` through each model: the fastest of ``repeats`` passes. The models
    take turns (one pass each per round, after a warm-up round), so a load change on the machine hits them alike,
    and the fastest pass is the one least slowed by other processes (on a shared machine the median is mostly
    their noise)."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def compare_models(
    folders: Mapping[str, str | Path], sets: EvalSets, *, threads: int | None = None, repeats: int = 11
) -> dict[str, ModelScores]:
    """Score every model folder on ``sets`` and time it on one batch, in this process with ``threads`` threads.

    Args:
        folders: label -> local model folder (loaded with plain ``from_pretrained``).
        threads: torch's intra-op threads for every model (default: as set now).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    models = {label: load_model(folder, sets.task) for label, folder in folders.items()}
    scores = {label: ModelScores(score_model(m, sets), weight_bytes(folders[label])) for label, m in models.items()}
    for label, seconds in time_models(models, latency_batch(sets), repeats=repeats).items():
        scores[label].latency_s = seconds
    return scores

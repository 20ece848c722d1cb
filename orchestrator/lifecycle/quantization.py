"""``orchestrator quantize``: a quantized model as a derivation step, scored against its source and registered.

:func:`quantize_model` takes the source model (an export folder, a registered model's id, or an ``s3://`` /
``gs://`` URI of an export), quantizes it on CPU (:mod:`orchestrator.models.quantize`), scores source and
quantized model side by side on the source job's eval sets in this process with the same threads
(:mod:`orchestrator.models.scoring`: accuracy / macro-F1, perplexity, exact match of generated sets; weight bytes;
seconds per batch of 32), writes the model card (metrics beside the source's, size and latency ratios) and
registers the result in the registry the source is in: parent = the source, method = ``quantize``, the ratios
and the source's scores in its metrics (``metrics["quantize"]``). Every check on the input (method, model,
eval files, output folder) runs before any model is loaded.

A continual round calls :func:`quantize_champion` after a promotion when its retrain file asks for it
(``quantize: {method: int8-dynamic}``): the quantized model is registered as the champion of ``<name>-<method>``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import orchestrator.storage as storage
from orchestrator.errors import ModelError
from orchestrator.lifecycle.artifact_store import (
    MANIFEST_FILE,
    combined_digest,
    discard_staged,
    folder_digests,
    place_staged,
    stage_export,
    verify_manifest,
)
from orchestrator.lifecycle.model_card import build_card, write_card
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord, RegistryError, artifact_key
from orchestrator.lifecycle.run_registration import EXPORTED_JOB_FILE, code_version, read_licence
from orchestrator.models.quantize import DEFAULT_METHOD, check_embeddings, check_method

logger = logging.getLogger(__name__)

METHOD = "quantize"  # the registry's method of a quantized model
DEFAULT_REGISTRY = Path("runs/registry.sqlite")  # where a model id is looked up without --registry (as registry show)


@dataclass
class Source:
    """The model to quantize: a local folder, its registry record (if registered) and its job's config."""

    spec: str
    folder: Path
    config: dict[str, Any]
    record: ModelRecord | None = None
    registry: Registry | None = None
    eval_files: list[dict[str, Any]] = field(default_factory=list)  # the data record's eval sets (absolute paths)

    @property
    def parent(self) -> str:
        return self.record.id if self.record else self.spec


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` made: the folder or URI, its record (None: no registry), scores and ratios."""

    out: str
    record: ModelRecord | None
    metrics: dict[str, Any]
    source: str
    card: str | None = None


# --------------------------------------------------------------------------------------------------
# The source model
# --------------------------------------------------------------------------------------------------


def _manifest_registry(folder: Path) -> Path | None:
    """The registry a registered model's version folder names in its manifest."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    value = json.loads(manifest.read_text()).get("registry")
    return Path(value) if value else None


def _job_registry(config: dict[str, Any]) -> Path | None:
    """The registry file a job registered into (``output.registry``; 'auto': ``<output.dir>/registry.sqlite``)."""
    output = config.get("output") or {}
    value = output.get("registry", "auto")
    if value is None or storage.is_uri(str(output.get("dir") or "")):
        return None
    path = Path(output.get("dir") or "runs") / "registry.sqlite" if value == "auto" else Path(value)
    return path.expanduser().resolve()


def _registered(registry: Registry, folder: Path, spec: str) -> ModelRecord | None:
    """The registered model whose artifact is ``folder`` (or ``spec``), else the one with the same files."""
    found = registry.find_by_artifact(str(folder)) or registry.find_by_artifact(spec)
    if found is None and (folder / EXPORTED_JOB_FILE).is_file():
        found = registry.find_by_weights(combined_digest(folder_digests(folder)))
    return found


def _by_id(spec: str, registry_file: Path | None) -> tuple[ModelRecord, Registry]:
    """A registered model by id (``name-vN``) or name (its champion, else its newest version), in
    ``registry_file`` (default :data:`DEFAULT_REGISTRY`).

    Raises:
        ModelError: no registry, or no such model in it.
    """
    registry_file = registry_file or DEFAULT_REGISTRY
    if not registry_file.is_file():
        raise ModelError(
            f"MODEL: {spec!r} is not a model folder and there is no registry at {registry_file}; give an export "
            "folder (<run>/final), an s3:// URI of one, or a registered model's id with --registry PATH"
        )
    registry = Registry(registry_file)
    record = registry.find(spec) or registry.champion(spec) or next(reversed(registry.models(spec)), None)
    if record is None:
        try:
            registry.get(spec)  # raises, suggesting close ids
        except RegistryError as exc:
            raise ModelError(f"MODEL: {spec!r} is not a model folder, and {exc}") from None
    return registry.verify(record.id), registry


def resolve_source(spec: str, registry_file: Path | None = None) -> Source:
    """The model to quantize, its job config and its registry entry.

    Args:
        spec: an export folder, an ``s3://``/``gs://`` URI of one, or a registered model's id or name.
        registry_file: the registry to look in (default: the one a registered folder's manifest names, else the
            one the source's job registered into, when it exists).

    Raises:
        ModelError: the model does not resolve, or it has no job config (no eval sets to score on).
    """
    record, registry = None, None
    if storage.is_uri(spec):
        folder = storage.local_copy(spec)
    elif Path(spec).expanduser().exists() or spec.startswith((".", "~")) or "/" in spec:  # ids have no "/"
        folder = _local_folder(spec)
        verify_manifest(folder)  # a registered folder whose files changed is not the model registered
    else:
        record, registry = _by_id(spec, registry_file)
        folder = Path(record.artifact) if not storage.is_uri(record.artifact) else storage.local_copy(record.artifact)
    config = record.config if record else _job_config(folder, spec)
    if registry is None:
        path = registry_file or _manifest_registry(folder) or _job_registry(config)
        registry = Registry(path) if path is not None and path.is_file() else None
        record = _registered(registry, folder, spec) if registry is not None else None
        if record is not None:
            config = record.config
    evals = list((record.data if record else {}).get("eval") or [])
    return Source(spec=spec, folder=folder, config=config, record=record, registry=registry, eval_files=evals)


def _local_folder(spec: str) -> Path:
    """A local model folder.

    Raises:
        ModelError: it does not exist or holds no config.json.
    """
    from orchestrator.models.loading import resolve_model_path

    try:
        return Path(resolve_model_path(spec))
    except ModelError as exc:
        raise ModelError(f"MODEL: {str(exc).removeprefix('model.path: ')}") from None


def _job_config(folder: Path, spec: str) -> dict[str, Any]:
    """The config of the job that exported ``folder`` (its ``orchestrator_job.yaml``).

    Raises:
        ModelError: the folder has none (a hub model or a folder from elsewhere: no eval sets recorded).
    """
    path = folder / EXPORTED_JOB_FILE
    if not path.is_file():
        raise ModelError(
            f"MODEL: {spec} has no {EXPORTED_JOB_FILE}, so its eval sets are unknown; quantize takes a model this "
            "project trained (a run's final/ or best/ folder, or a registered model)"
        )
    return yaml.safe_load(path.read_text()) or {}


def _check_out(out: str) -> None:
    """The output folder must be new or empty (a URI: writable, with no model in it yet).

    Raises:
        ModelError: naming the folder and the fix.
    """
    if storage.is_uri(out):
        storage.check(out, write=True)
        if storage.exists(storage.join(out, "config.json")):
            raise ModelError(f"--out: {out} already holds a model; give a new prefix")
        return
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelError(f"--out: {path} exists and is not an empty folder; give a new folder")


# --------------------------------------------------------------------------------------------------
# Quantize, score, card, register
# --------------------------------------------------------------------------------------------------


def quantize_model(
    model: str,
    out: str,
    *,
    method: str = DEFAULT_METHOD,
    embeddings: str = "auto",
    registry: Path | None = None,
    name: str | None = None,
    threads: int | None = None,
    status: str = "candidate",
) -> QuantizeResult:
    """Quantize ``model`` into ``out``, score it against the source and register it beside the source.

    Args:
        model: an export folder, an ``s3://``/``gs://`` URI of one, or a registered model's id or name.
        out: the folder (or URI) to write; must be new or empty.
        method: one of :data:`orchestrator.models.quantize.METHODS`.
        embeddings: the input embedding: ``auto`` (int8 for classifiers, fp32 for causal LMs), ``int8`` or ``fp32``.
        registry: the registry to use (default: the source's, see :func:`resolve_source`).
        name: the registry name (default ``<source name>-<method>``).
        threads: torch threads for scoring and timing both models (default: torch's).
        status: 'candidate' or 'champion' (of ``name``).

    Raises:
        ModelError: bad input, before any model is loaded (unknown method or model, no eval sets, bad --out).
        DataError: an eval file of the source's job is missing or malformed.
    """
    from orchestrator.models.scoring import eval_sources

    check_method(method)
    check_embeddings(embeddings)
    source = resolve_source(model, registry)
    _check_out(out)
    data = eval_sources(source.config.get("data") or {}, source.eval_files)
    local_out, staging = (Path(tempfile.mkdtemp(prefix="quantize-")), True) if storage.is_uri(out) else (
        Path(out).expanduser().resolve(), False)  # fmt: skip
    try:
        metrics, task = _quantize_and_score(source, local_out, data, method=method, embeddings=embeddings,
                                            threads=threads)  # fmt: skip
        label = name or f"{_source_name(source)}-{method}"
        card = _write_card(source, local_out, label, task, metrics)
        record = _register(source, local_out, label, metrics, status=status, method=method)
        if staging:
            storage.upload(local_out, out)
    finally:
        if staging:
            shutil.rmtree(local_out, ignore_errors=True)
    return QuantizeResult(out=out, record=record, metrics=metrics, source=source.parent, card=card)


def _source_name(source: Source) -> str:
    if source.record is not None:
        return source.record.name
    return str(source.config.get("name") or source.folder.parent.name or "model")


def _quantize_and_score(
    source: Source, out: Path, data: Any, *, method: str, embeddings: str, threads: int | None
) -> tuple[dict[str, Any], str]:
    """Quantize into ``out``, then score source and quantized model in this process; the registry's metrics."""
    import torch

    from orchestrator.models.loading import load_tokenizer, read_model_config
    from orchestrator.models.quantize import quantize_folder
    from orchestrator.models.scoring import LATENCY_BATCH, compare_models, open_eval_sets
    from orchestrator.version import __version__

    done = quantize_folder(source.folder, out, method=method, embeddings=embeddings)
    id2label = read_model_config(str(source.folder)).get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if done.task != "causal-lm" else []
    batch = int((source.config.get("training") or {}).get("eval_batch_size") or 64)
    sets = open_eval_sets(
        data, task=done.task, tokenizer=load_tokenizer(str(source.folder)), label_names=labels, batch_size=batch
    )
    try:
        scores = compare_models({"parent": source.folder, "quantized": out}, sets, threads=threads)
    finally:
        sets.close()
    parent, quantized = scores["parent"], scores["quantized"]
    import torchao

    delta = {
        s: {k: v - parent.metrics.get(s, {}).get(k, float("nan")) for k, v in values.items()}
        for s, values in quantized.metrics.items()
    }
    summary = {
        "method": method,
        "embeddings": embeddings,
        "parent": source.parent,
        "torchao": torchao.__version__,
        "orchestrator": __version__,
        "threads": torch.get_num_threads(),
        "latency_batch": LATENCY_BATCH,
        "weight_bytes": {"parent": parent.weight_bytes, "quantized": quantized.weight_bytes,
                         "ratio": quantized.weight_bytes / max(parent.weight_bytes, 1)},
        "latency_s": {"parent": parent.latency_s, "quantized": quantized.latency_s,
                      "ratio": quantized.latency_s / max(parent.latency_s, 1e-12)},
        "parent_eval": parent.metrics,
        "delta": delta,
        "quantized_weights": len(done.quantized),
        "kept": done.kept,
    }  # fmt: skip
    return {"eval": quantized.metrics, "quantize": summary}, done.task


def quantization_section(summary: dict[str, Any]) -> str:
    """The card's "Quantization" section: method, sizes and latency beside the source's."""
    w, t = summary["weight_bytes"], summary["latency_s"]
    return "\n".join(
        [
            f"Post-training quantization `{summary['method']}` (torchao {summary['torchao']}) of `{summary['parent']}`"
            f", on CPU; loads with plain `from_pretrained` (torchao installed). Full precision kept: "
            f"{', '.join(f'`{k}`' for k in summary['kept']) or 'nothing'}, layer norms and biases.",
            "",
            "| | parent | quantized | ratio |",
            "|---|---|---|---|",
            f"| weight bytes | {w['parent']:,} | {w['quantized']:,} | {w['ratio']:.3f} |",
            f"| CPU latency per batch of {summary['latency_batch']} (s, {summary['threads']} threads) "
            f"| {t['parent']:.4f} | {t['quantized']:.4f} | {t['ratio']:.3f} |",
        ]
    )


def _write_card(source: Source, out: Path, label: str, task: str, metrics: dict[str, Any]) -> str:
    """The model card, written before registration so that the version folder holds it (hashed)."""
    record, registry = source.record, source.registry
    chain = [r.id for r in registry.ancestors(record.id)][::-1] if record is not None and registry is not None else []
    base = record.base_model if record else _config_model_path(source)
    card = build_card(
        name=label,
        method=METHOD,
        task=task,
        base_model=base,
        licence=_licence(source),
        metrics={"eval": metrics["eval"]},
        parent=source.parent,
        lineage=[s for s in dict.fromkeys([base, *chain, source.parent]) if s] + [f"{label} (this model)"],
        data=record.data if record else None,
        config=source.config,
        parent_metrics={"eval": metrics["quantize"]["parent_eval"]},
        parent_label=f"parent ({source.parent})",
        extra_sections={"Quantization": quantization_section(metrics["quantize"])},
    )
    return write_card(out, card)


def _config_model_path(source: Source) -> str | None:
    return (source.config.get("model") or {}).get("path")


def _licence(source: Source) -> str | None:
    if source.record is not None and source.record.licence:
        return source.record.licence
    return read_licence(str(source.folder))


def _register(
    source: Source, folder: Path, name: str, metrics: dict[str, Any], *, status: str, method: str
) -> ModelRecord | None:
    """Register the quantized folder in the source's registry (None: the source is in none)."""
    registry, record = source.registry, source.record
    if registry is None:
        logger.warning("%s is in no registry: the quantized model is not registered (pass --registry)", source.spec)
        return None
    config = {**source.config, "quantize": {"method": method, "source": source.parent}}
    staged = stage_export(folder, registry.artifacts_dir)
    try:
        registered = registry.register(
            name,
            method=METHOD,
            artifact=artifact_key(str(staged.folder)),
            config=config,
            data=record.data if record else {},
            metrics=metrics,
            parent_id=record.id if record else None,
            parent_ref=None if record else str(source.folder),
            base_model=(record.base_model if record else None) or _config_model_path(source),
            licence=_licence(source),
            code_version=code_version(),
            status=status,
            weights_sha256=staged.sha256,
            files=staged.files,
            place=lambda model_id: place_staged(staged, model_id, registry=registry.path),
        )
    finally:
        discard_staged(staged)
    from orchestrator.lifecycle.wandb_lineage import log_model_version

    log_model_version(registry, registered)  # never raises: the registry row is the record
    return registry.get(registered.id)


def quantize_champion(registry: Registry, champion: ModelRecord, settings: Any, out: Path) -> ModelRecord | None:
    """A continual round's newly promoted champion, quantized into ``out`` and registered as the champion of
    ``<name>-<method>`` (its previous quantized champion archived).

    Args:
        settings: the retrain file's ``quantize`` section (method, embeddings, threads).

    Returns:
        The quantized model's record, or None when quantizing failed: the promotion is recorded already and stays
        (the error is logged; ``orchestrator quantize <champion id>`` retries it by hand).
    """
    try:
        result = quantize_model(
            champion.id,
            str(out),
            method=settings.method,
            embeddings=settings.embeddings,
            registry=registry.path,
            threads=settings.threads,
            status="champion",
        )
    except Exception as exc:  # the round's own outcome (a promoted champion) must not turn into a failed round
        logger.exception("quantizing the champion %s failed (%s); quantize it by hand later", champion.id, exc)
        return None
    return result.record

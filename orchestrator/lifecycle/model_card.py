"""Model cards: the ``README.md`` in the Hugging Face model-card format that every exported model carries.

The YAML header has ``base_model``, ``license`` (inherited from the base model, see
:mod:`orchestrator.lifecycle.licence`), ``datasets`` (the data files' names), ``tags`` (method, task,
``orchestrator``), ``pipeline_tag``, ``library_name`` and the eval metrics as ``model-index`` (exact values: they
equal the eval record of ``metrics.jsonl`` the export was made at). The body: method, parent and lineage (from
the registry when the parent is registered: base -> ... -> this model), data files with sha256 and row counts, the
metrics (beside the parent's when the run scored its starting model, see :data:`START_EVAL_KIND`), intended use and
limits, how to load it, and the job's config (secrets never: keys that name a secret are left out and the values of
the process's secret variables masked, as in :mod:`orchestrator.tracking`).

Who writes cards: :func:`write_run_cards`, called by the driver once a run has finished (the launcher, a sweep
trial, a continual round before it registers its candidate), for ``final/``, ``best/`` and a LoRA ``adapter/``
folder. The card is written before registration, so a registered model's version folder holds it too (hashed with
its other files); ``orchestrator registry show`` prints that card (:func:`card_of_record`). Other derivations
(quantization) call :func:`build_card` and :func:`write_card` themselves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import orchestrator.storage as storage
from orchestrator.errors import OrchestratorError
from orchestrator.lifecycle.licence import licence_problem
from orchestrator.lifecycle.run_registration import lineage_fields, metrics_by_eval_set, registry_path
from orchestrator.models.loading import resolve_quietly
from orchestrator.start_vs_end import COMPARISON_KIND, START_EVAL_KIND, describe_reference, table_rows
from orchestrator.tracking import is_secret_name, read_metrics, redact_secrets

if TYPE_CHECKING:
    from orchestrator.config import JobConfig
    from orchestrator.lifecycle.registry import Registry
    from orchestrator.lifecycle.registry_records import ModelRecord

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
EXPORT_METRICS_FILE = "orchestrator_metrics.json"  # what orchestrator.train.export writes into every export
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder
EXPORTS = ("final", "best")
# START_EVAL_KIND records of metrics.jsonl hold the scores of the model a run starts from (``<set>/<metric>``, like
# eval records): the card's comparison column (orchestrator.train.start_eval writes them, orchestrator.start_vs_end
# defines them). A run without one, or whose start had a new classification head, has no column.

_PIPELINES = {"sequence-classification": "text-classification", "causal-lm": "text-generation"}
_AUTO_CLASSES = {"sequence-classification": "SequenceClassification", "causal-lm": "CausalLM"}


# ---------------------------------------------------------------------------------------------------- the card
def build_card(
    *,
    name: str,
    method: str,
    task: str,
    base_model: str | None,
    licence: str | None,
    metrics: Mapping[str, Any],
    parent: str | None = None,
    teacher: str | None = None,
    lineage: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    parent_metrics: Mapping[str, Any] | None = None,
    parent_label: str = "parent",
    adapter: bool = False,
    extra_sections: Mapping[str, str] | None = None,
) -> ModelCard:
    """A model card in the Hugging Face format (YAML header + Markdown body).

    Args:
        name: the model's name (job name or registry id).
        method: how it was derived (full, lora, distill, quantize, ...).
        task: ``model.task`` (sequence-classification, causal-lm).
        base_model: the base model it descends from (hub id or folder).
        licence: the licence it inherits (None: unknown).
        metrics: its eval metrics, flat (``{'sst2/accuracy': 0.9, 'step': 6}``, as in metrics.jsonl) or as the
            registry records them (``{'eval': {'sst2': {'accuracy': 0.9}}, 'step': 6}``).
        parent: the model it was derived from directly (registry id or path).
        teacher: the teacher of a distilled student.
        lineage: base -> ... -> this model, oldest first.
        data: the run's data summary (``PreparedData.summary()``: files with sha256 and row counts).
        config: the job config (``JobConfig.to_dict()``); secrets are left out.
        parent_metrics: the parent's metrics in the same shapes, for the comparison column (the start of the
            run's scores, or the source model's for a quantized one).
        parent_label: the comparison column's heading.
        adapter: the folder holds a PEFT adapter (loaded with peft, on top of the base model).
        extra_sections: more sections, heading -> Markdown (e.g. a quantized model's size and latency ratios).
    """
    scores = _nested(metrics)
    before = _nested(parent_metrics) if parent_metrics else {}
    header = _card_data(name, method, task, base_model, licence, scores, data, adapter)
    sections = [
        f"# {name}\n\n{_summary(method, task, base_model, parent, teacher)}",
        "## Model\n\n" + _model_table(method, task, base_model, parent, teacher, licence, metrics),
        "## Lineage\n\n" + (" -> ".join(f"`{step}`" for step in lineage) if lineage else "not recorded"),
        "## Data\n\n" + _data_table(data or {}),
        "## Evaluation\n\n" + _metrics_table(scores, before, parent_label),
        "## Intended use and limits\n\n" + _intended_use(task, data or {}, licence, method),
        "## How to load\n\n" + _loading(task, adapter),
        *(f"## {title}\n\n{text.strip()}" for title, text in (extra_sections or {}).items()),
        "## Training configuration\n\n```yaml\n" + _config_yaml(config or {}) + "```",
    ]
    return ModelCard(f"---\n{header.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_card(destination: str | Path, card: ModelCard) -> str:
    """Write ``card`` as ``README.md`` into an export folder, local or on a bucket (``s3://...``).

    Returns:
        The path or URI written.
    """
    target = storage.join(str(destination), CARD_FILE)
    storage.write_text(target, card.content)
    return target


def _nested(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{eval set: {metric: value}}`` of either metrics shape (see :func:`build_card`)."""
    if isinstance(metrics.get("eval"), Mapping):
        return {k: dict(v) for k, v in metrics["eval"].items()}
    return metrics_by_eval_set(dict(metrics))["eval"]


def _licence_fields(licence: str | None) -> dict[str, str]:
    """The card's ``license`` (and ``license_name`` for a named custom licence: ``other (name)``)."""
    if not licence:
        return {"license": "unknown"}
    if licence.startswith("other (") and licence.endswith(")"):
        return {"license": "other", "license_name": licence[len("other (") : -1]}
    return {"license": licence}


def _card_data(
    name: str,
    method: str,
    task: str,
    base_model: str | None,
    licence: str | None,
    scores: dict[str, dict[str, float]],
    data: Mapping[str, Any] | None,
    adapter: bool,
) -> ModelCardData:
    pipeline = _PIPELINES.get(task, task)
    files = [data.get("train") or {}, *(data.get("eval") or [])] if data else []
    datasets = list(dict.fromkeys(Path(str(f["path"])).name for f in files if f.get("path")))
    results = [
        EvalResult(
            task_type=pipeline, dataset_type=eval_set, dataset_name=eval_set, metric_type=metric, metric_value=value
        )
        for eval_set, values in scores.items()
        for metric, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return ModelCardData(
        model_name=name,
        base_model=base_model,
        datasets=datasets or None,
        tags=list(dict.fromkeys([method, task, "orchestrator", *(["peft"] if adapter else [])])),
        pipeline_tag=pipeline,
        library_name="peft" if adapter else "transformers",
        eval_results=results or None,
        **_licence_fields(licence),
    )


def _summary(method: str, task: str, base_model: str | None, parent: str | None, teacher: str | None) -> str:
    source = f"`{parent}`" if parent else "its base model"
    how = f"distilled from the teacher `{teacher}`" if teacher else f"derived from {source} with method `{method}`"
    return f"A {task} model {how}; base model `{base_model or 'unknown'}`. Trained with orchestrator."


def _model_table(
    method: str,
    task: str,
    base_model: str | None,
    parent: str | None,
    teacher: str | None,
    licence: str | None,
    metrics: Mapping[str, Any],
) -> str:
    rows = [
        ("method", method),
        ("task", task),
        ("base model", base_model or "unknown"),
        ("parent", parent or "-"),
        ("teacher", teacher or "-"),
        ("licence", licence or "unknown (not declared by the base model's card)"),
        ("step", metrics.get("step", "-")),
        ("epoch", metrics.get("epoch", "-")),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _data_table(data: Mapping[str, Any]) -> str:
    files = [("train", data.get("train"))] + [("eval", e) for e in data.get("eval") or []]
    continual = data.get("continual") or {}
    files += [("new (continual)", f) for f in continual.get("new") or []]
    files += [("replayed (continual)", f) for f in continual.get("replay") or []]
    rows = [
        f"| {role} | {_cell(f.get('name', '-'))} | `{_cell(f.get('path', '-'))}` | `{f.get('sha256', '-')}` | "
        f"{f.get('rows', '-')} |"
        for role, f in files
        if f
    ]
    if not rows:
        return "not recorded"
    labels = data.get("label_names")
    table = "| role | name | file | sha256 | rows |\n|---|---|---|---|---|\n" + "\n".join(rows)
    return table + (f"\n\nLabels: {', '.join(f'`{label}`' for label in labels)}" if labels else "")


def _metrics_table(scores: dict[str, dict[str, float]], before: dict[str, dict[str, float]], label: str) -> str:
    if not scores:
        return "No evaluation was run."
    compare = bool(before)
    head = "| eval set | metric | this model |" + (f" {label} | change |" if compare else "")
    rule = "|---|---|---|" + ("---|---|" if compare else "")
    rows = []
    for eval_set, values in scores.items():
        for metric, value in values.items():
            row = f"| {eval_set} | {metric} | {_number(value)} |"
            if compare:
                old = before.get(eval_set, {}).get(metric)
                change = f"{value - old:+.4f}" if isinstance(old, (int, float)) else "-"
                row += f" {_number(old)} | {change} |"
            rows.append(row)
    note = "" if compare else "\n\nThe run did not score its starting model, so there is no comparison column."
    return "\n".join([head, rule, *rows]) + note


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def _intended_use(task: str, data: Mapping[str, Any], licence: str | None, method: str) -> str:
    train = data.get("train") or {}
    labels = data.get("label_names") or []
    what = (
        f"classifying text into {', '.join(f'`{label}`' for label in labels)}"
        if task == "sequence-classification" and labels
        else "generating text like its training data"
        if task == "causal-lm"
        else task
    )
    lines = [
        f"- Intended for {what}, on text like `{Path(str(train.get('path', 'its training data'))).name}`.",
        "- Measured only on the eval sets above: other domains, languages or label definitions are untested, and "
        "it has not been evaluated for bias or safety.",
        "- It inherits the limits and biases of its base model and of its training data.",
    ]
    problem = licence_problem(licence)
    if problem == "restricted":
        lines.append(f"- The base model's licence ({licence}) forbids sharing derivatives: do not distribute it.")
    elif problem == "unknown":
        lines.append("- The base model's licence is unknown: check its terms before sharing this model.")
    else:
        lines.append(f"- Use is subject to the base model's licence, `{licence}`.")
    if method == "distill":
        lines.append("- A distilled student: expect somewhat lower scores than its teacher, at lower cost.")
    return "\n".join(lines)


def _loading(task: str, adapter: bool) -> str:
    kind = _AUTO_CLASSES.get(task, "SequenceClassification")
    if adapter:
        code = (
            f"from peft import AutoPeftModelFor{kind}\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelFor{kind}.from_pretrained("path/to/this/folder")  # loads the base model too\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
        )
        note = "A LoRA adapter: peft loads the base model named in `adapter_config.json` and applies it."
    else:
        code = (
            f"from transformers import AutoModelFor{kind}, AutoTokenizer\n\n"
            f'model = AutoModelFor{kind}.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
        )
        note = 'Or from the command line: `orchestrator predict path/to/this/folder "some text"`.'
    return f"```python\n{code}\n```\n\n{note}"


def _config_yaml(config: Mapping[str, Any]) -> str:
    """The config as YAML without secrets: keys that name one are dropped, secret variables' values masked."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if not is_secret_name(str(k))}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return redact_secrets(yaml.safe_dump(clean(config), sort_keys=False))


# ------------------------------------------------------------------------------------------ a run's exports
def write_run_cards(
    config: JobConfig,
    run_dir: str | Path,
    *,
    model_path: str,
    data: Mapping[str, Any] | None,
    registry: Registry | None = None,
    final_metrics: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write the card of every export of a finished run: ``final/``, ``best/`` and their LoRA ``adapter/``.

    Each card's metrics are those its folder was exported with (``orchestrator_metrics.json``: the eval record of
    metrics.jsonl at that step). A failure to write is logged, never raised: the trained model is kept either way.

    Args:
        config: the job as run.
        run_dir: its run folder (local or a URI).
        model_path: the resolved model.path.
        data: the run's data summary (a continual round's data record, with its new and replayed files).
        registry: where the parent may be registered (default: the job's ``output.registry`` when it exists).
        final_metrics: the metrics of ``final/`` when its folder has no ``orchestrator_metrics.json``.

    Returns:
        The cards written (paths or URIs).
    """
    registry = registry if registry is not None else _existing_registry(config)
    facts = _run_facts(config, model_path, registry)
    records = read_metrics(run_dir)
    start = [r for r in records if r.get("kind") == START_EVAL_KIND]
    comparison = [r for r in records if r.get("kind") == COMPARISON_KIND]
    label = f"start of run ({start[-1].get('reference') or 'model'})" if start else "start of run"
    extra = {"Against the start of the run": _start_section(comparison[-1])} if comparison else None
    written = []
    for export in EXPORTS:
        folder = storage.join(str(run_dir), export)
        for target in (folder, storage.join(folder, "adapter")):
            if not storage.exists(storage.join(target, "config.json")) and not _is_adapter(target):
                continue
            try:
                card = build_card(
                    **facts,
                    metrics=_export_metrics(folder) or (final_metrics if export == "final" else None) or {},
                    data=data,
                    config=config.to_dict(),
                    parent_metrics=start[-1] if start else None,
                    parent_label=label,
                    extra_sections=extra,
                    adapter=_is_adapter(target),
                )
                written.append(write_card(target, card))
            except (OSError, OrchestratorError) as exc:
                logger.warning("model card not written into %s: %s", target, exc)
    return written


def _start_section(comparison: Mapping[str, Any]) -> str:
    """What the run started from, and the sizes and speeds of both (the scores are in the evaluation table)."""
    lines = [f"Started from {describe_reference(comparison)}."]
    rows = [r for r in table_rows(comparison) if r[1].endswith("(x)")]
    if rows:
        lines += ["", "| eval set | measure | start | this model | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {m.removesuffix(' (x)')} | {_number(a)} | {_number(b)} | {_number(c)} |"
                  for s, m, a, b, c in rows]
    return "\n".join(lines)


def _existing_registry(config: JobConfig) -> Registry | None:
    """The job's registry when the file exists (a card does not create one)."""
    from orchestrator.lifecycle.registry import Registry

    path = registry_path(config)
    return Registry(path) if path is not None and path.is_file() else None


def _run_facts(config: JobConfig, model_path: str, registry: Registry | None) -> dict[str, Any]:
    """name, method, task, base model, licence, parent, teacher and lineage of a run's model."""
    from orchestrator.lifecycle.licence import job_licence

    if registry is not None:
        fields = lineage_fields(config, registry, model_path)
    else:
        teacher = config.distill.teacher if config.method == "distill" and config.distill is not None else None
        parent_path = resolve_quietly(teacher) if teacher else model_path
        fields = {"parent_id": None, "parent_ref": parent_path, "teacher_id": None, "teacher_ref": teacher,
                  "base_model": parent_path, "licence": None}  # fmt: skip
    parent = fields["parent_id"] or fields["parent_ref"]
    chain = [r.id for r in registry.ancestors(fields["parent_id"])][::-1] if registry and fields["parent_id"] else []
    base = fields["base_model"]
    lineage = [step for step in dict.fromkeys([base, *chain, parent]) if step] + [f"{config.name} (this model)"]
    return {
        "name": config.name,
        "method": config.method,
        "task": config.model.task,
        "base_model": base,
        "licence": fields["licence"] or job_licence(config.model.license, fields["parent_ref"] or model_path),
        "parent": parent,
        "teacher": fields["teacher_id"] or fields["teacher_ref"],
        "lineage": lineage,
    }


def _is_adapter(folder: str) -> bool:
    return storage.exists(storage.join(folder, ADAPTER_CONFIG))


def _export_metrics(folder: str) -> dict[str, Any]:
    """The metrics an export was written with (its ``orchestrator_metrics.json``), flat as in metrics.jsonl."""
    path = storage.join(folder, EXPORT_METRICS_FILE)
    if not storage.exists(path):
        return {}
    return dict(json.loads(storage.read_text(path)).get("metrics") or {})


# ------------------------------------------------------------------------------------------ registered models
def card_of_record(record: ModelRecord, registry: Registry | None = None) -> ModelCard:
    """The card of a registered model: the one in its artifact folder (written before it was registered), else
    one built from the registry's record (a model registered before cards existed, or an unreadable artifact)."""
    path = storage.join(record.artifact, CARD_FILE)
    try:
        if storage.exists(path):
            return ModelCard(storage.read_text(path))
    except (OSError, OrchestratorError) as exc:
        logger.warning("card of %s not readable (%s); built from the registry record", record.id, exc)
    return card_from_record(record, registry)


def card_from_record(
    record: ModelRecord,
    registry: Registry | None = None,
    *,
    parent_metrics: Mapping[str, Any] | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> ModelCard:
    """A card built from a registry record (lineage from the registry when given); a quantized model's card passes
    the source model's metrics and its own sections (sizes, latency) here."""
    chain = [r.id for r in registry.ancestors(record.id)][::-1] if registry is not None else [record.id]
    first = registry.get(chain[0]) if registry is not None else record
    base = record.base_model or first.parent_ref
    return build_card(
        name=record.id,
        method=record.method,
        task=(record.config.get("model") or {}).get("task", "sequence-classification"),
        base_model=record.base_model,
        licence=record.licence,
        metrics=record.metrics,
        parent=record.parent,
        teacher=record.teacher_id or record.teacher_ref,
        lineage=[step for step in dict.fromkeys([base, *chain]) if step],
        data=record.data,
        config=record.config,
        parent_metrics=parent_metrics,
        adapter=_is_adapter(record.artifact) if record.artifact else False,
        extra_sections=extra_sections,
    )

"""Checks before a job takes cluster resources: config, model, data and output folder (all problems reported
together), then whether the cluster can ever hold the requested workers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cluster.input_checks import check_input_uris
from orchestrator.cluster.output_paths import check_outputs, run_dir_of, run_folder_of, storage_path_of
from orchestrator.config import JobConfig
from orchestrator.data.encoding import chat_template_issues
from orchestrator.data.sources import PreparedData, prepare_data
from orchestrator.errors import ConfigError, ConfigIssue, DataError, ModelError, OrchestratorError
from orchestrator.lifecycle.licence import check_licence
from orchestrator.lifecycle.run_registration import registry_problem as registry_location_problem
from orchestrator.methods import get_method
from orchestrator.models.loading import inspectable_model_path, read_model_config, resolve_model_path
from orchestrator.tracking import (
    SECRETS_FILE_ENV,
    WANDB_CHECK_TIMEOUT_S,
    load_job_secrets,
    resolve_wandb_mode,
    sync_hint,
    wandb_base_url,
    wandb_key_problem,
    wandb_unreachable,
)

logger = logging.getLogger(__name__)


@dataclass
class Preflight:
    config: JobConfig
    model_path: str
    data: PreparedData
    run_dir: Path  # the local folder the run writes: the run folder, or its scratch when that is a URI
    storage_path: str  # Ray Train's checkpoints: a local path or a URI
    run_folder: str = ""  # <output.dir>/<name>: a local path or a URI (where the outputs are read from)


def preflight(config: JobConfig, *, resume: bool = False, source: str | None = None) -> Preflight:
    """Check everything that can be checked before taking cluster resources; report all problems at once.

    Raises:
        ConfigError: listing every problem (missing model, bad data rows, unwritable output, ...).
    """
    config, issues = check_secrets_and_wandb(config)  # first: the job's secrets file may hold HF_TOKEN too
    if config.model.trust_remote_code:
        logger.warning(
            "model.trust_remote_code is ON: Python code shipped with %s%s will run here and in every worker; "
            "set it only for a model source you trust",
            config.model.path,
            f" and {config.distill.teacher}" if config.distill is not None else "",
        )
    unreadable = check_input_uris(config)  # every input URI probed first (input_checks.py): one issue per field
    issues.extend(unreadable)
    unreadable_fields = {issue.location for issue in unreadable}
    registry_problem = registry_location_problem(config)
    if registry_problem:  # a SQLite file on a bucket: refused now, not after training
        issues.append(ConfigIssue(location="output.registry", message=registry_problem))
    model_path = local_model = ""
    try:
        if not unreadable_fields & {"model.path", "distill.teacher"}:
            model_path = resolve_model_path(config.model.path)
            local_model = inspectable_model_path(model_path)  # on object storage: config and tokenizer, no weights
    except ModelError as exc:
        issues.append(ConfigIssue(location="model.path", message=str(exc).removeprefix("model.path: ")))
    if local_model:
        method_preflight = getattr(get_method(config.method), "preflight", None)
        if method_preflight is not None:
            issues.extend(method_preflight(config, local_model))
        issues.extend(check_max_length(config, model_path))
        issues.extend(check_licence(config, model_path))  # derivatives forbidden or licence unknown
        issues.extend(chat_template_issues(config.data, local_model, trust_remote_code=config.model.trust_remote_code))
    data = None
    try:
        if not any(field.startswith("data.") for field in unreadable_fields):
            data = prepare_data(config.data, config.model.task)
    except DataError as exc:
        issues.append(ConfigIssue(location="data", message=str(exc)))
    if config.deepspeed.config_file and not Path(config.deepspeed.config_file).is_file():
        issues.append(
            ConfigIssue(location="deepspeed.config_file", message=f"{config.deepspeed.config_file} not found")
        )
    issues.extend(check_outputs(config, resume=resume))  # output.dir / output.storage_path, local or URIs
    if issues:
        raise ConfigError(issues, source=source)
    assert data is not None
    return Preflight(config=config, model_path=model_path, data=data, run_dir=run_dir_of(config),
                     storage_path=storage_path_of(config), run_folder=run_folder_of(config))


# Config keys that bound the positions a model embeds: BERT/RoBERTa/Llama/Mistral/Qwen, GPT-2, others.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Learned position tables that number positions from padding_idx + 1 (RoBERTa's 514 rows hold 512 tokens).
_POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
                            "mpnet", "ibert"}


def position_limit(model_config: dict[str, Any]) -> tuple[int, str] | None:
    """The most tokens a model can embed and the config key that says so; None for a model without a limit (no
    such key, or rotary positions with dynamic scaling, which extend past the trained length by design)."""
    model_config = model_config.get("text_config") or model_config  # multimodal configs nest the language model
    for rope_key in ("rope_parameters", "rope_scaling"):  # transformers 5, 4
        rope = model_config.get(rope_key)
        if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "dynamic":
            return None
    for key in _POSITION_KEYS:
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            if model_config.get("model_type") in _POSITIONS_AFTER_PADDING:
                pad = model_config.get("pad_token_id")
                offset = (1 if pad is None else int(pad)) + 1
                return value - offset, f"{key} {value} less the {offset} rows before the first position"
            return value, key
    return None


def check_max_length(config: JobConfig, model_path: str) -> list[ConfigIssue]:
    """``data.max_length`` within the positions of every model that reads the rows: the model, and a teacher.

    A longer limit passes everything else and trains, until a row that long arrives: then the position embedding
    lookup fails in the middle of the run. A model whose config is not at hand (a hub id not downloaded yet) is
    checked when it loads.
    """
    models = [("model.path", model_path)]
    distill = config.distill if config.method == "distill" else None
    if distill is not None:
        try:
            teacher = resolve_model_path(distill.teacher)
        except ModelError:
            teacher = ""  # reported by the method's own preflight
        if distill.student_init == "teacher_layers":
            models = []  # the student is cut from the teacher: model.path only supplies the tokenizer
        if teacher:
            models.append(("distill.teacher", teacher))
    wanted = config.data.max_length
    issues = []
    for field, path in models:
        limit = position_limit(read_model_config(path))
        if limit is not None and wanted > limit[0]:
            issues.append(
                ConfigIssue(
                    location="data.max_length",
                    message=f"{wanted} tokens per row, but the model of {field} ({path}) has positions for "
                    f"{limit[0]} ({limit[1]} in its config.json): a row longer than {limit[0]} tokens would fail "
                    "in the middle of training",
                    hint=f"set data.max_length to {limit[0]} or less",
                )
            )
    return issues


def check_cluster_fits(config: JobConfig) -> bool:
    """Decide use_gpu and fail fast when the cluster can never hold the requested workers.

    Returns:
        Whether workers use GPUs.
    """
    import ray

    total = ray.cluster_resources()
    s = config.scaling
    gpus = total.get("GPU", 0.0)
    use_gpu = gpus > 0 if s.use_gpu == "auto" else bool(s.use_gpu)
    problems = []
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_cpu > total.get("CPU", 0.0):
        problems.append(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPU = {need_cpu:g} CPUs, but the cluster has "
            f"{total.get('CPU', 0):g}; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if use_gpu and s.num_workers * s.gpus_per_worker > gpus:
        problems.append(
            f"scaling: {s.num_workers} workers x {s.gpus_per_worker:g} GPU, but the cluster has {gpus:g} GPUs; "
            "lower scaling.num_workers or set scaling.use_gpu: false"
        )
    for name, amount in s.resources_per_worker.items():
        if s.num_workers * amount > total.get(name, 0.0):
            problems.append(f"scaling.resources_per_worker.{name}: the cluster has {total.get(name, 0):g} in all")
    if config.model.liger_kernel and not use_gpu:
        problems.append(
            "model.liger_kernel: Liger's Triton kernels run on GPU workers only, and this job's workers have none; "
            "set model.liger_kernel: false (or scaling.use_gpu: true on a cluster with GPUs)"
        )
    if problems:
        raise OrchestratorError("the job can never be scheduled on this cluster:\n  - " + "\n  - ".join(problems))
    return use_gpu


def check_secrets_and_wandb(config: JobConfig) -> tuple[JobConfig, list[ConfigIssue]]:
    """The job's secrets file, then W&B, before resources are taken.

    The secrets file the job names (``ORCHESTRATOR_SECRETS_FILE``) is loaded here as in every worker, so this
    driver sees what they will. When W&B would log online: a malformed ``WANDB_API_KEY`` is an error (it can
    never work, and a run that quietly logs offline instead is found out only when its W&B page is missing),
    and a W&B server that does not answer within a few seconds (an air-gapped cluster, an outage) turns the run
    offline with a warning naming ``wandb sync``: a tracker is never a reason not to train.

    Returns:
        The config to run (``tracking.wandb.mode: offline`` after that fallback) and the problems found.
    """
    try:
        load_job_secrets(strict=True)
    except OrchestratorError as exc:
        return config, [ConfigIssue(location=f"{SECRETS_FILE_ENV} (environment)", message=str(exc))]
    wandb_cfg = config.tracking.wandb
    if resolve_wandb_mode(wandb_cfg.mode) != "online":
        return config, []
    key = os.environ.get("WANDB_API_KEY")
    problem = wandb_key_problem(key) if key is not None else None
    if problem:
        return config, [
            ConfigIssue(
                location="WANDB_API_KEY (environment)",
                message=f"{problem.rstrip('.')}; tracking.wandb.mode {wandb_cfg.mode!r} logs to W&B online with it",
                hint="set the key shown at https://wandb.ai/authorize (40+ characters, no quotes or spaces), or "
                "unset WANDB_API_KEY or set tracking.wandb.mode: offline to log locally",
            )
        ]
    base_url = wandb_base_url()
    why = wandb_unreachable(base_url, WANDB_CHECK_TIMEOUT_S)
    if why is None:
        return config, []
    wandb_dir = run_dir_of(config) / "wandb"
    logger.warning(
        "W&B at %s did not answer within %g s (%s): this run logs to W&B offline, in %s; %s",
        base_url, WANDB_CHECK_TIMEOUT_S, why, wandb_dir, sync_hint(wandb_dir),
    )
    config = config.model_copy(deep=True)
    config.tracking.wandb.mode = "offline"
    return config, []

"""The training loop each Ray Train worker runs: one DeepSpeed engine per worker.

Read top to bottom: set up (model, engine, data), resume from the latest Ray checkpoint if there is one,
then step, log, evaluate and checkpoint until the step budget is spent, and export the model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.budget import StepBudget, best_metric_name
from orchestrator.config import JobConfig
from orchestrator.data.readers import (
    Collator,
    PackedCollator,
    PackedReader,
    RowReader,
    eval_batch_indices,
    train_batch_indices,
)
from orchestrator.data.sources import PreparedData
from orchestrator.errors import TrainingError
from orchestrator.methods import MethodContext, get_method
from orchestrator.models.layers import LayerGroups, find_layer_groups
from orchestrator.models.loading import apply_liger_kernel, compile_blocks, load_model, load_tokenizer
from orchestrator.tracking import Tracker
from orchestrator.train.engine import (
    build_deepspeed_config,
    build_optimizer,
    build_scheduler,
    model_width,
    param_groups,
    resolve_precision,
    skip_unused_cpu_comm_op,
)
from orchestrator.train.export import export_hf_folder
from orchestrator.train.reshard import (
    convert_to_universal,
    global_batch_warning,
    needs_universal,
    read_saved_state,
    resume_position,
    weights_l2,
)
from orchestrator.train.unfreezing import (
    BackwardStop,
    GroupLR,
    Schedule,
    freeze_groups,
    groups_frozen_for_run,
    layered_param_groups,
    resolve_schedule,
    trainable_groups,
)
from orchestrator.train.weight_anchor import WeightAnchor

logger = logging.getLogger(__name__)

DS_TAG = "ds"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint so a restart continues exactly here."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    samples_seen: int = 0
    # The topology that wrote the checkpoint, so a resume on another world size can re-shard (train.reshard).
    world_size: int | None = None
    batch_size: int | None = None  # micro-batch per worker
    grad_accumulation: int | None = None
    zero_stage: int | None = None
    total_steps: int | None = None


def _quiet_libraries() -> None:
    """Keep worker logs to what a user needs: our progress lines and real warnings/errors."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("ray.train", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads
    them back (no pickled numpy arrays: a checkpoint file must never run code when loaded)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, float or None): plain types already
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _memory_mb(device: torch.device) -> dict[str, float]:
    """This worker's memory: peak resident set of the process (CPU), or peak allocated CUDA memory."""
    import resource

    values = {"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        values["memory/peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return values


def resident_tensor_mb(device: torch.device) -> float:
    """Memory held by live tensors between steps (no activations then): the model states that the ZeRO paper
    models (parameters, gradients, optimizer moments, fp32 partitions) plus DeepSpeed's flat buffers.

    On GPUs this is the allocator's count. On CPU no allocator keeps one, so the live tensors are found through
    the garbage collector and their storages counted once each (views share a storage); about a second for a
    large process, so it is taken once per run."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - exotic tensor subclasses without a plain storage are skipped
            continue
    return sum(seen.values()) / 2**20


def _stop_requested(stop_signal: Any, rank: int, device: torch.device) -> bool:
    """Whether the sweep stopped this trial. Rank 0 asks; one tiny all-reduce gives every rank the same answer,
    so all of them leave the loop after the same step."""
    import ray

    flag = torch.zeros(1, device=device)
    if rank == 0:
        flag += float(ray.get(stop_signal.is_set.remote()))
    return bool(_all_reduce_sum(flag).item() > 0)


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over workers. NCCL reduces only CUDA tensors, so host tensors (eval totals) go through the GPU there."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            return on_gpu.to(values.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def restrict_logits(logits: torch.Tensor, label_ids: Sequence[int] | None) -> torch.Tensor:
    """Logits with every label outside ``label_ids`` set to -inf, so argmax and softmax see only an eval set's
    own labels (task-incremental evaluation); unchanged when ``label_ids`` is None."""
    if label_ids is None:
        return logits
    mask = torch.full((logits.size(-1),), float("-inf"), dtype=logits.dtype, device=logits.device)
    mask[list(label_ids)] = 0.0
    return logits + mask


def confusion_metrics(confusion: torch.Tensor, label_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction); macro-F1 averages
    over ``label_ids`` (default: every label)."""
    correct = confusion.diag().sum()
    precision = confusion.diag() / confusion.sum(0).clamp(min=1e-12)
    recall = confusion.diag() / confusion.sum(1).clamp(min=1e-12)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    if label_ids is not None:
        f1 = f1[list(label_ids)]
    return {"accuracy": (correct / confusion.sum().clamp(min=1)).item(), "f1_macro": f1.mean().item()}


@torch.no_grad()
def evaluate(
    engine: Any,
    reader: RowReader,
    collator: Collator,
    *,
    task: str,
    num_labels: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    label_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Loss and accuracy/macro-F1 (classification) or perplexity (causal LM) over a whole eval set.

    With ``label_ids`` (the eval set's own labels, see ``data.eval[].labels``) loss, predictions and macro-F1
    are over those labels only: the logits of the others are masked out."""
    engine.eval()
    n = len(reader)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    confusion = torch.zeros(max(num_labels, 1), max(num_labels, 1), dtype=torch.float64)
    # Distillation: the teacher scored on the same batches, side by side (accuracy, agreement, forward speed).
    module = getattr(engine, "module", engine)  # the DeepSpeed engine's model
    teacher_fn = getattr(module, "teacher_logits", None) if task != "causal-lm" else None
    teacher_confusion = torch.zeros_like(confusion)
    agree = torch.zeros(1, dtype=torch.float64)
    forward_s = {"student": 0.0, "teacher": 0.0}
    rows_here = 0
    started = time.perf_counter()
    for indices, weights in eval_batch_indices(n, rank=rank, world_size=world_size, batch_size=batch_size):
        batch = collator([reader.get(int(i)) for i in indices])
        batch = {k: v.to(device) for k, v in batch.items()}
        tick = time.perf_counter()
        outputs = engine(**batch)
        forward_s["student"] += time.perf_counter() - tick
        rows_here += len(indices)
        w = torch.from_numpy(weights).double()
        if task == "causal-lm":
            logits = outputs.logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
            ).view(labels.shape)
            mask = (labels != -100).double().cpu() * w[:, None]
            loss_sum += (token_loss.double().cpu() * mask).sum()
            count += mask.sum()
        else:
            logits = restrict_logits(outputs.logits.float(), label_ids)
            per_row = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").double().cpu()
            loss_sum += (per_row * w).sum()
            count += w.sum()
            predictions = logits.argmax(-1).cpu()
            for truth, pred, weight in zip(batch["labels"].cpu().tolist(), predictions.tolist(), weights.tolist()):
                confusion[truth, pred] += weight
            if teacher_fn is not None:
                tick = time.perf_counter()
                teacher_out = teacher_fn(**batch)
                forward_s["teacher"] += time.perf_counter() - tick
                if teacher_out is None:
                    teacher_fn = None
                    continue
                teacher_pred = restrict_logits(teacher_out.float(), label_ids).argmax(-1).cpu()
                agree += ((teacher_pred == predictions).double() * w).sum()
                for truth, pred, weight in zip(batch["labels"].cpu().tolist(), teacher_pred.tolist(), weights.tolist()):
                    teacher_confusion[truth, pred] += weight
    elapsed = time.perf_counter() - started
    totals = _all_reduce_sum(torch.cat([loss_sum, count, confusion.flatten()]))
    teacher_totals = _all_reduce_sum(torch.cat([agree, teacher_confusion.flatten()])) if teacher_fn else None
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    engine.train()
    metrics = {"loss": loss, "samples_per_s": n / max(elapsed, 1e-9)}
    if task == "causal-lm":
        metrics["perplexity"] = math.exp(min(loss, 50.0))
        return metrics
    metrics.update(confusion_metrics(totals[2:].view(num_labels, num_labels), label_ids))
    if teacher_totals is not None:
        teacher_metrics = confusion_metrics(teacher_totals[1:].view(num_labels, num_labels), label_ids)
        metrics["teacher_accuracy"] = teacher_metrics["accuracy"]
        metrics["agreement"] = (teacher_totals[0] / totals[1].clamp(min=1)).item()
        # Forward passes only (no tokenisation), this worker's share of the set: the inference speed of each.
        metrics["forward_samples_per_s"] = rows_here / max(forward_s["student"], 1e-9)
        metrics["teacher_forward_samples_per_s"] = rows_here / max(forward_s["teacher"], 1e-9)
    return metrics


@dataclass
class Unfreezing:
    """The unfreezing schedule of a run and the hook that stops backward below the trainable groups."""

    groups: LayerGroups
    schedule: Schedule
    stop: BackwardStop

    def log_values(self, step: int) -> dict[str, float]:
        trainable = trainable_groups(self.schedule, step)
        return {"unfreeze/trainable_groups": len(trainable), "unfreeze/lowest_group": min(trainable)}


def build_unfreezing(model: torch.nn.Module, config: JobConfig, budget: StepBudget) -> Unfreezing | None:
    """None for plain runs (every layer at the same LR); else the layer groups, schedule and hook."""
    u = config.unfreeze
    if u.kind == "none" and u.lr_decay == 1.0:
        return None
    groups = find_layer_groups(
        model, block_pattern=u.block_pattern, embedding_patterns=u.embedding_patterns, head_patterns=u.head_patterns
    )
    steps_per_epoch = max(1, budget.batches_per_epoch // config.training.grad_accumulation)
    schedule = resolve_schedule(u, groups.num_blocks, steps_per_epoch=steps_per_epoch)
    return Unfreezing(groups=groups, schedule=schedule, stop=BackwardStop(model, groups, schedule))


def _upload_part_then_fail(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Fault injection (``ORCHESTRATOR_FAULT_POINT=checkpoint_upload``), used as Ray Train's checkpoint upload
    function on rank 0: copy half of this rank's checkpoint files into the run's storage, then fail, like a
    worker lost while writing a checkpoint. Ray Train registers a checkpoint only once every rank has reported
    it, so a resume must never pick this partial folder."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    files = sorted(p for p in Path(checkpoint.path).rglob("*") if p.is_file())
    written = files[: len(files) // 2]
    for path in written:
        target = f"{destination}/{path.relative_to(checkpoint.path).as_posix()}"
        storage.storage_filesystem.create_dir(target.rsplit("/", 1)[0])
        with storage.storage_filesystem.open_output_stream(target) as out:
            out.write(path.read_bytes())
    raise RuntimeError(
        f"injected fault while uploading checkpoint {checkpoint_dir_name} ({len(written)} of {len(files)} files)"
    )


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker (see ``orchestrator.cluster.launcher``)."""
    setup = {"worker_entry": time.time()}  # where start-up time goes, logged with the start record
    import deepspeed
    import ray.train
    import ray.train.torch

    _quiet_libraries()
    setup["imports_done"] = time.time()
    memory_at_start = _memory_mb(torch.device("cpu"))["memory/peak_rss_mb"]  # before the model exists
    config = JobConfig.model_validate(payload["config"])
    data: PreparedData = payload["data"]
    run_dir = Path(payload["run_dir"])
    t = config.training
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    device_type = "cuda" if device.type == "cuda" else "cpu"
    precision = resolve_precision(config.deepspeed.precision, device_type)

    # Same seed on every rank: a new classification head must start identical everywhere.
    _set_seed(t.seed)
    tokenizer = load_tokenizer(payload["model_path"], trust_remote_code=config.model.trust_remote_code)
    model = load_model(
        payload["model_path"],
        task=config.model.task,
        label_names=data.label_names,
        trust_remote_code=config.model.trust_remote_code,
        grow_head=config.model.grow_head,
        attn_implementation=config.model.attn_implementation,
    )
    if config.model.liger_kernel:
        apply_liger_kernel(model, fused_loss_only=config.model.torch_compile)
    if precision == "fp32":
        model.float()  # a checkpoint saved in half precision trains with fp32 weights when no mixed precision runs
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    method = get_method(config.method)
    model = method.prepare_model(model, config, MethodContext(model_path=payload["model_path"], device=device,
                                                              precision=precision, world_size=world_size))

    setup["model_ready"] = time.time()
    checkpoint = ray.train.get_checkpoint()
    # A PBT sweep trial may continue another trial's model and optimizer moments with its own hyperparameters.
    inherited = checkpoint is None and bool(payload.get("init_checkpoint"))
    if inherited:
        checkpoint = ray.train.Checkpoint(payload["init_checkpoint"])
    # A checkpoint written by another number of workers is re-sharded on load (orchestrator.train.reshard explains how);
    # its state is read first because the engine must be built for that.
    saved = read_saved_state(checkpoint, STATE_FILE) if checkpoint is not None else None
    new_world_size = saved is not None and saved.get("world_size") not in (None, world_size)
    universal = needs_universal(saved, world_size=world_size)
    # Readers before the step budget: with data.packing an example is a packed block, counted once tokenized.
    if config.data.packing:
        collator: Any = PackedCollator()
        packed = {"block_size": config.data.max_length, "cache_dir": payload.get("cache_dir")}
        train_reader: Any = PackedReader(data.train, tokenizer, **packed)
        eval_readers: list[Any] = [PackedReader(e, tokenizer, **packed) for e in data.evals]
    else:
        collator = Collator(tokenizer, task=config.model.task, max_length=config.data.max_length)
        train_reader = RowReader(data.train)
        eval_readers = [RowReader(e) for e in data.evals]
    budget = StepBudget.for_job(config, len(train_reader), world_size)
    if new_world_size and saved.get("total_steps"):
        budget = replace(budget, total_steps=saved["total_steps"])  # the restored LR schedule counts to it
    unfreezing = build_unfreezing(model, config, budget)
    frozen_for_run: frozenset[int] = frozenset()
    if unfreezing is None:
        groups = param_groups(model, t.weight_decay)
        optimizer = build_optimizer(groups, config, device_type=device_type)
        scheduler = build_scheduler(optimizer, config, budget.total_steps)
    else:
        # Groups this run never trains leave the optimizer; the others stay in it at LR 0 until their step
        # (orchestrator.train.unfreezing explains the two tiers).
        frozen_for_run = groups_frozen_for_run(unfreezing.schedule, budget.total_steps)
        freeze_groups(model, unfreezing.groups, frozen_for_run)
        groups = layered_param_groups(model, unfreezing.groups, t.weight_decay)
        optimizer = build_optimizer(groups, config, device_type=device_type)
        scheduler = build_scheduler(
            optimizer,
            config,
            budget.total_steps,
            wrap=lambda base, group: GroupLR(base, unfreezing.schedule, group["layer_group"]),
        )
    ds_config = build_deepspeed_config(config, world_size=world_size, precision=precision,
                                       hidden_size=model_width(model))
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    skip_unused_cpu_comm_op(ds_config, device_type=device_type)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # One worker has nothing to average: skip DeepSpeed's flatten + all-reduce + unflatten of every gradient
        # after each backward (its saving is below what the 2-CPU overhead benchmark can resolve).
        engine.enable_backward_allreduce = False
    if config.model.torch_compile and config.model.liger_kernel:
        compile_blocks(engine.module)  # not the whole model: see compile_blocks
    elif config.model.torch_compile:
        engine.compile()  # in place (nn.Module.compile): parameter names, checkpoints and export are unchanged
    setup["engine_ready"] = time.time()
    # Optional L2 pull toward the starting weights (continual retraining); taken before any checkpoint load.
    anchor = WeightAnchor.capture(engine.module, config.regularization.l2_to_start)

    state = TrainState()
    resharded: dict[str, Any] = {}
    if checkpoint is not None:
        own_settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        with checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory(prefix="orch-universal-") as scratch:
            load_dir = convert_to_universal(ckpt_dir, DS_TAG, scratch) if universal else ckpt_dir
            engine.load_checkpoint(
                load_dir, tag=DS_TAG, load_module_strict=False, load_lr_scheduler_states=not inherited
            )
            state = TrainState(**json.loads((Path(ckpt_dir) / STATE_FILE).read_text()))
            rng_file = Path(ckpt_dir) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                try:
                    rng = torch.load(rng_file, weights_only=True)  # tensors and plain values only
                except Exception as exc:  # written by an older version (numpy arrays): never unpickled
                    logger.warning("not restoring RNG state from %s (%s); continuing with fresh RNG", rng_file, exc)
                else:
                    _restore_rng(rng)
        if inherited:
            for group, settings in zip(optimizer.param_groups, own_settings):
                group.update(settings)  # this trial's lr, weight decay and betas, not the donor's
            scheduler.last_epoch = state.step - 1
            scheduler.step()  # this trial's schedule, at the donor's step
        if new_world_size or (state.batch_size or t.batch_size_per_worker) != t.batch_size_per_worker:
            position = resume_position(
                state.batch_in_epoch,
                old_world_size=state.world_size or world_size,
                old_batch_size=state.batch_size or t.batch_size_per_worker,
                world_size=world_size,
                batch_size=t.batch_size_per_worker,
            )
            resharded = {
                "resume/old_world_size": state.world_size,
                "resume/old_batch_in_epoch": state.batch_in_epoch,
                "resume/batch_in_epoch": position.batch_in_epoch,
                "resume/skipped_rows": position.skipped_rows,
                "resume/universal_checkpoint": universal,
                "resume/weights_l2": weights_l2(engine),  # to check the re-sharded weights against the checkpoint
            }
            state.batch_in_epoch = position.batch_in_epoch
            warning = global_batch_warning(
                saved, world_size=world_size, batch_size=t.batch_size_per_worker, grad_accumulation=t.grad_accumulation
            )
            if warning:
                resharded["resume/warning"] = warning
                if rank == 0:
                    logger.warning(warning)
    # Every checkpoint records the topology that wrote it.
    state.world_size, state.batch_size = world_size, t.batch_size_per_worker
    state.grad_accumulation, state.zero_stage = t.grad_accumulation, engine.zero_optimization_stage()
    state.total_steps = budget.total_steps

    metric_name, metric_mode = best_metric_name(config, data)
    # Which Ray node each rank runs on, in the start record (placement checks, multi-node debugging).
    worker_nodes: list[Any] = [ray.get_runtime_context().get_node_id()]
    if dist.is_available() and dist.is_initialized():
        worker_nodes = [None] * world_size
        dist.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    tracker = Tracker(config, run_dir, enabled=rank == 0)
    if rank == 0:
        # ZeRO-3 leaves each parameter empty on the module; ds_numel is its full size.
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        tracker.log(
            "start",
            state.step,
            {
                "total_steps": budget.total_steps,
                "resumed_from_step": state.step if checkpoint is not None else None,
                "world_size": world_size,
                "worker_nodes": worker_nodes,
                "precision": precision,
                "params_total": total,
                "params_trainable": trainable,  # groups frozen for the whole run excluded
                **({"unfreeze/groups_frozen_for_run": sorted(frozen_for_run)} if unfreezing is not None else {}),
                "memory/rss_before_model_mb": memory_at_start,
                **resharded,
                "torch_threads": torch.get_num_threads(),
                **{f"setup/{k}": v for k, v in setup.items()},
                "data": data.summary(),
            },
        )
    num_labels = len(data.label_names)

    def run_eval() -> dict[str, float]:
        metrics: dict[str, float] = {}
        for reader in eval_readers:
            values = evaluate(
                engine,
                reader,
                collator,
                task=config.model.task,
                num_labels=num_labels,
                batch_size=t.eval_batch_size,
                rank=rank,
                world_size=world_size,
                device=device,
                label_ids=reader.scanned.label_subset,
            )
            metrics.update({f"{reader.scanned.name}/{k}": v for k, v in values.items()})
        return metrics

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        """Every rank writes its DeepSpeed shards to a local folder and hands it to Ray Train, which
        merges all ranks' files into one checkpoint folder in storage. Ray registers the folder only once every
        rank has reported (a crash mid-write leaves an unregistered folder that no resume picks) and then keeps
        the latest or best N (output.keep_checkpoints_by) plus, always, the latest."""
        with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=True)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(asdict(state)))
            upload = _upload_part_then_fail if rank == 0 and fault_due("checkpoint_upload") else None
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_fn=upload)

    def export(name: str, metrics: dict[str, Any]) -> None:
        export_hf_folder(
            engine,
            tokenizer=tokenizer,
            config=config,
            destination=run_dir / name,
            metrics={"step": state.step, **metrics},
            label_names=data.label_names,
            is_rank0=rank == 0,
            method=method,
        )

    fault_at_step = payload.get("fault_at_step")
    fault_point = payload.get("fault_point", "after_checkpoint")

    def fault_due(point: str) -> bool:
        """Fault injection for drills and tests: fail once, at the first checkpoint at or past the step (never
        again after resuming from a checkpoint)."""
        return (
            fault_point == point and fault_at_step is not None and state.step >= fault_at_step and checkpoint is None
        )

    stop_signal = payload.get("stop_signal")  # sweeps: an actor whose is_set() turns true when Tune stops the trial
    engine.train()
    window_loss, window_batches, window_samples, window_tokens = 0.0, 0, 0, 0
    window_extra: dict[str, float] = {}
    once: dict[str, float] = {}  # values logged with the next train record only
    window_start = time.perf_counter()
    micro_in_step = 0
    finished = state.step >= budget.total_steps
    while not finished:
        batches = train_batch_indices(
            len(train_reader),
            epoch=state.epoch,
            seed=t.seed,
            shuffle=config.data.shuffle,
            rank=rank,
            world_size=world_size,
            batch_size=t.batch_size_per_worker,
        )
        for batch_indices in batches[state.batch_in_epoch :]:
            if unfreezing is not None:
                unfreezing.stop.update(state.step)
            batch = collator([train_reader.get(int(i)) for i in batch_indices])
            # Real (non-padding) tokens, counted on the host before the copy so no device sync is added.
            mask = batch.get("attention_mask")
            window_tokens += (int(mask.sum()) if mask is not None else batch["input_ids"].numel()) * world_size
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            output = method.compute_loss(engine, batch)
            if anchor is not None:
                output = anchor.add_to(output)
            loss_value = output.loss.detach().float().item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at step {state.step + 1} (epoch {state.epoch}, batch "
                    f"{state.batch_in_epoch}); lower training.lr, enable training.max_grad_norm, or check the data"
                )
            engine.backward(output.loss)
            engine.step()
            state.batch_in_epoch += 1
            state.samples_seen += len(batch_indices) * world_size
            for key, value in (output.extra or {}).items():
                window_extra[key] = window_extra.get(key, 0.0) + value
            window_loss += loss_value
            window_batches += 1
            window_samples += len(batch_indices) * world_size
            micro_in_step += 1
            if micro_in_step < t.grad_accumulation:
                continue
            micro_in_step = 0
            state.step += 1
            if state.step == 1:  # once, after the first step: the optimizer state exists from then on
                once["memory/resident_tensors_mb"] = resident_tensor_mb(device)
            last = state.step >= budget.total_steps
            if state.step % t.log_every_steps == 0 or last:
                elapsed = time.perf_counter() - window_start
                tracker.log(
                    "train",
                    state.step,
                    {
                        "train/loss": window_loss / max(window_batches, 1),
                        **{f"train/{k}": v / max(window_batches, 1) for k, v in window_extra.items()},
                        "train/lr": engine.get_lr()[0],
                        "train/samples_per_s": window_samples / max(elapsed, 1e-9),
                        "train/tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "train/epoch": state.epoch + state.batch_in_epoch / budget.batches_per_epoch,
                        "total_steps": budget.total_steps,
                        **(unfreezing.log_values(state.step - 1) if unfreezing is not None else {}),
                        **_memory_mb(device),
                        **once,
                    },
                )
                window_loss, window_batches, window_samples, window_tokens = 0.0, 0, 0, 0
                window_extra.clear()
                once.clear()
                window_start = time.perf_counter()
            do_eval = bool(data.evals) and (last or (t.eval_every_steps and state.step % t.eval_every_steps == 0))
            do_ckpt = last or (t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0)
            metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
            if do_eval:
                metrics.update(run_eval())
                tracker.log("eval", state.step, metrics)
                if metric_name is not None and metric_name in metrics:
                    value = metrics[metric_name]
                    better = state.best_metric is None or (
                        value > state.best_metric if metric_mode == "max" else value < state.best_metric
                    )
                    if better:
                        state.best_metric, state.best_step = value, state.step
                        if config.output.save_best:
                            export("best", metrics)
            if last and config.output.save_final:
                export("final", metrics)
            if do_ckpt:
                if last:
                    metrics.update(best_metric=state.best_metric, best_step=state.best_step, done=True)
                    tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                    if stop_signal is not None:  # a sweep trial (a PBT trial may have been stopped before)
                        tracker.summary({"sweep/status": "completed", "sweep/steps": state.step})
                save_checkpoint(metrics)
                if fault_due("after_checkpoint"):
                    raise RuntimeError(f"injected fault after the checkpoint at step {state.step}")
            elif do_eval:
                ray.train.report(metrics)
            if last:
                finished = True
                break
            if stop_signal is not None and _stop_requested(stop_signal, rank, device):
                # A sweep trial that Ray Tune stopped (ASHA, a stopper, PBT): end here, W&B run closed cleanly.
                tracker.summary({"sweep/status": "early_stopped", "sweep/steps": state.step})
                finished = True
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    train_reader.close()
    for reader in eval_readers:
        reader.close()
    tracker.finish()
    if dist.is_initialized():
        dist.barrier()

"""The recipe each Ray Train worker runs: one :class:`TrainRecipe` per run and worker, with named phases.

Read top to bottom, as :meth:`TrainRecipe.run` calls them: ``setup`` (model, method, data, engine, callbacks),
``restore`` (the latest Ray checkpoint, if any, possibly written by another number of workers), ``train`` (the
step loop: a micro-batch at a time, ``evaluate``, ``checkpoint`` and ``export`` at their steps), ``cleanup``.
Everything that hooks into steps is a callback (``orchestrator.train.callbacks``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.budget import StepBudget, best_metric_name
from orchestrator.config import JobConfig
from orchestrator.data.batching import (
    PackedExamples,
    PackingCollator,
    PaddingCollator,
    attention_kind,
    pad_token_id,
    real_tokens,
)
from orchestrator.data.encoding import data_template_text
from orchestrator.data.readers import train_batch_indices
from orchestrator.data.sources import PreparedData
from orchestrator.data.token_cache import open_token_cache
from orchestrator.errors import TrainingError
from orchestrator.methods import MethodContext, TrainBatchOutput, get_method
from orchestrator.models.loading import apply_liger_kernel, compile_blocks, fetch_model, load_model, load_tokenizer
from orchestrator.precision import torch_dtype
from orchestrator.run_outputs import evict_published_exports, remote_child, scratch_dir
from orchestrator.storage import is_uri
from orchestrator.tracking import Tracker
from orchestrator.train.best_snapshot import BestSnapshot
from orchestrator.train.callbacks import (
    Callback,
    Callbacks,
    DonorHyperparameters,
    Event,
    FreshAdamOnUnfreeze,
    MemoryLog,
    NonFiniteLossGuard,
    StopRun,
    ThroughputLog,
    TuneStopSignal,
    UnfreezeSchedule,
    WeightAnchorLoss,
)
from orchestrator.train.checkpointing import STATE_FILE, TrainState, checkpoint_at, load_checkpoint, save_checkpoint
from orchestrator.train.engine import (
    build_deepspeed_config,
    build_optimizer,
    build_scheduler,
    model_width,
    param_groups,
    resolve_precision,
    skip_unused_cpu_comm_op,
)
from orchestrator.train.evaluation import all_reduce_sum, evaluate
from orchestrator.train.export import export_hf_folder
from orchestrator.train.generation import GenerationEval
from orchestrator.train.memory import memory_mb
from orchestrator.train.reshard import (
    global_batch_warning,
    needs_universal,
    read_saved_state,
    resume_position,
    weights_l2,
)
from orchestrator.train.start_eval import compare_with_start, score_start
from orchestrator.train.unfreezing import (
    GroupLR,
    Unfreezing,
    build_unfreezing,
    freeze_groups,
    groups_frozen_for_run,
    layered_param_groups,
)
from orchestrator.train.weight_anchor import WeightAnchor
from orchestrator.train.worker_env import log_start, quiet_libraries, set_seed

logger = logging.getLogger(__name__)



@dataclass
class MicroBatch:
    """What the last micro-batch contributed, for the callbacks that count (``Event.AFTER_MICRO_BATCH``)."""

    loss: torch.Tensor | float = 0.0  # this worker's loss, on the device (read back only where a step logs)
    samples: int = 0  # over all workers
    tokens: int = 0  # real (non-padding) tokens, over all workers
    extra: dict[str, float] = field(default_factory=dict)


class TrainRecipe:
    """One run on one worker. Build it from the launcher's payload, then :meth:`run` it.

    Args:
        payload: what the launcher sends every worker (``orchestrator.cluster.launcher.build_trainer``): the job
            config as a dict, the scanned data, the resolved model path, the run folder, and for sweeps the stop
            signal and the checkpoint a PBT trial continues.
        callbacks: extra callbacks after the built-in ones (default: the payload's ``callbacks``, which
            ``run_training(..., worker_callbacks=...)`` fills; tests register fault injection there).
    """

    def __init__(self, payload: dict[str, Any], callbacks: list[Callback] | None = None):
        self.setup_times = {"worker_entry": time.time()}  # where start-up time goes, logged with the start record
        self.payload = payload
        self.extra_callbacks = list(payload.get("callbacks") or []) if callbacks is None else list(callbacks)
        self.config = JobConfig.model_validate(payload["config"])
        self.data: PreparedData = payload["data"]
        self.run_folder: str = payload["run_dir"]  # a URI when output.dir is one (orchestrator.run_outputs)
        self.run_dir = scratch_dir(self.run_folder, scratch_root=payload.get("scratch_root"))  # written locally
        self.model_path: str = payload["model_path"]
        self.state = TrainState()
        self.output: TrainBatchOutput | None = None  # the current micro-batch's loss (callbacks may replace it)
        self.micro_batch = MicroBatch()
        self.checkpoint_upload_fn: Any = None  # set by callbacks before a checkpoint (BEFORE_CHECKPOINT)
        self.finished = False
        self.best_snapshot: BestSnapshot | None = None
        self.generation: GenerationEval | None = None  # eval sets scored by generation, built at the first eval

    def run(self) -> TrainingError | None:
        """Set up, restore, train, clean up. Returns the error training stopped on without failing the workers (a
        non-finite loss: ``callbacks.StopRun``, raised on every rank at the same step), for the driver to raise."""
        self.setup()
        self.restore()
        try:
            self.train()
        except StopRun as stop:  # not a worker failure: Ray Train must not restart into the same loss
            self.cleanup()
            return stop.error
        self.cleanup()
        return None

    # ----------------------------------------------------------------------------------------------- set up
    def setup(self) -> None:
        """Worker, model, data, engine and callbacks, in the order each needs the one before."""
        self._setup_worker()
        self._setup_model()
        self._setup_data()
        self._setup_engine()
        self._setup_callbacks()

    def _setup_worker(self) -> None:
        import ray.train
        import ray.train.torch

        quiet_libraries()
        self.setup_times["imports_done"] = time.time()
        self.memory_at_start = memory_mb(torch.device("cpu"))["memory/peak_rss_mb"]  # before the model exists
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = ray.train.torch.get_device()
        self.device_type = "cuda" if self.device.type == "cuda" else "cpu"
        self.precision = resolve_precision(self.config.deepspeed.precision, self.device_type)
        # Same seed on every rank: a new classification head must start identical everywhere.
        set_seed(self.config.training.seed)

    def _setup_model(self) -> None:
        """Tokenizer, pretrained model (partitioned across the workers from the start under ZeRO-3), method."""
        m = self.config.model
        self._fetch_model_once_per_node()
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=m.trust_remote_code)
        if self.config.data.chat_template is not None:  # saved with the exports: predict renders chats with it
            self.tokenizer.chat_template = data_template_text(self.config.data)
        zero3_config = self._zero3_load_config()
        model = load_model(
            self.model_path,
            task=m.task,
            label_names=self.data.label_names,
            trust_remote_code=m.trust_remote_code,
            grow_head=m.grow_head,
            attn_implementation=m.attn_implementation,
            dtype=torch_dtype(self.precision),  # a half-precision checkpoint trains in fp32 when no mixed precision
            zero3_config=zero3_config,
        )
        # Under ZeRO-3 every parameter is partitioned from construction on (the start record shows the share).
        self.partitioned_at_load = sum(hasattr(p, "ds_id") for p in model.parameters()) / max(
            1, sum(1 for _ in model.parameters()))
        if m.liger_kernel:
            apply_liger_kernel(model, fused_loss_only=m.torch_compile)
        if m.gradient_checkpointing:
            # Non-reentrant checkpointing, explicitly: the reentrant kind drops the gradients of inputs that do not
            # require grad (frozen embeddings under unfreezing or LoRA) and does not work with ZeRO-3's hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.method = get_method(self.config.method)
        context = MethodContext(
            model_path=self.model_path, device=self.device, precision=self.precision, world_size=self.world_size
        )
        self.model = self.method.prepare_model(model, self.config, context)
        self.setup_times["model_ready"] = time.time()

    def _fetch_model_once_per_node(self) -> None:
        """A hub id is downloaded by the node's local rank 0 while its other ranks wait, then read from the cache
        by all: no rank loads from the network, and a node downloads it once."""
        if Path(self.model_path).is_dir():
            return
        if self.local_rank == 0:
            self.model_path = fetch_model(self.model_path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self.local_rank != 0:
            self.model_path = fetch_model(self.model_path, cached_only=True)

    def _zero3_load_config(self) -> dict[str, Any] | None:
        """The DeepSpeed config the model is built partitioned with under ZeRO-3 (None below stage 3). The engine
        gets its own config later, sized from the prepared model; stage and precision are the same."""
        ds_config = build_deepspeed_config(self.config, world_size=self.world_size, precision=self.precision)
        skip_unused_cpu_comm_op(ds_config, device_type=self.device_type)  # zero.Init would build it too
        return ds_config if ds_config["zero_optimization"].get("stage") == 3 else None

    def _setup_data(self) -> None:
        """The checkpoint to start from, readers, and the step budget (which needs both)."""
        self._find_checkpoint()
        self._setup_readers()

    def _find_checkpoint(self) -> None:
        """Ray Train's latest checkpoint of the run, or the one a PBT trial continues; what topology wrote it."""
        import ray.train

        self.start_checkpoint = ray.train.get_checkpoint()
        # A PBT sweep trial may continue another trial's model and optimizer moments with its own hyperparameters.
        self.inherited = self.start_checkpoint is None and bool(self.payload.get("init_checkpoint"))
        if self.inherited:
            self.start_checkpoint = checkpoint_at(self.payload["init_checkpoint"])
        # A checkpoint written by another number of workers is re-sharded on load (orchestrator.train.reshard explains
        # how); its state is read first because the engine must be built for that.
        self.saved = read_saved_state(self.start_checkpoint, STATE_FILE) if self.start_checkpoint is not None else None
        self.new_world_size = self.saved is not None and self.saved.get("world_size") not in (None, self.world_size)
        self.universal = needs_universal(self.saved, world_size=self.world_size)

    def _setup_readers(self) -> None:
        """Token caches (orchestrator.data.token_cache: built once per node by its local rank 0, memory-mapped by
        every rank), the collator, then the step budget (a resume on another world size keeps the saved one)."""
        # Examples before the step budget: with data.packing an example is a packed block, counted once tokenized.
        d, task = self.config.data, self.config.model.task
        caches = [
            open_token_cache(source, scanned, d, self.tokenizer, task=task, builder=self.local_rank == 0,
                             cache_dir=self.payload.get("cache_dir"))
            for source, scanned in [(d.train, self.data.train), *zip(d.eval, self.data.evals)]
        ]
        # Rows the encoders dropped (on_bad_rows: skip) are counted in the copies of the scans the caches hold.
        self.data = replace(self.data, train=caches[0].scanned, evals=[c.scanned for c in caches[1:]])
        pad_id = pad_token_id(self.tokenizer)
        readers: list[Any] = caches
        if d.packing:
            self.collator: Any = PackingCollator(pad_id, attention=attention_kind(self.model), block_size=d.max_length)
            readers = [PackedExamples(c, block_size=d.max_length) for c in caches]
        else:
            self.collator = PaddingCollator(pad_id, task=task)
        self.train_reader: Any = readers[0]
        self.eval_readers: list[Any] = readers[1:]
        self.setup_times["data_ready"] = time.time()
        budget = StepBudget.for_job(self.config, len(self.train_reader), self.world_size)
        if self.new_world_size and self.saved.get("total_steps"):
            budget = replace(budget, total_steps=self.saved["total_steps"])  # the restored LR schedule counts to it
        self.budget = budget

    def _setup_engine(self) -> None:
        """Optimizer (layer groups and their LR schedules when unfreezing), LR schedule, DeepSpeed engine."""
        import deepspeed

        config, t = self.config, self.config.training
        self.unfreezing = build_unfreezing(self.model, config, self.budget)
        self.frozen_for_run: frozenset[int] = frozenset()
        if self.unfreezing is None:
            groups = param_groups(self.model, t.weight_decay)
            self.optimizer = build_optimizer(groups, config, device_type=self.device_type)
            self.scheduler = build_scheduler(self.optimizer, config, self.budget.total_steps)
        else:
            self._unfreezing_optimizer(self.unfreezing)
        ds_config = build_deepspeed_config(
            config, world_size=self.world_size, precision=self.precision, hidden_size=model_width(self.model)
        )
        if self.universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        skip_unused_cpu_comm_op(ds_config, device_type=self.device_type)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config,
            dist_init_required=False,
        )
        if self.world_size == 1 and self.engine.zero_optimization_stage() == 0:
            # One worker has nothing to average: skip DeepSpeed's flatten + all-reduce + unflatten of every gradient
            # after each backward (its saving is below what the 2-CPU overhead benchmark can resolve).
            self.engine.enable_backward_allreduce = False
        if config.model.torch_compile and config.model.liger_kernel:
            compile_blocks(self.engine.module)  # not the whole model: see compile_blocks
        elif config.model.torch_compile:
            self.engine.compile()  # in place (nn.Module.compile): parameter names, checkpoints and export unchanged
        self.setup_times["engine_ready"] = time.time()

    def _unfreezing_optimizer(self, unfreezing: Unfreezing) -> None:
        """Groups this run never trains leave the optimizer; the others stay in it at LR 0 until their step
        (orchestrator.train.unfreezing explains the two tiers)."""
        t = self.config.training
        self.frozen_for_run = groups_frozen_for_run(unfreezing.schedule, self.budget.total_steps)
        freeze_groups(self.model, unfreezing.groups, self.frozen_for_run)
        groups = layered_param_groups(self.model, unfreezing.groups, t.weight_decay)
        self.optimizer = build_optimizer(groups, self.config, device_type=self.device_type)
        self.scheduler = build_scheduler(
            self.optimizer,
            self.config,
            self.budget.total_steps,
            wrap=lambda base, group: GroupLR(base, unfreezing.schedule, group["layer_group"]),
        )

    def _setup_callbacks(self) -> None:
        """The built-in callbacks this run needs, then the extra ones, in the order their log values appear."""
        t = self.config.training
        guard = NonFiniteLossGuard(  # first: its step_end check comes before anything else of a step's end
            log_every=t.log_every_steps,
            eval_every=t.eval_every_steps if self.data.evals else None,
            checkpoint_every=t.checkpoint_every_steps,
        )
        callbacks: list[Callback] = [guard, ThroughputLog()]
        if self.unfreezing is not None:
            callbacks.append(UnfreezeSchedule(self.unfreezing))
            callbacks.append(FreshAdamOnUnfreeze(self.unfreezing.schedule, self.optimizer))
        callbacks.append(MemoryLog())
        # Optional L2 pull toward the starting weights (continual retraining); taken before any checkpoint load.
        anchor = WeightAnchor.capture(self.engine.module, self.config.regularization.l2_to_start)
        if anchor is not None:
            callbacks.append(WeightAnchorLoss(anchor))
        if self.inherited:
            callbacks.append(DonorHyperparameters(self.optimizer, self.scheduler))
        self.stop_signal = self.payload.get("stop_signal")  # sweeps: set when Ray Tune stops the trial
        if self.stop_signal is not None:
            callbacks.append(TuneStopSignal(self.stop_signal))
        self.callbacks = Callbacks(callbacks + self.extra_callbacks)

    # ---------------------------------------------------------------------------------------------- restore
    @property
    def started_from_checkpoint(self) -> bool:
        """Whether this attempt loaded a checkpoint (a restart, ``--resume``, or a PBT trial's donor)."""
        return self.start_checkpoint is not None

    def restore(self) -> None:
        """Load the checkpoint, if any, re-shard the loop position for a new topology, and open the tracker."""
        self.resharded: dict[str, Any] = {}
        if self.start_checkpoint is not None:
            self.state, converted = load_checkpoint(
                self.engine, self.start_checkpoint, rank=self.rank, local_rank=self.local_rank,
                universal=self.universal, load_lr_scheduler=not self.inherited,
            )
            self.universal_conversions = int(all_reduce_sum(torch.tensor([float(converted)])).item())
            self.callbacks.fire(Event.AFTER_RESTORE, self)
            t = self.config.training
            if self.new_world_size or (self.state.batch_size or t.batch_size_per_worker) != t.batch_size_per_worker:
                self._reshard_position()
        # Every checkpoint records the topology that wrote it.
        t, state = self.config.training, self.state
        state.world_size, state.batch_size = self.world_size, t.batch_size_per_worker
        state.grad_accumulation, state.zero_stage = t.grad_accumulation, self.engine.zero_optimization_stage()
        state.total_steps = self.budget.total_steps
        self.metric_name, self.metric_mode = best_metric_name(self.config, self.data)
        self.tracker = Tracker(self.config, self.run_dir, enabled=self.rank == 0,
                               publish_to=self.run_folder if is_uri(self.run_folder) else None)

    def _reshard_position(self) -> None:
        """The resume position in rows of a checkpoint written by another world size or batch size."""
        t, state = self.config.training, self.state
        position = resume_position(
            state.batch_in_epoch,
            old_world_size=state.world_size or self.world_size,
            old_batch_size=state.batch_size or t.batch_size_per_worker,
            world_size=self.world_size,
            batch_size=t.batch_size_per_worker,
        )
        self.resharded = {
            "resume/old_world_size": state.world_size,
            "resume/old_batch_in_epoch": state.batch_in_epoch,
            "resume/batch_in_epoch": position.batch_in_epoch,
            "resume/skipped_rows": position.skipped_rows,
            "resume/universal_checkpoint": self.universal,
            "resume/universal_conversions": self.universal_conversions,  # one per node, not one per rank
            "resume/weights_l2": weights_l2(self.engine),  # to check the re-sharded weights against the checkpoint
        }
        state.batch_in_epoch = position.batch_in_epoch
        warning = global_batch_warning(
            self.saved, world_size=self.world_size, batch_size=t.batch_size_per_worker,
            grad_accumulation=t.grad_accumulation,
        )
        if warning:
            self.resharded["resume/warning"] = warning
            if self.rank == 0:
                logger.warning(warning)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """The step loop: micro-batches in the seeded order of each epoch until the budget is spent or stopped."""
        log_start(self)
        score_start(self)
        self.callbacks.fire(Event.FIT_START, self)
        self.engine.train()
        self.finished = self.state.step >= self.budget.total_steps
        micro_in_step = 0
        while not self.finished:
            for batch_indices in self._epoch_batches()[self.state.batch_in_epoch :]:
                self._train_micro_batch(batch_indices)
                micro_in_step += 1
                if micro_in_step < self.config.training.grad_accumulation:
                    continue
                micro_in_step = 0
                self._end_step()
                if self.finished:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        self.export_best()

    def request_stop(self) -> None:
        """End the loop after the current step (callbacks call this at ``Event.STEP_REPORTED``)."""
        self.finished = True

    def _epoch_batches(self) -> list[Any]:
        t = self.config.training
        return train_batch_indices(
            len(self.train_reader), epoch=self.state.epoch, seed=t.seed, shuffle=self.config.data.shuffle,
            rank=self.rank, world_size=self.world_size, batch_size=t.batch_size_per_worker,
        )

    def _train_micro_batch(self, batch_indices: Any) -> None:
        """Forward, loss, backward and engine step of one micro-batch (DeepSpeed steps the optimizer at the end
        of each gradient-accumulation window)."""
        state = self.state
        batch = self.collator([self.train_reader.get(int(i)) for i in batch_indices])
        # Real (non-padding) tokens, counted on the host before the copy so no device sync is added.
        tokens = real_tokens(batch) * self.world_size
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.callbacks.fire(Event.BEFORE_FORWARD, self)
        self.output = self.method.compute_loss(self.engine, batch)
        self.callbacks.fire(Event.AFTER_LOSS, self)
        # On the device: NonFiniteLossGuard checks it and ThroughputLog sums it there (no sync per micro-batch).
        loss_value = self.output.loss.detach().float()
        self.engine.backward(self.output.loss)
        self.engine.step()
        samples = len(batch_indices) * self.world_size
        state.batch_in_epoch += 1
        state.samples_seen += samples
        extra = dict(self.output.extra or {})
        self.micro_batch = MicroBatch(loss=loss_value, samples=samples, tokens=tokens, extra=extra)
        self.callbacks.fire(Event.AFTER_MICRO_BATCH, self)

    def _end_step(self) -> None:
        """After an optimizer step: log, evaluate, export and checkpoint at their steps; stop if asked to."""
        t, state = self.config.training, self.state
        state.step += 1
        self.callbacks.fire(Event.STEP_END, self)
        last = state.step >= self.budget.total_steps
        if state.step % t.log_every_steps == 0 or last:
            self.tracker.log("train", state.step, self.callbacks.log_values(self))
        do_eval = bool(self.data.evals) and (last or (t.eval_every_steps and state.step % t.eval_every_steps == 0))
        do_ckpt = last or (t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0)
        metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
        if do_eval:
            metrics.update(self.evaluate())
            self.tracker.log("eval", state.step, metrics)
            self._keep_best(metrics)
        if last and self.config.output.save_final:
            self.export("final", metrics)
        if last and do_eval:
            compare_with_start(self, metrics)
        if do_ckpt:
            if last:
                metrics.update(best_metric=state.best_metric, best_step=state.best_step, done=True)
                self.tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                self.callbacks.fire(Event.FINAL_METRICS, self)
            self.checkpoint(metrics)
        elif do_eval:
            import ray.train

            ray.train.report(metrics)
        if do_eval or do_ckpt:
            self.tracker.publish()  # a URI run folder gets the records up to here
        if last:
            self.finished = True
            return
        self.callbacks.fire(Event.STEP_REPORTED, self)

    def _keep_best(self, metrics: dict[str, Any]) -> None:
        """Track the best value of the run's metric; at each improvement each rank keeps its share of the weights
        (output.save_best), for the one ``best/`` export after the last step (orchestrator.train.best_snapshot)."""
        if self.metric_name is None or self.metric_name not in metrics:
            return
        value, best = metrics[self.metric_name], self.state.best_metric
        if best is None or (value > best if self.metric_mode == "max" else value < best):
            self.state.best_metric, self.state.best_step = value, self.state.step
            if self.config.output.save_best:
                if self.best_snapshot is None:
                    self.best_snapshot = BestSnapshot(self.engine.module, rank=self.rank, world_size=self.world_size)
                self.best_snapshot.take(self.state.step, metrics)

    def export_best(self) -> None:
        """``best/`` from the snapshot of the best evaluation, once training is over (final weights exported and
        checkpointed already). A restart after the best step lost its snapshot: then it says so."""
        if self.best_snapshot is not None and self.best_snapshot.step is not None:
            if self.engine.zero_optimization_partition_weights():
                self.engine.empty_partition_cache()  # no parameter in flight while partitions are written back
            self.best_snapshot.restore()
            self.export("best", self.best_snapshot.metrics or {})
        elif self.config.output.save_best and self.state.best_step is not None and self.rank == 0:
            logger.warning(
                "best/ not exported: the best evaluation (step %s) came before this run restarted from a checkpoint, "
                "and no later evaluation beat it; final/ holds the last weights", self.state.best_step)

    # --------------------------------------------------------------------- evaluate, checkpoint, export
    def evaluate(self, engine: Any = None) -> dict[str, float]:
        """Every eval set, as ``<set>/<metric>``, of the training engine (or ``engine``: the start model's)."""
        t, metrics, engine = self.config.training, {}, engine or self.engine
        for reader in self.eval_readers:
            values = evaluate(
                engine,
                reader,
                self.collator,
                task=self.config.model.task,
                num_labels=len(self.data.label_names),
                batch_size=t.eval_batch_size,
                rank=self.rank,
                world_size=self.world_size,
                device=self.device,
                label_ids=reader.scanned.label_subset,
            )
            metrics.update({f"{reader.scanned.name}/{k}": v for k, v in values.items()})
        self.generation = self.generation or GenerationEval.for_job(self.config, self.data, self.tokenizer)
        metrics.update(self.generation.metrics(  # collective: every rank generates, in step under ZeRO-3
            engine, self.tokenizer, batch_size=t.eval_batch_size, rank=self.rank, world_size=self.world_size,
            device=self.device, zero_stage=self.config.deepspeed.stage))
        return metrics

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Hand this step's checkpoint and metrics to Ray Train (``orchestrator.train.checkpointing``)."""
        self.checkpoint_upload_fn = None
        self.callbacks.fire(Event.BEFORE_CHECKPOINT, self)
        save_checkpoint(self.engine, self.state, rank=self.rank, metrics=metrics, upload_fn=self.checkpoint_upload_fn,
                        upload=self.config.output.checkpoint_upload)
        self.callbacks.fire(Event.AFTER_CHECKPOINT, self)

    def export(self, name: str, metrics: dict[str, Any]) -> None:
        """The model as a Hugging Face folder ``<run_dir>/<name>`` (``final`` or ``best``); an ``export`` record
        says how long training stood still for it."""
        started = time.time()
        export_hf_folder(
            self.engine,
            tokenizer=self.tokenizer,
            config=self.config,
            destination=self.run_dir / name,
            metrics={"step": self.state.step, **metrics},
            label_names=self.data.label_names,
            is_rank0=self.rank == 0,
            method=self.method,
            publish_to=remote_child(self.run_folder, name),
        )
        self.tracker.log("export", self.state.step, {"export/name": name, "export/started": started,
                                                     "export/seconds": time.time() - started})

    # ----------------------------------------------------------------------------------------------- clean up
    def cleanup(self) -> None:
        """Close the readers and the tracker (the W&B run), then wait for every rank."""
        self.train_reader.close()
        for reader in self.eval_readers:
            reader.close()
        if self.generation is not None:
            self.generation.close()
        if self.rank == 0 and is_uri(self.run_folder):  # the bucket has final/ and best/: no second copy here
            evict_published_exports(self.run_dir, self.run_folder)
        self.tracker.finish()
        if dist.is_initialized():
            dist.barrier()

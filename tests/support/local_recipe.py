"""The workers' recipe run in one plain process (rank 0 of 1, gloo), without Ray: the same model loading, method,
unfreezing, optimizer and DeepSpeed engine as a real run, stepped a few micro-batches, for tests that compare
the parameter updates of two settings (with and without gradient checkpointing) on every ZeRO stage.

    python -m tests.support.local_recipe PORT JOBS.json   # prints one JSON line per job: parameter deltas

Each job runs in this one process after the other; DeepSpeed needs a process group, so the caller starts this
in a fresh process (tests/test_gradient_checkpointing.py).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from orchestrator.train.recipe import TrainRecipe
from orchestrator.train.worker_env import set_seed


class LocalRecipe(TrainRecipe):
    """A TrainRecipe whose worker context is this process, with no checkpoint to resume."""

    def _setup_worker(self) -> None:
        self.memory_at_start = 0.0
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = torch.device("cpu")
        self.device_type = "cpu"
        self.precision = "fp32"
        set_seed(self.config.training.seed)

    def _find_checkpoint(self) -> None:
        self.start_checkpoint, self.inherited, self.saved = None, False, None
        self.new_world_size, self.universal = False, False


def full_parameters(recipe: TrainRecipe) -> dict[str, torch.Tensor]:
    """Every parameter of the trained module, whole (gathered under ZeRO-3)."""
    import deepspeed

    module = recipe.engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: p.detach().clone().float() for name, p in module.named_parameters()}


def parameter_deltas(job: dict[str, Any], micro_batches: int) -> dict[str, list[float]]:
    """How much each parameter of ``job`` (a job dict) moved over ``micro_batches`` micro-batches: (max |Δ|, ‖Δ‖)."""
    from orchestrator.cluster.preflight import preflight
    from orchestrator.config import config_from_dict

    checked = preflight(config_from_dict(job))
    payload = {"config": checked.config.to_dict(), "data": checked.data, "model_path": checked.model_path,
               "run_dir": str(checked.run_dir)}
    recipe = LocalRecipe(payload, callbacks=[])
    recipe.setup()
    recipe.engine.train()
    before = full_parameters(recipe)
    batches = recipe._epoch_batches()
    for step in range(micro_batches):
        recipe._train_micro_batch(batches[step])
        if (step + 1) % recipe.config.training.grad_accumulation == 0:
            recipe.state.step += 1
    after = full_parameters(recipe)
    recipe.train_reader.close()
    return {name: [float((after[name] - before[name]).abs().max()), float((after[name] - before[name]).norm())]
            for name in before}


def main() -> None:
    port, jobs_file = sys.argv[1], sys.argv[2]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo")
    for job in json.loads(open(jobs_file).read()):
        deltas = parameter_deltas(job["job"], job["micro_batches"])
        print(json.dumps({"id": job["id"], "deltas": deltas}), flush=True)


if __name__ == "__main__":
    main()

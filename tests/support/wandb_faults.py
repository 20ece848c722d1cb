"""W&B going away mid-run, for the tests that training never depends on W&B (issue 20, item 11).

Ray's workers import callbacks by module name; this module is pickled by value so that they need not have the
tests folder on their path (as ``tests/support/faults.py``).
"""

from __future__ import annotations

import sys

import psutil
import ray.cloudpickle

from orchestrator.train.callbacks import Callback, Run

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillWandbService(Callback):
    """On rank 0, at the end of optimizer step ``step``, SIGKILL this worker's W&B service process (``wandb-core``,
    a child of the worker), as an OOM killer or a crash of the service would."""

    def __init__(self, step: int):
        self.step = step

    def step_end(self, recipe: Run) -> None:
        if recipe.rank != 0 or recipe.state.step != self.step:
            return
        services = [p for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]
        if not services:
            raise RuntimeError("no W&B service process to kill: is W&B enabled for this run?")
        for service in services:
            service.kill()
        psutil.wait_procs(services, timeout=10)

"""Gradient checkpointing changes memory, never training: with it on, the same parameters move by the same
amounts as without it, for every unfreezing kind and method, under ZeRO 2 and 3 (non-reentrant checkpointing,
pinned by the recipe; the reentrant kind drops the gradients of blocks whose inputs need no grad)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, tiny_job

UNFREEZING: dict[str, dict[str, Any]] = {
    "none": {"kind": "none"},
    "head_only": {"kind": "head_only"},
    "top_k": {"kind": "top_k", "k": 1},
    "gradual": {"kind": "gradual", "every_steps": 1},
    "explicit": {"kind": "explicit", "milestones": [{"step": 0, "groups": ["head"]}, {"step": 1, "groups": ["all"]}]},
}


def _job(name: str, models: dict[str, Path], teacher: Path, data: Path, out: Path, *, method: str, unfreeze: str,
         stage: int, checkpointing: bool) -> dict[str, Any]:
    job = tiny_job(name, models["bert"], data, out, stage=stage, max_steps=3, lr=1e-2, batch_size_per_worker=4)
    job["model"]["gradient_checkpointing"] = checkpointing
    job["unfreeze"] = UNFREEZING[unfreeze]
    job["method"] = method
    job["deepspeed"]["overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    if method == "distill":
        job["distill"] = {"teacher": str(teacher), "keep_every": 2, "hidden_weight": 1.0}
        job["model"]["path"] = str(teacher)
    return job


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("teacher") / "bert4", "bert", layers=4, seed=1)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpointing_moves_the_same_parameters_by_the_same_amounts(stage, tiny_models, teacher, shared_data,
                                                                     tmp_path):
    from orchestrator.config import config_from_dict
    from orchestrator.errors import ConfigError
    from tests.test_job_submit import _free_ports

    jobs, pairs, refused = [], [], []
    for method in ("full", "lora", "distill"):
        for unfreeze in UNFREEZING:
            ids = []
            for checkpointing in (False, True):
                name = f"gc-{method}-{unfreeze}-z{stage}-{int(checkpointing)}"
                job = _job(name, tiny_models, teacher, shared_data, tmp_path, method=method, unfreeze=unfreeze,
                           stage=stage, checkpointing=checkpointing)
                try:
                    config_from_dict(job)
                except ConfigError:
                    refused.append((method, unfreeze))
                    break
                jobs.append({"id": name, "job": job, "micro_batches": 3})
                ids.append(name)
            if len(ids) == 2:
                pairs.append((method, unfreeze, *ids))
    assert len(pairs) >= 10, f"too few combinations run: {pairs}, refused: {refused}"
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (port,) = _free_ports(1)
    done = subprocess.run([sys.executable, "-m", "tests.support.local_recipe", str(port), str(tmp_path / "jobs.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    deltas = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            deltas[record["id"]] = record["deltas"]
    for method, unfreeze, plain, checkpointed in pairs:
        without, with_ = deltas[plain], deltas[checkpointed]
        assert without.keys() == with_.keys()
        moved_without = {n for n, (largest, _) in without.items() if largest > 0}
        moved_with = {n for n, (largest, _) in with_.items() if largest > 0}
        assert moved_without, (method, unfreeze)
        assert moved_with == moved_without, (method, unfreeze, moved_with ^ moved_without)
        for name in moved_without:
            assert with_[name][1] == pytest.approx(without[name][1], rel=1e-3, abs=1e-7), (method, unfreeze, name)

"""Loading what the project wrote never runs pickled code, and running a model's own code is loud (issue 7).

The per-rank RNG file of a checkpoint holds tensors and plain Python values only, so ``torch.load`` reads it
with ``weights_only=True``; ``model.trust_remote_code: true`` is logged as a warning before anything loads.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict
from orchestrator.train.checkpointing import restore_rng, rng_state


def _draws() -> list[float]:
    """The next values of every generator the loop seeds, cached Gaussians included."""
    return [
        random.random(),
        random.gauss(0.0, 1.0),
        *np.random.rand(3).tolist(),
        float(np.random.randn()),
        *torch.rand(3).tolist(),
    ]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached second Gaussian in Python's state ...
    np.random.randn()  # ... and in numpy's (has_gauss=1, cached_gaussian): both must survive
    torch.save(rng_state(), tmp_path / "rng_rank0.pt")
    expected = _draws()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(torch.load(tmp_path / "rng_rank0.pt", weights_only=True))

    assert _draws() == expected


def test_rng_file_holds_no_numpy_objects(tmp_path: Path) -> None:
    state = rng_state()

    def leaves(value: object) -> list[object]:
        if isinstance(value, dict):
            return [leaf for item in value.values() for leaf in leaves(item)]
        if isinstance(value, (list, tuple)):
            return [leaf for item in value for leaf in leaves(item)]
        return [value]

    kinds = {type(leaf) for leaf in leaves(state)}
    assert kinds <= {torch.Tensor, str, int, float, type(None)}, kinds


def test_trust_remote_code_is_a_warning_before_anything_loads(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    job = {
        "name": "trusting",
        "model": {"path": str(tiny_models["bert"]), "trust_remote_code": True},
        "data": {"train": {"path": str(train), "text_column": "sentence"}},
        "output": {"dir": str(tmp_path / "runs")},
    }
    with caplog.at_level(logging.WARNING, logger="orchestrator.cluster.preflight"):
        preflight(config_from_dict(job))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trust_remote_code is ON" in w and str(tiny_models["bert"]) in w for w in warnings), warnings

    caplog.clear()
    job["model"]["trust_remote_code"] = False
    with caplog.at_level(logging.WARNING, logger="orchestrator.cluster.preflight"):
        preflight(config_from_dict(job))
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]

"""The export's folder swap keeps the last good copy whatever step a crash hits (faults injected between the
renames), and a later export recovers."""

from __future__ import annotations

import pathlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.train.export import export_hf_folder


class _Method:
    """Stands in for a training method: writes the weights as one file holding a version tag."""

    def __init__(self, tag: str):
        self.tag = tag

    def save_weights(self, module, state, folder: Path, config) -> None:
        (folder / "model.safetensors").write_text(self.tag)


class _Tokenizer:
    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


def _engine() -> SimpleNamespace:
    module = torch.nn.Linear(2, 1)
    return SimpleNamespace(zero_optimization_partition_weights=lambda: False, module=module)


def _export(tmp_path: Path, tag: str) -> None:
    config = config_from_dict(
        {"name": "job", "model": {"path": "/m"}, "data": {"train": {"path": str(tmp_path / "t.tsv")}}}
    )
    export_hf_folder(
        _engine(),
        tokenizer=_Tokenizer(),
        config=config,
        destination=tmp_path / "run" / "final",
        metrics={},
        label_names=["0", "1"],
        is_rank0=True,
        method=_Method(tag),
    )


def _fail_staging_rename(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the rename of a staging folder onto ``final`` raise ``times`` times (a crash between the renames)."""
    real = pathlib.Path.rename
    failures = [times]

    def rename(self: Path, target):
        if self.name.startswith(".final-") and Path(target).name == "final" and failures[0] > 0:
            failures[0] -= 1
            raise OSError("injected fault: the disk went away")
        return real(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    return failures


def _copies(run: Path) -> dict[str, str]:
    """The weights' tag in ``final`` and in its old copy, where they exist."""
    found = {}
    for name in ("final", ".final.old"):
        weights = run / name / "model.safetensors"
        if weights.is_file():
            found[name] = weights.read_text()
    return found


def test_a_crash_between_the_renames_keeps_the_old_copy_and_the_next_export_recovers(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _export(tmp_path, "v1")
    assert _copies(run) == {"final": "v1"}

    # A crash between the two renames (the process died: nothing put the old copy back): no final/.
    (run / "final").rename(run / ".final.old")
    # The next export fails at its own rename: the last good copy must still be there.
    left = _fail_staging_rename(monkeypatch, times=1)
    with pytest.raises(OSError, match="injected fault"):
        _export(tmp_path, "v2")
    assert left == [0]
    assert "v1" in _copies(run).values(), "the last good copy was deleted"
    assert not list(run.glob(".final-*"))  # the failed staging folder is cleaned up

    _export(tmp_path, "v3")  # a later export goes through
    assert _copies(run) == {"final": "v3"}


def test_replace_folder_at_every_crash_point(tmp_path):
    from orchestrator.train.folder_swap import old_copy, recover_folder, replace_folder

    def folder(name: str, tag: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "w").write_text(tag)
        return path

    destination = tmp_path / "final"
    old = old_copy(destination)
    assert old.name == ".final.old"
    replace_folder(folder(".s1", "v1"), destination)  # no destination yet
    assert (destination / "w").read_text() == "v1" and not old.exists()

    destination.rename(old)  # killed between the renames
    assert recover_folder(destination) and (destination / "w").read_text() == "v1" and not old.exists()
    assert not recover_folder(destination)  # nothing to do

    destination.rename(old)  # killed between the renames again; this time the next swap recovers
    replace_folder(folder(".s2", "v2"), destination)
    assert (destination / "w").read_text() == "v2" and not old.exists()

    folder(".final.old", "v2-leftover")  # killed after the new copy was in place, before the delete
    replace_folder(folder(".s3", "v3"), destination)
    assert (destination / "w").read_text() == "v3" and not old.exists()


def test_a_failed_rename_puts_the_good_copy_back_at_once(tmp_path, monkeypatch):
    from orchestrator.train.folder_swap import replace_folder

    _export(tmp_path, "v1")
    run = tmp_path / "run"
    staging = run / ".final-new"
    staging.mkdir()
    (staging / "model.safetensors").write_text("v2")
    _fail_staging_rename(monkeypatch, times=1)
    with pytest.raises(OSError, match="injected fault"):
        replace_folder(staging, run / "final")
    assert _copies(run) == {"final": "v1"}  # final/ is usable at once, not only after the next export

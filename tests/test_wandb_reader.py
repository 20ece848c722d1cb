"""tests.support.wandb_offline against real offline runs written by the installed wandb."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.wandb_offline import OfflineRun, find_offline_runs, iter_records, read_offline_run

WIDE_KEYS = 4000  # one history row of ~60 KB: split over several 32 KiB blocks (FIRST/MIDDLE/LAST chunks)


def _write_offline_run(root: Path, name: str, *, wide: bool = False) -> Path:
    """Write one offline run under root with the real wandb and return its offline-run-* folder."""
    import wandb

    run = wandb.init(
        mode="offline",
        dir=str(root),
        project="p",
        group="g",
        job_type="train",
        name=name,
        config={"a": 1, "nested": {"b": 2}},
        tags=["t"],
    )
    run.log({"loss": 0.5, "eval/acc": 0.8}, step=3)
    run.log({"loss": 0.25, "eval/acc": 0.9, "lr": {"group0": 1e-3}}, step=5)
    if wide:
        run.log({f"wide/k{i:05d}": i for i in range(WIDE_KEYS)}, step=6)
    run.log({"loss": 0.125}, step=7)
    run.summary["best_acc"] = 0.95
    run.config.update({"late": "x"})
    run_dir = Path(run.dir).parent  # run.dir is <offline-run-*>/files
    run.finish()
    return run_dir


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two offline runs, written once for the module (wandb start-up takes a few seconds)."""
    import wandb

    root = tmp_path_factory.mktemp("wandb-reader")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_CONFIG_DIR", str(root / ".config"))
        mp.setenv("WANDB_CACHE_DIR", str(root / ".cache"))
        mp.setenv("WANDB_DATA_DIR", str(root / ".data"))
        try:
            dirs = [_write_offline_run(root, "n", wide=True), _write_offline_run(root, "n2")]
        finally:
            wandb.teardown()
    return root, dirs


def test_reads_back_what_was_logged(wandb_root: tuple[Path, list[Path]]) -> None:
    _, (run_dir, _) = wandb_root
    assert run_dir.name.startswith("offline-run-")
    run = read_offline_run(run_dir)

    assert isinstance(run, OfflineRun)
    assert run.path == run_dir
    assert run_dir.name.endswith(run.run_id)
    assert (run.name, run.group, run.job_type, run.project) == ("n", "g", "train", "p")
    assert run.tags == ["t"]
    assert run.config == {"a": 1, "nested": {"b": 2}, "late": "x"}
    assert run.exit_code == 0

    assert [row["_step"] for row in run.history] == [3, 5, 6, 7]
    assert run.history[0] == {"_step": 3, "loss": 0.5, "eval/acc": 0.8}
    assert run.history[1] == {"_step": 5, "loss": 0.25, "eval/acc": 0.9, "lr": {"group0": 1e-3}}
    wide = run.history[2]
    assert len(wide) == WIDE_KEYS + 1
    assert wide["wide/k00000"] == 0 and wide[f"wide/k{WIDE_KEYS - 1:05d}"] == WIDE_KEYS - 1
    assert run.history[3] == {"_step": 7, "loss": 0.125}

    assert run.summary["best_acc"] == 0.95
    assert run.summary["loss"] == 0.125
    assert run.summary["eval/acc"] == 0.9
    assert run.summary["lr"] == {"group0": 1e-3}
    assert run.summary["_step"] == 7
    assert "_wandb" not in run.summary


def test_accepts_the_wandb_file_and_spans_blocks(wandb_root: tuple[Path, list[Path]]) -> None:
    _, (run_dir, _) = wandb_root
    (wandb_file,) = run_dir.glob("*.wandb")
    assert wandb_file.stat().st_size > 2 * 32 * 1024  # the wide row really crossed block boundaries
    assert read_offline_run(wandb_file) == read_offline_run(run_dir)


def test_find_offline_runs(wandb_root: tuple[Path, list[Path]]) -> None:
    root, dirs = wandb_root
    runs = find_offline_runs(root)
    assert {r.path for r in runs} == set(dirs)
    assert {r.name for r in runs} == {"n", "n2"}
    assert [r.path.name[len("offline-run-") :][:15] for r in runs] == sorted(
        r.path.name[len("offline-run-") :][:15] for r in runs
    )
    assert find_offline_runs(root / "does-not-hold-runs-yet") == []


def test_not_a_wandb_log(tmp_path: Path) -> None:
    bogus = tmp_path / "offline-run-20240101_000000-abc" / "run-abc.wandb"
    bogus.parent.mkdir()
    bogus.write_bytes(b"definitely not leveldb" * 10)
    with pytest.raises(ValueError, match="run-abc.wandb.*not a W&B log"):
        read_offline_run(bogus.parent)
    with pytest.raises(ValueError, match="not a W&B log"):
        find_offline_runs(tmp_path)
    with pytest.raises(ValueError, match="expected exactly one .wandb file"):
        read_offline_run(tmp_path)


def test_corrupt_and_truncated_logs(wandb_root: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, (_, run_dir) = wandb_root
    (wandb_file,) = run_dir.glob("*.wandb")
    data = wandb_file.read_bytes()
    n_records = sum(1 for _ in iter_records(wandb_file))

    corrupt = tmp_path / "corrupt" / wandb_file.name
    corrupt.parent.mkdir()
    corrupt.write_bytes(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_offline_run(corrupt)

    # A run killed mid-write: the partial last record is skipped, everything before it is read.
    truncated = tmp_path / "truncated" / wandb_file.name
    truncated.parent.mkdir()
    truncated.write_bytes(data[:-3])
    assert sum(1 for _ in iter_records(truncated)) == n_records - 1
    shutil.copy(wandb_file, truncated)
    assert read_offline_run(truncated).history == read_offline_run(run_dir).history

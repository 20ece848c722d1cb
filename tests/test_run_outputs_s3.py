"""Outputs of a run whose ``output.dir`` is a bucket, without Ray: metrics.jsonl and exports uploaded from the
local scratch (marker-last for a folder), the bucket's copy as the starting point after the scratch is lost,
the run lock, and preflight's output checks naming the field, all against the real S3 server (moto)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.cluster.output_paths import check_outputs, ray_storage, run_dir_of, storage_path_of
from orchestrator.cluster.run_lock import RunLockedError, run_lock
from orchestrator.config import config_from_dict
from orchestrator.run_outputs import (
    EXPORT_MARKER,
    evict_published_exports,
    is_published,
    publish_folder,
    run_folder,
    scratch_dir,
)
from orchestrator.tracking import Tracker, read_metrics
from tests.conftest import tiny_job


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "scratch"
    monkeypatch.setenv("ORCHESTRATOR_SCRATCH", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def _job(output_dir: str, tmp_path: Path, **output: str) -> object:
    spec = tiny_job("s3run", tmp_path / "model", tmp_path / "data", tmp_path)
    spec["output"] = {"dir": output_dir, **output}
    spec["tracking"]["wandb"]["mode"] = "disabled"
    return config_from_dict(spec)


def test_a_bucket_output_dir_is_a_uri_run_folder_with_a_local_scratch(s3_bucket, scratch, tmp_path):
    config = _job(f"{s3_bucket}/runs/", tmp_path)
    assert storage_path_of(config) == f"{s3_bucket}/runs/s3run/ray"  # not <cwd>/s3:/...
    local = run_dir_of(config)
    assert local.parent == scratch and local.name.startswith("s3run-")
    fs_args = ray_storage(storage_path_of(config))
    assert fs_args["storage_path"] == f"{s3_bucket[5:]}/runs/s3run/ray" and fs_args["storage_filesystem"] is not None
    # Two buckets' runs of one name never share a scratch folder.
    assert scratch_dir(run_folder("s3://other/runs", "s3run")) != local
    assert check_outputs(config, resume=False) == []
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s3:").exists()


def test_metrics_reach_the_bucket_at_each_publish_and_a_lost_scratch_resumes_from_them(s3_bucket, s3_server, scratch,
                                                                                        tmp_path):
    config = _job(s3_bucket, tmp_path)
    folder = f"{s3_bucket}/s3run"
    local = scratch_dir(folder)
    tracker = Tracker(config, local, enabled=True, publish_to=folder)
    tracker.log("train", 1, {"train/loss": 1.0})
    tracker.log("eval", 1, {"sst2/loss": 0.9})
    tracker.publish()
    tracker.log("train", 2, {"train/loss": 0.8})  # after the last upload: lost with the driver
    assert [r["step"] for r in read_metrics(folder)] == [1, 1]
    tracker._file.close()  # the driver dies: no finish(), and the scratch goes with the node
    import shutil

    shutil.rmtree(local)
    resumed = Tracker(config, local, enabled=True, publish_to=folder)
    resumed.log("train", 2, {"train/loss": 0.7})
    resumed.finish()
    records = read_metrics(folder)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("eval", 1), ("train", 2)]
    assert records[-1]["train/loss"] == 0.7
    bucket = s3_bucket[5:]
    assert s3_server.keys(bucket) == ["s3run/metrics.jsonl"]


def test_an_export_is_published_marker_last_and_an_overwrite_leaves_no_stale_files(s3_bucket, s3_server, tmp_path):
    local = tmp_path / "final"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"w" * 1000)
    (local / "model-00002-of-00002.safetensors").write_bytes(b"x" * 10)
    (local / "config.json").write_text("{}")
    destination = f"{s3_bucket}/run/final"
    assert not is_published(destination)
    publish_folder(local, destination)
    bucket = s3_bucket[5:]
    names = ("model.safetensors", "model-00002-of-00002.safetensors", "config.json", EXPORT_MARKER)
    assert s3_server.keys(bucket) == sorted(f"run/final/{n}" for n in names)
    marker = json.loads(storage.read_text(f"{destination}/{EXPORT_MARKER}"))
    assert marker["files"]["model.safetensors"] == 1000
    assert is_published(destination)

    # A re-export with one shard fewer; while the upload runs the marker is gone, and the old shard is removed.
    (local / "model-00002-of-00002.safetensors").unlink()
    (local / "model.safetensors").write_bytes(b"v" * 2000)
    seen: list[bool] = []
    real_upload = storage.upload

    def watching_upload(source: object, dest: object) -> None:
        seen.append(is_published(destination))
        real_upload(source, dest)

    storage.upload = watching_upload
    try:
        publish_folder(local, destination)
    finally:
        storage.upload = real_upload
    assert seen == [False]
    objects = [k for k in s3_server.keys(bucket) if not k.endswith("/")]  # pyarrow may leave a folder marker
    assert objects == sorted(f"run/final/{n}" for n in ("model.safetensors", "config.json", EXPORT_MARKER))
    assert storage.stat(f"{destination}/model.safetensors").size == 2000 and is_published(destination)


def test_the_scratch_copy_of_an_export_goes_once_the_bucket_holds_it_whole(s3_bucket, tmp_path):
    scratch, folder = tmp_path / "scratch", f"{s3_bucket}/runs/evict"
    for name in ("final", "best"):
        (scratch / name).mkdir(parents=True)
        (scratch / name / "model.safetensors").write_bytes(b"w" * 64)
    publish_folder(scratch / "final", f"{folder}/final")
    storage.upload(scratch / "best", f"{folder}/best")  # uploaded, but no marker: an interrupted publish

    assert evict_published_exports(scratch, folder) == ["final"]
    assert not (scratch / "final").exists()
    assert (scratch / "best" / "model.safetensors").is_file()  # not published: never evict the only copy
    assert evict_published_exports(tmp_path / "local-run", str(tmp_path / "local-run")) == []  # a local run: its folder


def test_the_run_lock_of_a_bucket_run_refuses_another_hosts_driver_and_takes_over_a_dead_one(s3_bucket, scratch):
    folder = f"{s3_bucket}/locked"
    with run_lock(folder, "locked") as lock:
        assert lock is not None
        record = json.loads(storage.read_text(f"{folder}/.run.lock"))
        assert record["pid"] == os.getpid()
    assert not storage.exists(f"{folder}/.run.lock")  # released

    storage.write_text(f"{folder}/.run.lock", json.dumps({"name": "locked", "pid": 1, "host": "other-node"}))
    with pytest.raises(RunLockedError, match=r"other-node.*delete s3://.*/locked/\.run\.lock"):
        with run_lock(folder, "locked"):
            pass
    dead = {"name": "locked", "pid": 2**22 + 12345, "host": socket.gethostname(), "token": "old"}
    storage.write_text(f"{folder}/.run.lock", json.dumps(dead))
    with run_lock(folder, "locked") as lock:  # a killed driver of this host: --resume takes it over
        assert lock is not None
        assert json.loads(storage.read_text(f"{folder}/.run.lock"))["pid"] == os.getpid()


@pytest.mark.parametrize("field", ["output.dir", "output.storage_path"])
def test_bad_output_uris_are_reported_naming_the_field(field, s3_bucket, s3_server, scratch, tmp_path, monkeypatch):
    good = f"{s3_bucket}/runs"
    missing = "s3://no-such-bucket-e18/runs"
    config = _job(missing, tmp_path) if field == "output.dir" else _job(good, tmp_path, storage_path=missing)
    issues = check_outputs(config, resume=False)
    assert [i.location for i in issues] == [field]
    assert "no-such-bucket-e18" in issues[0].message and "does not exist" in issues[0].message

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    config = _job(good, tmp_path, storage_path=f"{s3_bucket}/ckpt") if field == "output.storage_path" else _job(
        good, tmp_path)
    issues = check_outputs(config, resume=False)
    assert issues and issues[0].location == "output.dir" and "access denied" in issues[0].message

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    issues = check_outputs(config, resume=False)
    assert issues and issues[0].location == "output.dir" and "does not answer" in issues[0].message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

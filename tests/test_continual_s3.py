"""Continual retraining watching a prefix on object storage (issue 18, inputs): listing with versions, the settle
time, exact-once ingestion by content, and a whole round (fake trainer, no cluster) reading its new shard from
the bucket, against a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.config.retrain import retrain_from_dict
from orchestrator.errors import DataError
from orchestrator.lifecycle.new_data import HashCache, scan_watch
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.rounds import run_round
from tests.test_continual import FakeTrainer, _base_model, _retrain_dict, _shard


@pytest.fixture(autouse=True)
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _upload_shard(tmp_path: Path, uri: str, rows: int, *, start: int = 0) -> str:
    storage.upload(_shard(tmp_path / "made", Path(uri).name, rows, start=start), uri)
    return uri


def test_shards_on_a_prefix_are_listed_by_glob_after_the_settle_time(s3_bucket: str, tmp_path: Path) -> None:
    incoming = storage.join(s3_bucket, "incoming")
    shard = _upload_shard(tmp_path, storage.join(incoming, "a.tsv"), 10)
    _upload_shard(tmp_path, storage.join(incoming, "sub", "b.tsv"), 10, start=50)
    storage.write_text(storage.join(incoming, "notes.txt"), "not data")
    storage.write_text(storage.join(incoming, ".partial.tsv"), "hidden")
    uploaded = storage.stat(shard).mtime.timestamp()

    assert scan_watch(incoming, "*.tsv", settle_s=60, now=uploaded + 5) == []  # still settling
    found = scan_watch(incoming, "*.tsv", settle_s=60, now=uploaded + 61)
    assert [f.path for f in found] == [shard]
    made = (tmp_path / "made" / "a.tsv").read_bytes()
    assert found[0].sha256 == hashlib.sha256(made).hexdigest() and found[0].size == len(made)
    assert [Path(f.path).name for f in scan_watch(incoming, "**/*.tsv")] == ["a.tsv", "b.tsv"]
    assert scan_watch(storage.join(s3_bucket, "nothing-yet"), "*.tsv") == []  # an empty prefix waits
    with pytest.raises(DataError, match=r"watch.dir s3://no-such-bucket-x/in: .*does not exist"):
        scan_watch("s3://no-such-bucket-x/in", "*.tsv")


def test_the_hash_cache_hashes_an_object_again_only_when_its_version_changes(s3_bucket: str, tmp_path: Path) -> None:
    uri = _upload_shard(tmp_path, storage.join(s3_bucket, "in", "a.tsv"), 10)
    cache = HashCache()
    first = cache(uri)
    assert cache(uri) == first and list(cache._known.values())[0][0] == storage.stat(uri).version
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    _upload_shard(tmp_path, uri, 12)
    assert cache(uri) != first


def test_a_round_ingests_a_shard_from_the_bucket_once_and_a_changed_upload_again(
    s3_bucket: str, tmp_path: Path
) -> None:
    incoming = storage.join(s3_bucket, "incoming")
    spec = _retrain_dict(tmp_path, model=str(_base_model(tmp_path)))
    spec["watch"] = {"dir": incoming + "/", "settle_s": 0}
    loaded = retrain_from_dict(spec)
    assert loaded.resolved()["watch"]["dir"] == incoming + "/"  # a submitted round watches the same prefix
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    trainer = FakeTrainer([{"*": 0.9}] * 3)
    shard = _upload_shard(tmp_path, storage.join(incoming, "shard1.tsv"), 40)

    first = run_round(loaded, registry=reg, train=trainer)
    assert first.status == "succeeded", first.reason
    assert [f.path for f in first.new_files] == [shard]
    learned = Path(trainer.jobs[0].data.train.path).read_text().splitlines()
    assert len(learned) == 32 and all("sentence number" in line for line in learned)  # 40 rows less a 20% holdout

    assert run_round(loaded, registry=reg, train=trainer).status == "skipped"  # ingested once
    time.sleep(1.1)
    _upload_shard(tmp_path, shard, 40)  # the same rows uploaded again: a new version, the same content
    assert run_round(loaded, registry=reg, train=trainer).status == "skipped"

    _upload_shard(tmp_path, shard, 30, start=1000)  # other rows under the same key: new data, as for a local file
    third = run_round(loaded, registry=reg, train=trainer)
    assert third.status == "succeeded" and [f.path for f in third.new_files] == [shard]
    assert third.new_files[0].sha256 != first.new_files[0].sha256
    assert len(trainer.jobs) == 2

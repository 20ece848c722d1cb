"""The storage layer (orchestrator/storage.py) against a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.storage import StorageError


@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_paths_and_uris_are_told_apart_and_normalised(tmp_path: Path) -> None:
    assert storage.is_uri("s3://bucket/key") and storage.is_uri("gs://bucket/key")
    assert not storage.is_uri(str(tmp_path)) and not storage.is_uri(f"file://{tmp_path}")
    assert storage.normalize("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert storage.normalize("gcs://bucket/a") == "gs://bucket/a"
    assert storage.normalize(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.join("s3://bucket/runs", "job", "final") == "s3://bucket/runs/job/final"
    assert storage.parent("s3://bucket/runs/job") == "s3://bucket/runs"
    assert storage.name_of("s3://bucket/runs/job") == "job"
    with pytest.raises(StorageError, match="unknown storage scheme 'http'"):
        storage.normalize("http://example.com/x")
    with pytest.raises(StorageError, match="no bucket"):
        storage.normalize("s3:///key")


def test_write_read_list_and_ranged_reads_on_the_bucket(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "data", "rows.jsonl")
    storage.write_text(uri, '{"text": "a"}\n{"text": "b"}\n')
    storage.write_bytes(storage.join(s3_bucket, "data", "sub", "more.bin"), b"\x00\x01")
    assert storage.read_text(uri).splitlines()[1] == '{"text": "b"}'
    listed = storage.list_files(storage.join(s3_bucket, "data"))
    assert [e.path for e in listed] == [uri, storage.join(s3_bucket, "data", "sub", "more.bin")]
    assert listed[0].size == 28 and listed[0].mtime is not None
    with storage.open_input(uri) as f:
        f.seek(14)
        assert f.read(13) == b'{"text": "b"}'
    assert storage.is_dir(storage.join(s3_bucket, "data")) and storage.exists(uri)
    assert storage.stat(storage.join(s3_bucket, "data")) is None  # a prefix is not a file
    assert storage.list_files(storage.join(s3_bucket, "nothing-here")) == []


def test_folders_upload_and_download_whole(s3_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "final"
    (local / "nested").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    (local / "nested" / "weights.bin").write_bytes(b"w" * 1000)
    storage.upload(local, storage.join(s3_bucket, "run", "final"))
    back = storage.download(storage.join(s3_bucket, "run", "final"), tmp_path / "back")
    assert (back / "config.json").read_text() == "{}"
    assert (back / "nested" / "weights.bin").read_bytes() == b"w" * 1000
    storage.delete(storage.join(s3_bucket, "run"))
    assert not storage.exists(storage.join(s3_bucket, "run", "final", "config.json"))


def test_a_remote_file_is_copied_once_per_node_and_again_when_it_changes(s3_bucket: str, node_cache: Path) -> None:
    uri = storage.join(s3_bucket, "train.tsv")
    storage.write_text(uri, "text\tlabel\nfirst\t0\n")
    first = storage.local_copy(uri)
    assert first.read_text().endswith("first\t0\n") and node_cache in first.parents
    mtime = first.stat().st_mtime_ns
    assert storage.local_copy(uri) == first and first.stat().st_mtime_ns == mtime  # reused, not fetched again
    version = storage.stat(uri).version
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    storage.write_text(uri, "text\tlabel\nsecond\t1\n")
    with pytest.raises(StorageError, match="changed after the job scanned it"):
        storage.local_copy(uri, expect_version=version)
    second = storage.local_copy(uri)
    assert second != first and second.read_text().endswith("second\t1\n")


def _copy_in_child(uri: str, out: multiprocessing.Queue) -> None:
    out.put(str(storage.local_copy(uri)))


def test_ranks_of_a_node_that_race_share_one_complete_copy(s3_bucket: str, node_cache: Path) -> None:
    uri = storage.join(s3_bucket, "big.bin")
    payload = bytes(range(256)) * 40_000  # 10 MB: a download that takes a moment
    storage.write_bytes(uri, payload)
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    workers = [ctx.Process(target=_copy_in_child, args=(uri, results)) for _ in range(3)]
    for w in workers:
        w.start()
    paths = {results.get(timeout=120) for _ in workers}
    for w in workers:
        w.join(timeout=60)
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == payload
    leftovers = [p.name for p in (node_cache / "remote").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_local_paths_pass_through_untouched(tmp_path: Path, node_cache: Path) -> None:
    f = tmp_path / "rows.tsv"
    storage.write_text(f, "x")
    assert storage.local_copy(f) == f.resolve()
    assert not node_cache.exists()
    storage.check(f)  # local paths keep their own checks


class TestBadLocationsAreNamedBeforeAnythingRuns:
    def test_missing_bucket(self, s3_server) -> None:
        with pytest.raises(
            StorageError, match=r"s3://no-such-bucket-here/x: the bucket 'no-such-bucket-here' does not"
        ):
            storage.check("s3://no-such-bucket-here/x")
        with pytest.raises(StorageError, match="does not exist"):
            storage.check("s3://no-such-bucket-here/out", write=True)

    def test_missing_key(self, s3_bucket: str) -> None:
        with pytest.raises(StorageError, match=rf"{s3_bucket}/missing.tsv: no such file or object"):
            storage.check(f"{s3_bucket}/missing.tsv")
        with pytest.raises(StorageError, match="no such file or object"):
            storage.read_bytes(f"{s3_bucket}/missing.tsv")

    def test_a_prefix_where_a_file_is_wanted(self, s3_bucket: str) -> None:
        storage.write_text(f"{s3_bucket}/dir/a.tsv", "x")
        with pytest.raises(StorageError, match="is a prefix"):
            storage.check(f"{s3_bucket}/dir")
        storage.check(f"{s3_bucket}/dir", kind="dir")

    def test_wrong_credentials(self, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
        storage.write_text(f"{s3_bucket}/a.tsv", "x")
        storage.check(f"{s3_bucket}/a.tsv")
        storage.check(f"{s3_bucket}/out", write=True)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(StorageError, match=rf"{s3_bucket}/a.tsv: access denied .*AWS_SECRET_ACCESS_KEY"):
            storage.check(f"{s3_bucket}/a.tsv")
        with pytest.raises(StorageError, match="access denied while trying to write"):
            storage.check(f"{s3_bucket}/out", write=True)

    def test_unreachable_endpoint(self, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
        from tests.support.s3_server import free_port

        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        started = time.monotonic()
        with pytest.raises(StorageError, match=rf"{s3_bucket}/a.tsv: the storage endpoint {dead} does not answer"):
            storage.check(f"{s3_bucket}/a.tsv")
        assert time.monotonic() - started < 60  # bounded retries, not the SDK's minutes

"""Inputs on object storage (issue 18, inputs): data files, model folders and a teacher on a bucket, the
preflight probes of every input URI, ``orchestrator predict s3://...`` and the registry's artifact URIs, against a
real S3 endpoint (moto's server on 127.0.0.1; no Ray)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator import storage
from orchestrator.config import DataSource
from orchestrator.data.readers import RowReader
from orchestrator.data.sources import scan_source
from orchestrator.errors import DataError

ROWS = "sentence\tlabel\n" + "".join(f"row number {i}\t{i % 2}\n" for i in range(20))


@pytest.fixture(autouse=True)
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's node cache (the per-node copies of remote inputs)."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _scan(path: str, on_bad_rows: str = "error", **fields: str):
    source = DataSource(path=path, text_column="sentence", **fields)
    return scan_source(source, task="sequence-classification", label_to_id=None, on_bad_rows=on_bad_rows,
                       collect_labels={})


def _copies(node_cache: Path) -> list[Path]:
    folder = node_cache / "remote"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


# --------------------------------------------------------------------------------------------------
# Data files on the bucket
# --------------------------------------------------------------------------------------------------


def test_a_data_file_on_the_bucket_scans_and_reads_as_the_same_local_file(
    s3_bucket: str, tmp_path: Path, node_cache: Path
) -> None:
    local = tmp_path / "train.tsv"
    local.write_text(ROWS)
    uri = storage.join(s3_bucket, "data", "train.tsv")
    storage.upload(local, uri)
    remote, here = _scan(uri), _scan(str(local))
    assert remote.path == uri and remote.name == "train"  # the URI, not the cache file, and the name from it
    assert remote.version == storage.stat(uri).version and here.version is None
    assert remote.sha256 == here.sha256 and np.array_equal(remote.offsets, here.offsets)
    assert np.array_equal(remote.labels, here.labels)
    reader = RowReader(remote)
    try:
        assert [reader.get(i)["text"] for i in (0, 7, 19)] == ["row number 0", "row number 7", "row number 19"]
    finally:
        reader.close()
    assert len(_copies(node_cache)) == 1  # the driver's copy is the one the node's readers use


def test_bad_rows_on_the_bucket_are_named_by_uri_and_line(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "bad.tsv")
    storage.write_text(uri, "sentence\tlabel\ngood row\t0\nonly one column\nanother\t1\n")
    with pytest.raises(DataError) as info:
        _scan(uri)
    assert str(info.value).startswith(f"{uri}:3: expected 2 tab-separated columns, found 1")
    assert "cache" not in str(info.value)
    skipped = _scan(uri, on_bad_rows="skip")
    assert len(skipped) == 2 and skipped.bad_examples[0].startswith(f"{uri}:3:")
    other = storage.join(s3_bucket, "header.tsv")
    storage.write_text(other, "text\tlabel\nx\t0\n")
    with pytest.raises(DataError) as info:
        _scan(other)
    assert str(info.value).startswith(f"{other}: line 1: data.*.text_column 'sentence' is not a column")


def test_missing_empty_and_prefix_data_uris_are_data_errors(s3_bucket: str) -> None:
    with pytest.raises(DataError, match=r"missing\.tsv: data file not found \(no such object"):
        _scan(storage.join(s3_bucket, "missing.tsv"))
    storage.write_text(storage.join(s3_bucket, "empty.tsv"), "")
    with pytest.raises(DataError, match=r"empty\.tsv: the file is empty"):
        _scan(storage.join(s3_bucket, "empty.tsv"))
    storage.write_text(storage.join(s3_bucket, "folder", "part.tsv"), ROWS)
    with pytest.raises(DataError, match=r"folder: not a file but a prefix"):
        _scan(storage.join(s3_bucket, "folder"))


def test_parquet_on_the_bucket_scans_and_reads(s3_bucket: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"sentence": [f"text {i}" for i in range(9)], "label": [i % 3 for i in range(9)]}), local)
    uri = storage.join(s3_bucket, "rows.parquet")
    storage.upload(local, uri)
    scanned = _scan(uri)
    assert len(scanned) == 9 and scanned.format == "parquet" and scanned.path == uri
    reader = RowReader(scanned)
    assert reader.get(4)["text"] == "text 4"
    reader.close()


def test_a_data_object_changed_after_the_scan_is_an_error_naming_it(s3_bucket: str, node_cache: Path) -> None:
    uri = storage.join(s3_bucket, "train.tsv")
    storage.write_text(uri, ROWS)
    scanned = _scan(uri)
    for copy in _copies(node_cache):  # another node: no copy yet
        copy.unlink()
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    storage.write_text(uri, ROWS.replace("row number", "changed row"))
    reader = RowReader(scanned)
    with pytest.raises(DataError, match=rf"{uri}: the object changed after the job scanned it"):
        reader.get(0)


# --------------------------------------------------------------------------------------------------
# Preflight: every input URI probed before Ray starts
# --------------------------------------------------------------------------------------------------

PROBE_CASES = {
    "missing bucket": "does not exist",
    "missing key": "no such file or object",
    "wrong credentials": "access denied",
    "unreachable endpoint": "does not answer",
}


def _refuse_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad input got as far as ray.init: the job would have taken cluster resources")

    monkeypatch.setattr(ray, "init", refuse)


def _bad_uri(case: str, bucket: str, good: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The URI (and environment) of one kind of unreadable input."""
    from tests.support.s3_server import free_port

    if case == "missing bucket":
        return good.replace(bucket, "s3://no-such-bucket-anywhere")
    if case == "missing key":
        return good + "-missing"
    if case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    return good


def _job(tiny_models: dict[str, Path], shared_data: Path, out: Path) -> dict:
    from tests.conftest import tiny_job

    return tiny_job("inputs", tiny_models["bert"], shared_data, out)


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_preflight_names_the_field_and_uri_of_an_unreadable_data_file(
    case: str, s3_bucket: str, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.errors import ConfigError

    good = storage.join(s3_bucket, "data", "train.tsv")
    storage.write_text(good, ROWS)
    uri = _bad_uri(case, s3_bucket, good, monkeypatch)
    job = _job(tiny_models, shared_data, tmp_path / "runs")
    job["data"]["train"]["path"] = uri
    _refuse_ray(monkeypatch)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        run_training(config_from_dict(job))
    issues = [i for i in info.value.issues if i.location.startswith("data")]
    assert [i.location for i in issues] == ["data.train.path"], info.value  # probed once, not scanned again
    assert issues[0].message.startswith(uri) and PROBE_CASES[case] in issues[0].message, issues[0].message
    assert time.monotonic() - started < 60  # an endpoint that does not answer fails in seconds


@pytest.mark.parametrize("case", ["missing key", "wrong credentials"])
def test_preflight_names_an_unreadable_model_and_teacher(
    case: str, s3_bucket: str, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.cluster.preflight import preflight
    from orchestrator.config import config_from_dict
    from orchestrator.errors import ConfigError

    model = storage.join(s3_bucket, "models", "bert")
    storage.upload(tiny_models["bert"], model)
    uri = _bad_uri(case, s3_bucket, model, monkeypatch)
    job = _job(tiny_models, shared_data, tmp_path / "runs")
    job["model"]["path"] = uri
    job["method"] = "distill"
    job["distill"] = {"teacher": uri}
    with pytest.raises(ConfigError) as info:
        preflight(config_from_dict(job))
    by_field = {i.location: i.message for i in info.value.issues}
    assert set(by_field) == {"model.path", "distill.teacher"}, info.value
    assert all(m.startswith(uri) and PROBE_CASES[case] in m for m in by_field.values()), by_field


# --------------------------------------------------------------------------------------------------
# model.path and distill.teacher on the bucket
# --------------------------------------------------------------------------------------------------


def test_a_model_on_the_bucket_passes_preflight_without_its_weights_and_is_fetched_once_per_node(
    s3_bucket: str, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path, node_cache: Path
) -> None:
    from orchestrator.cluster.preflight import preflight
    from orchestrator.config import config_from_dict
    from orchestrator.models.loading import fetch_model, load_model

    model = storage.join(s3_bucket, "models", "bert")
    storage.upload(tiny_models["bert"], model)
    job = _job(tiny_models, shared_data, tmp_path / "runs")
    job["model"]["path"] = model + "/"
    job["method"] = "distill"
    job["distill"] = {"teacher": model}
    checked = preflight(config_from_dict(job))
    assert checked.model_path == model  # the URI goes to the workers, which fetch it
    driver_copies = _copies(node_cache)
    assert len(driver_copies) == 1 and (driver_copies[0] / "config.json").is_file()
    assert not list(driver_copies[0].glob("*.safetensors"))  # the driver read config and tokenizer only

    local = fetch_model(model)
    assert Path(local, "model.safetensors").is_file()
    stamp = Path(local, "model.safetensors").stat().st_mtime_ns
    assert fetch_model(model, cached_only=True) == local  # the node's other ranks reuse the copy
    assert Path(local, "model.safetensors").stat().st_mtime_ns == stamp
    loaded = load_model(local, task="sequence-classification", label_names=["0", "1"])
    assert loaded.config.num_labels == 2


def test_a_uri_without_a_model_folder_is_refused_naming_it(s3_bucket: str) -> None:
    from orchestrator.errors import ModelError
    from orchestrator.models.loading import resolve_model_path

    storage.write_text(storage.join(s3_bucket, "models", "x", "README.md"), "not a model")
    with pytest.raises(ModelError, match=r"models/x' is not a Hugging Face model folder \(no config.json"):
        resolve_model_path(storage.join(s3_bucket, "models", "x"))
    assert resolve_model_path("minilm").endswith("model")  # aliases resolve as before


# --------------------------------------------------------------------------------------------------
# The registry records artifact URIs; orchestrator predict s3://...
# --------------------------------------------------------------------------------------------------


def _bucket_run(s3_bucket: str, tiny_models: dict[str, Path], tmp_path: Path, name: str = "job"):
    """A finished run whose output.dir is on the bucket: its final/ there, the registry a local file."""
    from orchestrator.cluster.results import TrainResult
    from orchestrator.config import config_from_dict

    out = storage.join(s3_bucket, "runs")
    final = storage.join(out, name, "final")
    storage.upload(tiny_models["bert"], final)
    config = config_from_dict({
        "name": name,
        "model": {"path": str(tiny_models["bert"])},
        "data": {"train": {"path": storage.join(s3_bucket, "train.tsv")}},
        "output": {"dir": out, "registry": str(tmp_path / "registry.sqlite")},
    })  # fmt: skip
    result = TrainResult(run_dir=storage.join(out, name), metrics={"sst2/accuracy": 0.8, "step": 6}, best_metric=0.8,
                         final_model=final, best_model=None, checkpoint_path=None, wandb=None, data={})
    return config, result, final


def test_a_bucket_run_registers_a_hashed_version_folder_on_the_same_store(
    s3_bucket: str, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.lifecycle.artifact_store import MANIFEST_FILE, ArtifactChangedError, sha256_file
    from orchestrator.lifecycle.registry import Registry
    from orchestrator.lifecycle.run_registration import register_run

    config, result, final = _bucket_run(s3_bucket, tiny_models, tmp_path)
    record = register_run(config, result)
    assert record is not None and record.artifact.startswith(f"{s3_bucket}/runs/registry-artifacts/job/")
    names = {e.path[len(record.artifact) + 1 :] for e in storage.list_files(record.artifact)}
    assert names == set(record.files) | {MANIFEST_FILE}  # every file of the export, and its manifest
    assert record.files["model.safetensors"] == sha256_file(tiny_models["bert"] / "model.safetensors")
    reg = Registry(tmp_path / "registry.sqlite")
    assert reg.find_by_artifact(record.artifact).id == record.id

    storage.write_text(storage.join(final, "config.json"), "{}")  # the next run of the name rewrites final/
    assert reg.promote(record.id).status == "champion"  # the version folder did not change
    monkeypatch.setenv("COLUMNS", "250")
    shown = CliRunner().invoke(app, ["registry", "show", record.id, "--registry", str(reg.path)])
    assert shown.exit_code == 0 and record.artifact in shown.output.replace("\n", ""), shown.output

    time.sleep(1.1)  # a new LastModified: the machine's copy is fetched again and hashed
    storage.write_text(storage.join(record.artifact, "config.json"), "{}")
    with pytest.raises(ArtifactChangedError, match=r"config.json changed"):
        reg.verify(record.id)


def test_a_job_warm_started_from_a_registered_uri_names_its_parent(
    s3_bucket: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from orchestrator.lifecycle.run_registration import register_run

    config, result, _ = _bucket_run(s3_bucket, tiny_models, tmp_path)
    first = register_run(config, result)
    warm, warm_result, _ = _bucket_run(s3_bucket, tiny_models, tmp_path, name="warm")
    warm = warm.model_copy(update={"model": warm.model.model_copy(update={"path": first.artifact})})
    second = register_run(warm, warm_result)
    assert second.parent_id == first.id and second.artifact != first.artifact


def test_a_registry_on_the_bucket_is_refused_before_training(
    s3_bucket: str, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    from orchestrator.cluster.preflight import preflight
    from orchestrator.config import config_from_dict
    from orchestrator.errors import ConfigError

    job = _job(tiny_models, shared_data, tmp_path / "runs")
    job["output"] = {"dir": storage.join(s3_bucket, "runs")}  # registry: auto -> <bucket>/runs/registry.sqlite
    with pytest.raises(ConfigError, match=r"output.registry: the registry 'auto' \(s3://.*registry.sqlite\) would "
                       r"be on object storage"):
        preflight(config_from_dict(job))


def test_predict_reads_a_model_folder_on_the_bucket(
    s3_bucket: str, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.lifecycle.run_registration import register_run
    from orchestrator.models.loading import load_model, load_tokenizer

    classifier = tmp_path / "classifier"  # a trained classifier's export: a head with label names
    load_model(str(tiny_models["bert"]), task="sequence-classification", label_names=["neg", "pos"]).save_pretrained(
        classifier)
    load_tokenizer(str(tiny_models["bert"])).save_pretrained(classifier)
    config, result, final = _bucket_run(s3_bucket, {"bert": classifier}, tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    done = CliRunner().invoke(app, ["predict", final, "a fine film", "dull"])
    assert done.exit_code == 0, done.output
    assert len([line for line in done.output.splitlines() if "a fine film" in line or "dull" in line]) == 2

    record = register_run(config, result)
    time.sleep(1.1)
    storage.write_text(storage.join(record.artifact, "config.json"), "{}")  # a registered model changed in place
    refused = CliRunner().invoke(app, ["predict", record.artifact, "a fine film"])
    assert refused.exit_code != 0 and "config.json changed" in refused.output, refused.output

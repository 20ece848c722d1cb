"""One storage layer for every path a job reads or writes: local paths and URIs (``s3://``, ``gs://``).

Built on ``pyarrow.fs`` on purpose: Ray Train keeps its checkpoints through the same filesystem objects
(``RunConfig(storage_filesystem=...)``), pyarrow's parquet reader reads from them in ranges, and its S3 and GCS
clients ship in the pyarrow wheel the project already depends on (no s3fs/gcsfs, whose aiobotocore pins fight
boto3's). fsspec would give ETags in listings; pyarrow gives size and modification time, which is what the
watched-prefix and the per-node cache key use (an overwritten object gets a new LastModified).

Endpoint and credentials come only from the standard environment, never from a config: ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for S3-compatible stores (MinIO, Ceph, R2, moto), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or the usual AWS credential chain: profiles, instance
roles), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server.

Every failure a user can cause (no such bucket or key, wrong credentials, an endpoint that does not answer) is a
:class:`StorageError` naming the URI and the fix, raised by :func:`check` before any cluster resource is taken.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.errors import OrchestratorError

REMOTE_SCHEMES = ("s3", "gs", "gcs")
# Connect / request timeouts (seconds): a mistyped endpoint fails in seconds, not after the SDK's minutes of retries.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3


class StorageError(OrchestratorError, OSError):
    """A path or URI cannot be read or written (the message names it and says what to fix)."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``s3://...``, ``gs://...`` (object storage); False for local paths and ``file://``."""
    return urlparse(str(path)).scheme.lower() in REMOTE_SCHEMES


def scheme_of(path: str | os.PathLike[str]) -> str:
    """``s3``, ``gs`` or ``file``; raises for a scheme this layer does not know (``http://``, ``hdfs://``, typos)."""
    text = str(path)
    if "://" not in text:
        return "file"
    scheme = urlparse(text).scheme.lower()
    if scheme == "file":
        return "file"
    if scheme == "gcs":
        return "gs"
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(
            f"{text}: unknown storage scheme {scheme!r}; use a local path, s3://bucket/key or gs://bucket/key"
        )
    return scheme


def normalize(path: str | os.PathLike[str]) -> str:
    """A canonical form: URIs as ``s3://bucket/key`` (no trailing slash), local paths absolute with ``~`` expanded."""
    text = str(path)
    scheme = scheme_of(text)
    if scheme == "file":
        if text.startswith("file://"):
            text = urlparse(text).path
        return str(Path(text).expanduser().resolve())
    parsed = urlparse(text)
    if not parsed.netloc:
        raise StorageError(f"{text}: no bucket in the URI; write it as {scheme}://<bucket>/<key>")
    key = parsed.path.strip("/")
    return f"{scheme}://{parsed.netloc}/{key}" if key else f"{scheme}://{parsed.netloc}"


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base`` / parts, for URIs (``/`` separated) and local paths alike."""
    if is_uri(base):
        return posixpath.join(normalize(base), *(p.strip("/") for p in parts))
    return str(Path(base).expanduser().joinpath(*parts))


def parent(path: str) -> str:
    if is_uri(path):
        uri = normalize(path)
        head, _, _ = uri.rpartition("/")
        return head if "://" in head and head.split("://", 1)[1] else uri
    return str(Path(path).expanduser().parent)


def name_of(path: str | os.PathLike[str]) -> str:
    return posixpath.basename(normalize(path)) if is_uri(path) else Path(path).name


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _s3_filesystem() -> Any:
    import pyarrow.fs as pafs

    # The explicit constructor does not read AWS_ENDPOINT_URL itself (from_uri does, but then takes no timeouts).
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


# One client per scheme and environment, per process: creating an S3 client costs a few ms and a thread pool.
_FILESYSTEMS: dict[tuple[str, tuple[str | None, ...]], Any] = {}
_ENV_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
)


def filesystem_for(path: str | os.PathLike[str]) -> Any:
    """The ``pyarrow.fs.FileSystem`` that serves ``path`` (built from the environment, cached per process)."""
    import pyarrow.fs as pafs

    scheme = scheme_of(path)
    key = (scheme, tuple(os.environ.get(k) for k in _ENV_KEYS))
    if key not in _FILESYSTEMS:
        if scheme == "s3":
            _FILESYSTEMS[key] = _s3_filesystem()
        elif scheme == "gs":
            _FILESYSTEMS[key] = pafs.GcsFileSystem(retry_time_limit=REQUEST_TIMEOUT_S)
        else:
            _FILESYSTEMS[key] = pafs.LocalFileSystem()
    return _FILESYSTEMS[key]


def resolve(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(filesystem, path inside it)``: ``bucket/key`` for URIs, the absolute path for local files."""
    uri = normalize(path)
    if is_uri(uri):
        return filesystem_for(uri), uri.split("://", 1)[1]
    return filesystem_for(uri), uri


def bucket_of(path: str) -> str | None:
    return urlparse(normalize(path)).netloc if is_uri(path) else None


def explain(path: str | os.PathLike[str], exc: BaseException, *, doing: str = "read") -> StorageError:
    """A :class:`StorageError` naming ``path`` for what pyarrow's S3/GCS/local client raised."""
    text = str(exc)
    where = str(path)
    if isinstance(exc, StorageError):
        return exc
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return StorageError(
            f"{where}: the bucket {bucket_of(where)!r} does not exist at this endpoint; create it, or fix the bucket "
            f"name (endpoint: {_endpoint_shown()})"
        )
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "403" in text:
        return StorageError(
            f"{where}: access denied while trying to {doing} it: the credentials are wrong or lack permission; check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's role) and the bucket policy"
        )
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text or "timed out" in text:
        return StorageError(
            f"{where}: the storage endpoint {_endpoint_shown()} does not answer ({text.split(';')[0]}); check "
            "AWS_ENDPOINT_URL and that the store is reachable from this machine"
        )
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{where}: no such file or object; check the path (keys are case-sensitive)")
    if isinstance(exc, PermissionError):
        return StorageError(f"{where}: permission denied while trying to {doing} it; fix its permissions")
    return StorageError(f"{where}: cannot {doing} it ({text})")


def _endpoint_shown() -> str:
    return _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") or "the default AWS endpoint"


@contextmanager
def storage_errors(path: str | os.PathLike[str], doing: str = "read") -> Iterator[None]:
    """Re-raise pyarrow/OS errors about ``path`` as a :class:`StorageError` naming it."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:  # pyarrow raises OSError (and FileNotFoundError) for every failed request
        raise explain(path, exc, doing=doing) from exc


@dataclass(frozen=True)
class Entry:
    """A file found by :func:`list_files`: its full path or URI, size and modification time."""

    path: str
    size: int
    mtime: datetime | None

    @property
    def version(self) -> str:
        """What changes when the object is rewritten: size and modification time (LastModified on S3)."""
        stamp = self.mtime.isoformat() if self.mtime else ""
        return f"{self.size}:{stamp}"


def _uri_of(path: str, fs_path: str) -> str:
    return f"{scheme_of(path)}://{fs_path}" if is_uri(path) else fs_path


def stat(path: str | os.PathLike[str]) -> Entry | None:
    """The file at ``path`` (None when there is none; a folder is not a file)."""
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    with storage_errors(path):
        info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        return None
    return Entry(_uri_of(str(path), inner), int(info.size), info.mtime)


def exists(path: str | os.PathLike[str]) -> bool:
    """A file or folder (a prefix with objects under it, for object stores) is at ``path``."""
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    with storage_errors(path):
        return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike[str]) -> bool:
    """A file (an object, for object stores) is at ``path``; ``~`` is expanded for local paths."""
    return stat(path) is not None


def is_dir(path: str | os.PathLike[str]) -> bool:
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    with storage_errors(path):
        return fs.get_file_info(inner).type == pafs.FileType.Directory


def list_files(prefix: str | os.PathLike[str], *, recursive: bool = True) -> list[Entry]:
    """Every file under ``prefix`` (sorted by path); empty when the prefix has none."""
    import pyarrow.fs as pafs

    fs, inner = resolve(prefix)
    with storage_errors(prefix, "list"):
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    files = [Entry(_uri_of(str(prefix), i.path), int(i.size), i.mtime) for i in infos if i.type == pafs.FileType.File]
    return sorted(files, key=lambda e: e.path)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    fs, inner = resolve(path)
    with storage_errors(path):
        with fs.open_input_stream(inner) as f:
            return f.read()


def read_text(path: str | os.PathLike[str]) -> str:
    return read_bytes(path).decode("utf-8")


def open_input(path: str | os.PathLike[str]) -> Any:
    """A seekable binary file (``pyarrow.NativeFile``): ranged GETs on object stores, no full download."""
    fs, inner = resolve(path)
    with storage_errors(path):
        return fs.open_input_file(inner)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file so no reader ever sees a part of it: local files by rename, objects by one PUT."""
    if not is_uri(path):
        target = Path(normalize(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, inner = resolve(path)
    with storage_errors(path, "write"):
        with fs.open_output_stream(inner) as f:
            f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def make_dirs(path: str | os.PathLike[str]) -> None:
    """Create a local folder; object stores have no folders (a no-op there)."""
    if not is_uri(path):
        Path(normalize(path)).mkdir(parents=True, exist_ok=True)


def delete(path: str | os.PathLike[str]) -> None:
    """Delete a file or a whole folder/prefix; nothing there is not an error."""
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    with storage_errors(path, "delete"):
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(inner)
        elif kind == pafs.FileType.File:
            fs.delete_file(inner)


def upload(local: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """Copy a local file or folder (recursively) to ``destination`` (a URI or a local path)."""
    import pyarrow.fs as pafs

    source = Path(local)
    fs, inner = resolve(destination)
    with storage_errors(destination, "write"):
        if source.is_dir():
            pafs.copy_files(
                str(source.resolve()),
                inner,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
                use_threads=True,
            )
        else:
            if not is_uri(destination):
                Path(inner).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                str(source.resolve()), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )


def download(source: str | os.PathLike[str], local: str | os.PathLike[str]) -> Path:
    """Copy a file or a folder/prefix at ``source`` to the local path ``local``; returns it."""
    import pyarrow.fs as pafs

    fs, inner = resolve(source)
    target = Path(local)
    with storage_errors(source):
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(inner)
        # A folder's own root too: copy_files makes only the subfolders it lists, so a flat folder had none.
        (target if kind == pafs.FileType.Directory else target.parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            inner, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(), use_threads=True
        )
    return target


def cache_root() -> Path:
    """This node's cache folder (``ORCHESTRATOR_CACHE``, default ``~/.cache/orchestrator``)."""
    return Path(os.environ.get("ORCHESTRATOR_CACHE", Path.home() / ".cache" / "orchestrator"))


@contextmanager
def node_lock(name: str) -> Iterator[None]:
    """An exclusive lock among the processes of this node (an flock on a file in the cache folder)."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_copy(
    path: str | os.PathLike[str], *, expect_version: str | None = None, skip: Sequence[str] = ()
) -> Path:
    """A local path with the content of ``path``: the path itself when local; for a URI, a copy in this node's
    cache, downloaded once per node (the ranks of a node take a lock; the first downloads, the others reuse it),
    keyed by the URI and the object's version (size + modification time), so a rewritten object is fetched anew.

    Args:
        path: a local path or a file/folder URI.
        expect_version: the :attr:`Entry.version` the driver saw; a different one now is an error (the object
            changed after the job scanned it), so every rank trains on the same bytes.
        skip: for a folder, ``fnmatch`` patterns of the relative paths left out (a model's weights, when only its
            config and tokenizer are read); a copy with other patterns is another copy.
    """
    if not is_uri(path):
        return Path(normalize(path))
    uri = normalize(path)
    entry = stat(uri)
    if entry is None and not is_dir(uri):
        raise StorageError(f"{uri}: no such file or object; check the path (keys are case-sensitive)")
    files = [] if entry else [e for e in list_files(uri) if not _skipped(e.path[len(uri) + 1 :], skip)]
    version = entry.version if entry else "dir:" + ",".join(e.version for e in files)
    if expect_version is not None and version != expect_version:
        raise StorageError(
            f"{uri}: the object changed after the job scanned it (version {expect_version} then, {version} now); "
            "keep inputs unchanged while a job runs, and start the job again"
        )
    skipped = f"\n{sorted(skip)}" if skip else ""  # a copy without some files is another copy
    key = hashlib.sha256(f"{uri}\n{version}{skipped}".encode()).hexdigest()[:24]
    target = cache_root() / "remote" / f"{key}-{name_of(uri)}"
    if target.exists():
        return target
    with node_lock(f"remote-{key}"):
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))  # same disk: the rename is atomic
            try:
                fetched = staging / name_of(uri)
                if skip and not entry:
                    for e in files:
                        download(e.path, fetched / e.path[len(uri) + 1 :])
                    fetched.mkdir(exist_ok=True)  # a folder whose files were all skipped
                else:
                    download(uri, fetched)
                os.replace(fetched, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _skipped(relative: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(posixpath.basename(relative), p) for p in patterns)


def check(path: str | os.PathLike[str], *, kind: str = "file", write: bool = False) -> None:
    """Probe ``path`` before resources are taken; raises :class:`StorageError` naming it and the fix.

    Args:
        kind: ``"file"`` (must be a file), ``"dir"`` (must exist as a folder/prefix), or ``"any"`` (exists).
        write: probe that the location can be written instead (the bucket exists and a small object can be
            written and deleted); ``kind`` is then ignored.
    """
    uri = normalize(path)
    if not is_uri(uri):
        return  # local paths keep their own, more specific checks (permissions, parents)
    fs, inner = resolve(uri)
    bucket = bucket_of(uri)
    import pyarrow.fs as pafs

    with storage_errors(uri, "write" if write else "read"):
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(
                f"{uri}: the bucket {bucket!r} does not exist at {_endpoint_shown()}; create it, or fix the bucket name"
            )
        if write:
            probe = f"{inner}/.orchestrator-write-probe-{os.getpid()}"
            with fs.open_output_stream(probe) as f:
                f.write(b"")
            fs.delete_file(probe)
            return
        info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(
            f"{uri}: no such file or object in bucket {bucket!r}; check the key (keys are case-sensitive)"
        )
    if kind == "file" and info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: is a prefix (folder), not a file; name the object itself")

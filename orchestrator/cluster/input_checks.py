"""Preflight's probe of every input on object storage: data files, ``model.path`` and ``distill.teacher`` given
as URIs (``s3://``, ``gs://``), before Ray starts or any resource is taken.

Each URI is probed once (``storage.check``); a missing bucket, a missing key, wrong credentials or an endpoint
that does not answer become one :class:`ConfigIssue` at the field that names the URI, and preflight then skips
the scan of that input (the scan would only repeat the same failure in other words). Local paths keep their own
checks (the scan's, the model resolution's).
"""

from __future__ import annotations

import orchestrator.storage as storage
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigIssue


def input_uris(config: JobConfig) -> list[tuple[str, str, str]]:
    """The job's inputs given as URIs: ``(field, uri, kind)`` with kind ``"file"`` (a data object) or ``"dir"``
    (a model folder). Anything with a scheme counts (``file://`` aside), so an unknown scheme is reported too."""
    fields = [("data.train.path", config.data.train.path, "file")]
    fields += [(f"data.eval[{i}].path", source.path, "file") for i, source in enumerate(config.data.eval)]
    fields.append(("model.path", config.model.path, "dir"))
    if config.method == "distill" and config.distill is not None:
        fields.append(("distill.teacher", config.distill.teacher, "dir"))
    return [(f, value, kind) for f, value, kind in fields if "://" in value and not value.startswith("file://")]


def check_input_uris(config: JobConfig) -> list[ConfigIssue]:
    """Probe every input URI of the job; one issue per field whose URI cannot be read.

    The same URI in two fields is probed once (an endpoint that does not answer costs its connect timeout once).
    """
    issues = []
    probed: dict[tuple[str, str], str | None] = {}
    for field, uri, kind in input_uris(config):
        if (uri, kind) not in probed:
            try:
                storage.check(uri, kind=kind)
                probed[uri, kind] = None
            except storage.StorageError as exc:
                probed[uri, kind] = str(exc)
        problem = probed[uri, kind]
        if problem is not None:
            issues.append(ConfigIssue(location=field, message=problem))  # the message names the URI and the fix
    return issues


"""The licence a derived model inherits from its base model, and which licences stop a job before it trains.

Where the licence comes from, first found wins:

1. ``model.license`` in the job (the licence you state: for a base whose card declares none, or the licence you
   hold for it, e.g. an agreement with the rights holder);
2. the base model's card: the YAML front matter of ``README.md`` in the model folder (``license:``, with
   ``license_name:`` for ``other``), else ``config.json``'s ``license``; for a hub id, the ``README.md`` of the
   hub cache (no download: preflight runs before anything is fetched).

How preflight (:func:`orchestrator.cluster.preflight.check_licence`) judges it, :func:`licence_problem`:

* **restricted**, an error unless ``model.allow_restricted_license: true``: a licence that forbids sharing
  derivatives: one of :data:`RESTRICTED_LICENCES` or any licence id with an ``nd`` (no-derivatives) component
  (``cc-by-nd-4.0``, ``cc-by-nc-nd-4.0``, ...); and ``other`` without a ``license_name``
  (custom terms the card does not name, so nobody can check them);
* **unknown**, a warning: no licence found (or the card says ``unknown``); state it with ``model.license``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from orchestrator.errors import ConfigIssue

if TYPE_CHECKING:
    from orchestrator.config import JobConfig

logger = logging.getLogger(__name__)

# The Hub's licence ids that forbid derivatives (https://huggingface.co/docs/hub/repositories-licenses); any other id
# with an "nd" (no-derivatives) component counts too, so a new Creative Commons version needs no edit here.
RESTRICTED_LICENCES: frozenset[str] = frozenset({"cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0"})
UNKNOWN_LICENCES: frozenset[str] = frozenset({"", "unknown", "none", "null"})
_NO_DERIVATIVES = re.compile(r"(^|[-_ ])nd($|[-_ ])")

LicenceProblem = Literal["restricted", "unknown"]


def declared_licence(model_path: str | None) -> str | None:
    """The licence a base model declares: its folder's card (or config.json), else a hub id's cached card."""
    from orchestrator.lifecycle.run_registration import read_licence

    if not model_path:
        return None
    found = read_licence(model_path)
    if found or Path(model_path).is_dir():
        return found
    cached = _cached_hub_card(model_path)
    return read_licence(str(cached.parent)) if cached is not None else None


def _cached_hub_card(repo_id: str) -> Path | None:
    """The README.md of a hub id in the local hub cache, if it is there (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "README.md")
    except Exception:  # not a valid repo id, or no cache at all: no card to read
        return None
    return Path(found) if isinstance(found, str) else None


def job_licence(stated: str | None, model_path: str | None) -> str | None:
    """The licence a job's model is under: ``model.license`` when stated, else what the base model declares."""
    return stated or declared_licence(model_path)


def licence_problem(licence: str | None) -> LicenceProblem | None:
    """Why a licence needs a person's attention before training: 'restricted', 'unknown', or None (fine).

    ``licence`` is as :func:`declared_licence` gives it: an id (``apache-2.0``), ``other (name)`` for a named
    custom licence, or several ids joined by ", " (each is judged; any restricted one wins).
    """
    if licence is None or licence.strip().lower() in UNKNOWN_LICENCES:
        return "unknown"
    for part in licence.split(","):
        value = part.strip().lower()
        if value == "other":  # custom terms, not named: nobody can check them
            return "restricted"
        if value in RESTRICTED_LICENCES or _NO_DERIVATIVES.search(value):
            return "restricted"
    return None


def registered_licence(config: JobConfig, model_path: str) -> str | None:
    """The licence the job's registry recorded for the model at ``model_path`` (a registered model's folder)."""
    from orchestrator.lifecycle.run_registration import registry_path

    path = registry_path(config)
    if path is None or not path.is_file() or "://" in model_path:
        return None
    from orchestrator.lifecycle.registry import Registry

    found = Registry(path).find_by_artifact(model_path)
    return found.licence if found is not None else None


def check_licence(config: JobConfig, model_path: str) -> list[ConfigIssue]:
    """Preflight's licence check of the models a job derives from: model.path, and distill.teacher.

    A licence that forbids derivatives is an error unless ``model.allow_restricted_license`` (then a warning); an
    unknown one is a warning that names ``model.license``. Both go to the log before any resource is taken.

    Returns:
        The errors (one per restricted model, located at the config field).
    """
    stated = config.model.license  # the licence of the parent: model.path, or the teacher of a student
    distill = config.distill if config.method == "distill" else None
    if distill is None:
        models = [("model.path", model_path, job_licence(stated, model_path))]
    else:
        from orchestrator.models.loading import resolve_quietly

        teacher = resolve_quietly(distill.teacher)  # an alias names a package folder
        models = [("distill.teacher", teacher, job_licence(stated, teacher))]
        if distill.student_init != "teacher_layers":  # else model.path only lends its tokenizer
            models.append(("model.path", model_path, declared_licence(model_path)))
    issues = []
    for field, path, licence in models:
        licence = licence or registered_licence(config, path)
        problem = licence_problem(licence)
        if problem == "unknown":
            logger.warning(
                "%s: no licence found for %s (its README.md declares no license:); a derived model inherits the "
                "base model's terms, so check them and state the licence with model.license: <id, e.g. apache-2.0>",
                field, path,
            )  # fmt: skip
        elif problem == "restricted" and config.model.allow_restricted_license:
            logger.warning(
                "%s: the licence of %s (%s) forbids sharing derivatives; model.allow_restricted_license is on, so "
                "this job trains, but its model may not be shared", field, path, licence,
            )  # fmt: skip
        elif problem == "restricted":
            issues.append(
                ConfigIssue(
                    location=field,
                    message=f"the licence of {path} ({licence}) forbids derivatives (or does not name its terms)",
                    hint="choose a base model whose licence allows derivatives; if you hold a licence that does, "
                    "state it with model.license: <id>, or set model.allow_restricted_license: true to train "
                    "a model you will not share",
                )
            )
    return issues

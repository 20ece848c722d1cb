"""A worker's memory, as the ``memory/*`` values of its records report it."""

from __future__ import annotations

import torch


def memory_mb(device: torch.device) -> dict[str, float]:
    """This worker's memory: peak resident set of the process (CPU), or peak allocated CUDA memory."""
    import resource

    values = {"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        values["memory/peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return values


def resident_tensor_mb(device: torch.device) -> float:
    """Memory held by live tensors between steps (no activations then): the model states that the ZeRO paper
    models (parameters, gradients, optimizer moments, fp32 partitions) plus DeepSpeed's flat buffers.

    On GPUs this is the allocator's count. On CPU no allocator keeps one, so the live tensors are found through
    the garbage collector and their storages counted once each (views share a storage); about a second for a
    large process, so it is taken once per run."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - exotic tensor subclasses without a plain storage are skipped
            continue
    return sum(seen.values()) / 2**20

"""Which floating-point precision a job trains in, and the torch dtype of each (shared by the planner on the
driver and the workers)."""

from __future__ import annotations

from typing import Any

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(precision: str) -> Any:
    """The torch dtype weights are loaded and computed in for a precision."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[precision])


def resolve_precision(requested: str, device_type: str) -> str:
    """'auto' is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if requested != "auto":
        if device_type == "cpu" and requested == "fp16":
            raise ValueError("deepspeed.precision: fp16 needs a GPU; use fp32 or bf16 on CPU (or auto)")
        return requested
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"

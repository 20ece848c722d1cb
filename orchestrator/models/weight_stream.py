"""Writing a model's weights without a second copy of the model: tensors gathered a module at a time, streamed
into safetensors shards with an index, in the Hugging Face layout that ``from_pretrained`` loads.

Under ZeRO-3 no rank holds the whole model: :class:`WeightStream` gathers one module's own parameters at a time
on every rank (a collective, so every rank iterates the same modules in the same order), and only rank 0 keeps a
CPU copy of each tensor, long enough for :class:`ShardedWriter` to buffer it into the current shard. Rank 0 thus
holds at most one shard being filled plus one gathered module, never the model. With ZeRO 0-2 every rank holds
the whole model already and nothing is gathered.

This replaces DeepSpeed's ``_zero3_consolidated_16bit_state_dict``, which gathers the same way but collects every
tensor into one state dict on rank 0 (a whole copy of the model), and ``save_pretrained(state_dict=...)``, which
needs that dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

DEFAULT_SHARD_BYTES = 5 * 1024**3  # what Hugging Face Hub uploads use
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardedWriter:
    """Buffers tensors into safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its
    own) and writes the index at :meth:`close`. A writer for ``folder=None`` (ranks other than 0) keeps nothing."""

    def __init__(self, folder: Path | None, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model"):
        self.folder, self.max_shard_bytes, self.prefix = folder, max_shard_bytes, prefix
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.dtypes: set[torch.dtype] = set()

    def add(self, name: str, tensor: torch.Tensor | None) -> None:
        if self.folder is None or tensor is None:
            return
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size
        if tensor.is_floating_point():
            self.dtypes.add(tensor.dtype)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        assert self.folder is not None
        path = self.folder / f".{self.prefix}-part{len(self._shards) + 1}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, name the shards as Hugging Face does, and write the index (more than one shard)."""
        if self.folder is None:
            return
        if self._buffer or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.folder / WEIGHTS_NAME)
            return
        weight_map: dict[str, str] = {}
        count = len(self._shards)
        for number, (path, names) in enumerate(self._shards, start=1):
            final = f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def own_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers, named as in its ``state_dict``."""
    for name, param in module._parameters.items():
        if param is not None:
            yield name, param
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


class WeightStream:
    """A trained module's tensors, gathered a module at a time; every rank must iterate it the same way.

    Args:
        module: the module as trained (the DeepSpeed engine's ``module``).
        is_rank0: whether this rank writes (it alone gets the tensors' CPU copies).
    """

    def __init__(self, module: torch.nn.Module, *, is_rank0: bool):
        self.module = module
        self.is_rank0 = is_rank0
        self.partitioned = any(hasattr(p, "ds_id") for p in module.parameters())

    def sub(self, module: torch.nn.Module) -> WeightStream:
        """The same stream over a submodule (a distillation student), names relative to it."""
        return WeightStream(module, is_rank0=self.is_rank0)

    @contextmanager
    def gathered(self, module: torch.nn.Module, *, recurse: bool = False) -> Iterator[None]:
        """``module``'s parameters whole on every rank while inside (a no-op without ZeRO-3)."""
        params = list(module.parameters(recurse=recurse))
        if not (self.partitioned and params):
            with nullcontext():
                yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def copy(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Rank 0's CPU copy of a (gathered) tensor; None on other ranks."""
        return tensor.detach().to("cpu", copy=True) if self.is_rank0 else None

    def modules(
        self, root: torch.nn.Module | None = None, *, whole: Callable[[torch.nn.Module], bool] = lambda m: False
    ) -> Iterator[tuple[str, torch.nn.Module]]:
        """``(prefix, module)`` for ``root`` and every submodule, each with its own parameters gathered while the
        caller holds it; a module for which ``whole(module)`` is true comes with all its parameters gathered at
        once, and its submodules are not visited (a LoRA layer: its base weight and adapters together)."""
        seen: set[int] = set()

        def visit(prefix: str, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
            if id(module) in seen:
                return
            seen.add(id(module))
            is_whole = whole(module)
            with self.gathered(module, recurse=is_whole):
                yield prefix, module
            if is_whole:
                return
            for name, child in module._modules.items():
                if child is not None:
                    yield from visit(f"{prefix}.{name}" if prefix else name, child)

        yield from visit("", root if root is not None else self.module)

    def tensors(self, root: torch.nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """``(state_dict name, rank 0's CPU copy or None)`` for every tensor under ``root``; a tied parameter is
        written once, under its first name (as ``save_pretrained`` writes tied embeddings)."""
        seen: set[int] = set()
        for prefix, module in self.modules(root):
            for name, tensor in own_tensors(module):
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield (f"{prefix}.{name}" if prefix else name), self.copy(tensor)


def write_pretrained(
    model: Any,
    tensors: Iterator[tuple[str, torch.Tensor | None]],
    destination: Path | None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """A Hugging Face model folder (config, generation config, sharded safetensors) from streamed tensors.

    Every rank calls this with the same stream; ``destination`` is None on ranks that do not write."""
    writer = ShardedWriter(destination, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    if destination is not None:
        save_model_config(model, destination, writer)


def save_model_config(model: Any, destination: Path, writer: ShardedWriter) -> None:
    """The config (and generation config) ``save_pretrained`` would write beside weights ``writer`` wrote."""
    config = model.config
    config.architectures = [type(model).__name__]
    if writer.dtypes:  # the dtype the weights were written in, as save_pretrained records it
        config.dtype = str(max(writer.dtypes, key=lambda d: torch.finfo(d).bits)).removeprefix("torch.")
    config.save_pretrained(str(destination))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(destination))

"""LoRA (PEFT): low-rank adapters on chosen linear layers; the pretrained weights stay frozen.

Works under every ZeRO stage because adapters are added before ``deepspeed.initialize``: DeepSpeed
only ever sees the trainable LoRA (and head) parameters in its optimizer. Under ZeRO-3 the frozen base is
partitioned from the start (``orchestrator.models.zero3_loading``). Exports stream the weights a layer at a
time (``orchestrator.models.weight_stream``): the merged model is written layer by layer, each LoRA layer merged
while it is gathered, never in a whole copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig, LoraSection
from orchestrator.errors import ConfigIssue, ModelError
from orchestrator.methods.base import MethodContext, TrainBatchOutput, model_loss
from orchestrator.models.weight_stream import ShardedWriter, WeightStream, own_tensors, save_model_config

# Defaults by `config.model_type`; users override with lora.target_modules.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def target_modules_for(model_type: str, lora: LoraSection) -> list[str]:
    if lora.target_modules:
        return list(lora.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise ModelError(
            f"lora.target_modules: no default for model type {model_type!r}; list the linear layers to adapt "
            "(e.g. [q_proj, v_proj])"
        )
    return DEFAULT_TARGETS[model_type]


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target must match at least one linear-like module (by name suffix, as PEFT matches)."""
    names = [n for n, m in model.named_modules() if n and not list(m.children())]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaf_kinds = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ModelError(
            f"lora.target_modules: {missing} match no module of {type(model).__name__}; its module names are: "
            f"{', '.join(leaf_kinds)}"
        )


def peft_config(config: JobConfig, model_type: str) -> Any:
    from peft import LoraConfig, TaskType

    lora = config.lora or LoraSection()
    task = TaskType.SEQ_CLS if config.model.task == "sequence-classification" else TaskType.CAUSAL_LM
    return LoraConfig(
        task_type=task,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules_for(model_type, lora),
        modules_to_save=lora.modules_to_save,
        bias=lora.bias,
    )


class LoraMethod:
    name = "lora"

    def preflight(self, config: JobConfig, model_path: str) -> list[ConfigIssue]:
        """Check the targets on a weightless (meta-device) copy of the model, before any cluster work."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        try:
            hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
            auto = AutoModelForCausalLM if config.model.task == "causal-lm" else AutoModelForSequenceClassification
            with torch.device("meta"):
                model = auto.from_config(hf_config)
            check_targets(model, target_modules_for(hf_config.model_type, config.lora or LoraSection()))
        except ModelError as exc:
            return [
                ConfigIssue(
                    location="lora.target_modules",
                    message=str(exc).split(": ", 1)[-1],
                    hint="set lora.target_modules to linear layers of this model (a module name or its last part, "
                    "as PEFT matches them)",
                )
            ]
        return []

    def prepare_model(self, model: torch.nn.Module, config: JobConfig, context: MethodContext) -> torch.nn.Module:
        from peft import get_peft_model

        lora_config = peft_config(config, model.config.model_type)
        check_targets(model, list(lora_config.target_modules))
        return get_peft_model(model, lora_config)

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
        return model_loss(model, batch)

    def save_weights(
        self, module: torch.nn.Module, weights: WeightStream, destination: Path | None, config: JobConfig
    ) -> None:
        """The adapter (PEFT's folder) and, with ``lora.merge_on_export``, the merged model beside it: one pass over
        the weights, a LoRA layer at a time (its base weight and adapters gathered together), merged in place of
        a fresh copy of the model."""
        lora = config.lora or LoraSection()
        merged = ShardedWriter(
            destination if lora.merge_on_export else None, max_shard_bytes=config.output.max_shard_bytes
        )
        adapter: dict[str, torch.Tensor] = {}
        for adapter_key, merged_key, tensor in lora_tensors(module, weights):
            if tensor is None:
                continue
            if adapter_key is not None:
                adapter[adapter_key] = tensor
            if merged_key is not None:
                merged.add(merged_key, tensor)
        merged.close()
        if destination is None:
            return
        adapter_dir = destination / "adapter" if lora.merge_on_export else destination
        module.save_pretrained(str(adapter_dir), state_dict=adapter, safe_serialization=True)
        if lora.merge_on_export:
            save_model_config(module.get_base_model(), destination, merged)


PEFT_PREFIX = "base_model.model."


def _merged_name(peft_name: str) -> str:
    """A PEFT model's tensor name in the merged plain model (what ``merge_and_unload`` would name it)."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def lora_tensors(
    module: torch.nn.Module, weights: WeightStream
) -> Iterator[tuple[str | None, str | None, torch.Tensor | None]]:
    """``(adapter name or None, merged-model name or None, rank 0's CPU copy)`` of every tensor of a PEFT model.

    A LoRA layer gives its adapter matrices (adapter only) and its merged weight ``W + ΔW`` (merged only,
    computed by PEFT's ``get_delta_weight`` on the gathered layer); a ``modules_to_save`` copy (the head) goes to
    both; its frozen original is left out; every other tensor is the merged model's as it is."""
    from peft.tuners.lora import LoraLayer

    seen: set[int] = set()
    for prefix, layer in weights.modules(whole=lambda m: isinstance(m, LoraLayer)):
        if isinstance(layer, LoraLayer):
            yield from _lora_layer_tensors(prefix, layer, weights)
            continue
        for name, tensor in own_tensors(layer):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            key = f"{prefix}.{name}" if prefix else name
            if ".original_module." in key:
                continue
            adapter_key = key if ".modules_to_save." in key else None
            yield adapter_key, _merged_name(key), weights.copy(tensor)


def _lora_layer_tensors(
    prefix: str, layer: Any, weights: WeightStream
) -> Iterator[tuple[str | None, str | None, torch.Tensor | None]]:
    for name, param in layer.named_parameters():
        if "lora_" in name:
            yield f"{prefix}.{name}", None, weights.copy(param)
    base = layer.get_base_layer()
    with torch.no_grad():
        merged = base.weight + layer.get_delta_weight("default").to(base.weight.dtype)
    yield None, _merged_name(f"{prefix}.weight"), weights.copy(merged)
    if getattr(base, "bias", None) is not None:
        yield None, _merged_name(f"{prefix}.bias"), weights.copy(base.bias)

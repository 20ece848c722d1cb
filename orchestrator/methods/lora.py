"""LoRA (PEFT): low-rank adapters on chosen linear layers; the pretrained weights stay frozen.

Works under every ZeRO stage because adapters are added before ``deepspeed.initialize``: DeepSpeed
only ever sees the trainable LoRA (and head) parameters in its optimizer. Exports gather the full
state dict first (ZeRO-3 shards even LoRA weights) and merge in a fresh CPU copy, never in the
sharded training module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig, LoraSection
from orchestrator.errors import ConfigIssue, ModelError
from orchestrator.methods.base import MethodContext, TrainBatchOutput, model_loss

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
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], destination: Path, config: JobConfig
    ) -> None:
        lora = config.lora or LoraSection()
        adapter_dir = destination / "adapter" if lora.merge_on_export else destination
        module.save_pretrained(str(adapter_dir), state_dict=state, safe_serialization=True)
        if lora.merge_on_export:
            merge_into_full_model(module, state).save_pretrained(str(destination), safe_serialization=True)


def merge_into_full_model(peft_module: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain HF model with the adapters merged, built as a fresh CPU copy from the gathered state
    (the training module may be ZeRO-3 sharded, so it is never merged in place)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_config = peft_module.get_base_model().config
    auto = AutoModelForCausalLM if peft_module.peft_config["default"].task_type == "CAUSAL_LM" else (
        AutoModelForSequenceClassification
    )
    fresh = get_peft_model(auto.from_config(base_config), peft_module.peft_config["default"])
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return fresh.merge_and_unload()

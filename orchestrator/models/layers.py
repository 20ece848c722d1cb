"""Finding a model's layer groups: embeddings, the transformer blocks (bottom to top), and the head.

Unfreezing schedules, discriminative learning rates, hidden-state distillation and student-from-teacher
initialisation all need the same view of a model. Known families (BERT-style, GPT-2-style,
Llama-style, also inside a PEFT wrapper) are found from the module tree: the blocks are the longest
``nn.ModuleList`` of identical modules; everything else is embeddings (names with ``embed``,
``wte``, ``wpe``) or head. Other architectures can name their groups with regular expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from orchestrator.errors import ModelError

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


@dataclass
class LayerGroups:
    """Parameter names of each group; group order is embeddings, block 0 .. block n-1, head."""

    embeddings: list[str]
    blocks: list[list[str]]
    head: list[str]
    block_modules: list[str] = field(default_factory=list)  # module name of each block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def ordered(self) -> list[list[str]]:
        """Groups bottom to top: [embeddings, block 0, ..., block n-1, head]."""
        return [self.embeddings, *self.blocks, self.head]

    def names(self) -> list[str]:
        return ["embeddings", *(f"block{i}" for i in range(self.num_blocks)), "head"]


def find_blocks_module(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The longest ModuleList whose children are all of one class (the transformer blocks)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ModelError(
            f"cannot find the transformer blocks of {type(model).__name__} (no nn.ModuleList of layers); name the "
            "groups with unfreeze.block_pattern (a regex with one group for the block index), "
            "unfreeze.embedding_patterns and unfreeze.head_patterns"
        )
    return best


def find_layer_groups(
    model: torch.nn.Module,
    *,
    block_pattern: str | None = None,
    embedding_patterns: list[str] | None = None,
    head_patterns: list[str] | None = None,
) -> LayerGroups:
    """Split a model's parameters into embeddings, blocks and head.

    Args:
        model: any torch module (a HF model, possibly wrapped by PEFT).
        block_pattern: regex matched against parameter names, whose first group is the block index
            (e.g. r"encoder\\.layer\\.(\\d+)\\."); overrides the automatic search.
        embedding_patterns: regexes of embedding parameters (default: names containing embed/wte/wpe).
        head_patterns: regexes of head parameters (default: everything else above the blocks).

    Raises:
        ModelError: when no blocks can be found or a pattern matches no parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    if block_pattern:
        regex = re.compile(block_pattern)
        by_index: dict[int, list[str]] = {}
        for n in names:
            match = regex.search(n)
            if match:
                by_index.setdefault(int(match.group(1)), []).append(n)
        if not by_index:
            raise ModelError(f"unfreeze.block_pattern {block_pattern!r} matches no parameter; examples: {names[:5]}")
        blocks = [by_index[i] for i in sorted(by_index)]
        block_modules = _block_modules(blocks, block_pattern)
    else:
        prefix, module_list = find_blocks_module(model)
        blocks = []
        block_modules = []
        for i in range(len(module_list)):
            block_prefix = f"{prefix}.{i}."
            blocks.append([n for n in names if n.startswith(block_prefix)])
            block_modules.append(f"{prefix}.{i}")
    in_blocks = {n for block in blocks for n in block}
    rest = [n for n in names if n not in in_blocks]
    if embedding_patterns:
        emb_regexes = [re.compile(p) for p in embedding_patterns]
        embeddings = [n for n in rest if any(r.search(n) for r in emb_regexes)]
    else:
        embeddings = [n for n in rest if any(h in n.lower() for h in _EMBEDDING_HINTS)]
    if head_patterns:
        head_regexes = [re.compile(p) for p in head_patterns]
        head = [n for n in rest if n not in embeddings and any(r.search(n) for r in head_regexes)]
        if not head:
            raise ModelError(f"unfreeze.head_patterns {head_patterns} match no parameter outside the blocks")
    else:
        head = [n for n in rest if n not in embeddings]
    return LayerGroups(embeddings=embeddings, blocks=blocks, head=head, block_modules=block_modules)


def _block_modules(blocks: list[list[str]], block_pattern: str) -> list[str]:
    """The module of each block named by ``unfreeze.block_pattern``: the deepest module holding all of its
    parameters. The backward stop hooks these modules, so each block needs one of its own.

    Raises:
        ModelError: when a block's parameters share no module below the model, or two blocks share one.
    """
    modules = []
    for index, names in enumerate(blocks):
        owners = [name.split(".")[:-1] for name in names]  # the module path of each parameter
        common: list[str] = []
        for parts in zip(*owners):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        if not common:
            raise ModelError(
                f"unfreeze.block_pattern {block_pattern!r}: block {index}'s parameters ({', '.join(names[:3])}) have "
                "no module of its own; the pattern must match one submodule per block, e.g. "
                r"r'encoder\.layer\.(\d+)\.' for BERT's encoder.layer.<i>"
            )
        modules.append(".".join(common))
    for i, outer in enumerate(modules):
        for j, inner in enumerate(modules):
            if i != j and (inner == outer or inner.startswith(outer + ".")):
                raise ModelError(
                    f"unfreeze.block_pattern {block_pattern!r}: blocks {i} and {j} share the module {outer!r}; the "
                    "pattern must match one submodule per block"
                )
    return modules

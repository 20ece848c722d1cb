"""Post-training quantization on CPU with torchao, saved so that plain ``AutoModel*.from_pretrained`` loads it.

How: the model is loaded with a ``transformers.TorchAoConfig`` (weights quantized as they load) and written with
``save_pretrained``: ``config.json`` then carries the ``quantization_config`` and any ``from_pretrained(folder)``
(torchao installed) rebuilds the int8 tensors. Weights go to **safetensors**: transformers 5.24 flattens torchao's
tensor subclass (``Int8Tensor``) into plain tensors plus JSON metadata and
rebuilds them on load (torchao >= 0.14, ``torchao.prototype.safetensors``); ``.bin`` would pickle the subclasses,
which ``torch.load(weights_only=True)`` refuses. Works with torchao 0.18.0 on torch 2.13 (CPU) and transformers 5.24.

Methods (:data:`METHODS`), both int8 per output channel on every ``nn.Linear`` but the output layer:

* ``int8-dynamic`` (the default): int8 weights and int8 activations quantized per token at run time, so the
  matmuls run as int8 x int8 (``torch._int_mm``). Measured on MiniLM fine-tuned on SST-2 (CPU, 1 thread, batch
  of 32): 0.54x the fp32 latency, accuracy 0.8234 -> 0.8222 (benchmarks/quantize.py).
* ``int8-weight``: int8 weights only, dequantized for an fp32 matmul at every call: the same size, but on CPU
  *slower* than fp32 (1.07x the latency in the same measurement), so it is for memory-bound use only.

The input word embeddings (half of MiniLM's 22.7M parameters) are no ``nn.Linear``, so linear-only quantization
leaves them fp32 and the weights shrink only to 0.65x. ``embeddings: int8`` quantizes them too (int8 per row,
weight-only: ``Int8WeightOnlyConfig``, as a lookup has no matmul to speed up): 0.26x of the fp32 bytes for MiniLM.
bf16 embeddings (about 0.39x) cannot be expressed in a ``TorchAoConfig``: the loader casts every plain weight to
the config's one dtype.

torchao 0.18 looks an int8 embedding up by dequantizing the *whole* table first (``aten.embedding`` of
``Int8Tensor``): about 0.1 s per forward pass for MiniLM's 30522 x 384 table on one thread, which would eat the
int8 matmuls' gain. :func:`use_rows_first_embeddings` adds torchao's missing ``F.embedding`` override for per-row
``Int8Tensor`` tables (gather the int8 rows and their scales, then dequantize only those: the same numbers,
1 ms): :func:`load_model` and :func:`quantize_folder` install it. A process that loads the folder with nothing but
transformers gets identical outputs, just the slow lookup. For that reason ``embeddings: auto`` (the default) is
int8 for classifiers (one lookup per forward pass) and fp32 for causal LMs (one lookup per generated token). An
embedding tied to the output layer (GPT-2) stays fp32 either way: quantizing it would untie it and store an fp32
copy for the output layer.

Kept in full precision: the classifier's output layer and a causal LM's ``lm_head`` (a few rows of a
classifier, the vocabulary logits of a causal LM: where int8 rounding changes the argmax most), layer norms and
biases. Everything here runs in one process without workers or Ray.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelError
from orchestrator.models.loading import classifier_output_layer, read_model_config

METHODS = ("int8-dynamic", "int8-weight")
DEFAULT_METHOD = "int8-dynamic"
EMBEDDINGS = ("auto", "int8", "fp32")  # the input embedding: int8 (classifiers) / fp32 (causal LMs), or as given
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_method(method: str) -> str:
    """The method, checked before any work.

    Raises:
        ModelError: an unknown method, listing the known ones.
    """
    if method not in METHODS:
        raise ModelError(f"--method: unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    return method


def check_embeddings(embeddings: str) -> str:
    """The embeddings choice, checked before any work.

    Raises:
        ModelError: not one of :data:`EMBEDDINGS`.
    """
    if embeddings not in EMBEDDINGS:
        raise ModelError(f"--embeddings: unknown choice {embeddings!r}; use one of {', '.join(EMBEDDINGS)}")
    return embeddings


def quiet_torchao() -> None:
    """torchao logs a warning for each CUDA kernel library it cannot load, which a CPU machine never can."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def use_rows_first_embeddings() -> None:
    """Make ``F.embedding`` of a per-row ``Int8Tensor`` table gather the int8 rows (and their scales and zero points)
    before dequantizing them, instead of dequantizing the whole table at every lookup (torchao 0.18's only path).

    The result equals torchao's (dequantization is row-wise for per-row scales); other tables, and lookups that
    renormalise rows (``max_norm``), keep torchao's path. Registered in torchao's own table of function overrides
    for ``Int8Tensor``, once per process.
    """
    import torch
    from torchao.quantization import Int8Tensor

    table = getattr(Int8Tensor, "_TORCH_FN_TABLE", {}).get(Int8Tensor, {})
    if getattr(table.get(torch.nn.functional.embedding), "__name__", "") == "_rows_first_embedding":
        return

    @Int8Tensor.implements_torch_function(torch.nn.functional.embedding)
    def _rows_first_embedding(func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        indices, weight, *rest = args
        max_norm = rest[1] if len(rest) > 1 else kwargs.get("max_norm")
        per_row = isinstance(weight, Int8Tensor) and list(weight.block_size) == [1, weight.shape[-1]]
        if not per_row or max_norm is not None or weight.dim() != 2:
            return torch.nn.functional.embedding(indices, weight.dequantize(), *rest, **kwargs)
        rows = torch.nn.functional.embedding(indices, weight.qdata).to(weight.dtype)
        if weight.zero_point is not None:
            rows = rows - torch.nn.functional.embedding(indices, weight.zero_point.reshape(weight.shape[0], 1))
        return rows * torch.nn.functional.embedding(indices, weight.scale.reshape(weight.shape[0], 1))


def model_task(path: str) -> str:
    """``sequence-classification`` or ``causal-lm``, from the folder's ``architectures``.

    Raises:
        ModelError: the folder is neither (a base encoder would be saved with a fresh, untrained head).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = read_model_config(path).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a in causal or a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    raise ModelError(
        f"{path}: a {', '.join(architectures) or 'model without architectures in config.json'}, neither a sequence "
        "classifier nor a causal LM; quantize a trained model's export (a run's final/ folder)"
    )


def auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def load_model(path: str | Path, task: str) -> Any:
    """A model folder (fp32 or quantized) with plain ``from_pretrained``, in eval mode (int8 embedding rows looked
    up first: :func:`use_rows_first_embeddings`)."""
    quiet_torchao()
    if (read_model_config(str(path)).get("quantization_config") or {}).get("quant_method") == "torchao":
        use_rows_first_embeddings()
    return auto_class(task).from_pretrained(str(path)).eval()


def weight_bytes(folder: str | Path) -> int:
    """Bytes of a model folder's weight files (safetensors or pickled, shards included)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


# --------------------------------------------------------------------------------------------------
# Which weights get which torchao config
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantizationPlan:
    """The weights to quantize: linear weights (the method's config) and the input embedding's (int8 rows)."""

    linear: list[str]
    embedding: str | None
    kept: list[str] = field(default_factory=list)  # modules left in full precision, by name


def plan_weights(model: Any, task: str, embeddings: str = "auto") -> QuantizationPlan:
    """What :func:`quantize_folder` quantizes in ``model`` (a skeleton on the meta device is enough)."""
    import torch

    kept = [_output_layer_name(model, task)]
    inputs = model.get_input_embeddings()
    outputs = model.get_output_embeddings()
    tied = outputs is not None and getattr(outputs, "weight", None) is getattr(inputs, "weight", None)
    wanted = check_embeddings(embeddings) == "int8" or (embeddings == "auto" and task != "causal-lm")
    linear, embedding = [], None
    for name, module in model.named_modules():
        if name in kept:
            continue
        if isinstance(module, torch.nn.Linear):
            linear.append(f"{name}.weight")
        elif module is inputs and isinstance(module, torch.nn.Embedding):
            if tied or not wanted:
                kept.append(name)
            else:
                embedding = f"{name}.weight"
    return QuantizationPlan(linear=linear, embedding=embedding, kept=kept)


def _output_layer_name(model: Any, task: str) -> str:
    """The module that makes the logits: the classifier's last linear layer, or the LM head."""
    if task == "causal-lm":
        target = model.get_output_embeddings()
    else:
        target = classifier_output_layer(model)[2]
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ModelError(f"cannot find the output layer of {type(model).__name__}")


def _patterns(names: list[str], every: list[str]) -> list[str]:
    """Regular expressions (torchao's ``re:`` keys) that match exactly ``names`` among ``every`` parameter name:
    one per layer-independent name (layer numbers as ``\\d+``), else the exact names, so config.json stays short."""
    wanted, patterns = set(names), []
    for name in dict.fromkeys(re.sub(r"\.\d+\.", ".#.", n) for n in names):
        regex = re.escape(name).replace(r"\.\#\.", r"\.\d+\.").replace(r"\.#\.", r"\.\d+\.")
        matched = {n for n in every if re.fullmatch(regex, n)}
        if matched <= wanted:
            patterns.append(f"re:{regex}")
        else:
            patterns += [n for n in names if re.sub(r"\.\d+\.", ".#.", n) == name]
    return patterns


def torchao_config(model: Any, task: str, method: str, embeddings: str = "auto") -> Any:
    """The ``TorchAoConfig`` of ``method`` for this model: the linear weights and the input embedding's, by name
    (parameter names, not module names: transformers 5.24 would otherwise quantize the linear biases as well)."""
    from torchao.quantization import FqnToConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow
    from transformers import TorchAoConfig

    plan = plan_weights(model, task, embeddings)
    every = [name for name, _ in model.named_parameters()]
    # set_inductor_config=False: the recommended inductor settings are for torch.compile, which this does not use.
    linear = (
        Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        if check_method(method) == "int8-dynamic"
        else Int8WeightOnlyConfig(set_inductor_config=False)
    )
    mapping: dict[str, Any] = dict.fromkeys(_patterns(plan.linear, every), linear)
    if plan.embedding is not None:
        mapping[plan.embedding] = Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    return TorchAoConfig(
        FqnToConfig(mapping),
        modules_to_not_convert=plan.kept,
        include_input_output_embeddings=plan.embedding is not None,
    )


def skeleton(path: str, task: str) -> Any:
    """The model's modules without weights (meta device): enough to name what to quantize."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return auto_class(task).from_config(config)


# --------------------------------------------------------------------------------------------------
# Quantizing a folder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedFolder:
    """A quantized model written by :func:`quantize_folder`."""

    folder: Path
    method: str
    task: str
    quantized: list[str]  # weights quantized, by parameter name
    kept: list[str]  # modules left in full precision


def quantize_folder(
    source: str | Path, destination: str | Path, *, method: str = DEFAULT_METHOD, embeddings: str = "auto"
) -> QuantizedFolder:
    """Quantize the model in the local folder ``source`` into ``destination`` (created; must be empty or absent).

    Args:
        method: one of :data:`METHODS`.
        embeddings: one of :data:`EMBEDDINGS` (see the module's docstring).

    Raises:
        ModelError: an unknown method, a folder that is no classifier or causal LM, or a non-empty destination.
    """
    check_method(method)
    check_embeddings(embeddings)
    from transformers import AutoTokenizer

    source, destination = Path(source), Path(destination)
    task = model_task(str(source))
    if destination.exists() and any(destination.iterdir()):
        raise ModelError(f"--out: {destination} is not empty; give a new folder (a quantized model is written whole)")
    quiet_torchao()
    use_rows_first_embeddings()
    config = torchao_config(skeleton(str(source), task), task, method, embeddings)
    model = auto_class(task).from_pretrained(str(source), quantization_config=config).eval()
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination, safe_serialization=True)
    # The tokenizer too (a generation_config.json comes with save_pretrained); not the source's metrics or job
    # file, which describe the source, not the quantized model.
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(destination)
    plan = plan_weights(model, task, embeddings)
    quantized = plan.linear + ([plan.embedding] if plan.embedding else [])
    return QuantizedFolder(folder=destination, method=method, task=task, quantized=quantized, kept=plan.kept)

"""Post-training quantization on CPU (``orchestrator quantize``): accuracy, weight bytes and latency vs the source.

1. Classifier: all-MiniLM-L6-v2 fine-tuned on SST-2 (``--classifier DIR``; default the newest quickstart export,
   ``runs/quickstart-*/final``), quantized three ways (int8-dynamic, the default; int8-weight; int8-dynamic with
   the embeddings left fp32). Each is scored against the source on sst2/test.tsv in one process with the same
   threads (``--threads``), timed per batch of 32 (fastest of 11 interleaved passes), and loaded back in a fresh
   Python that imports only transformers (plain ``AutoModelForSequenceClassification.from_pretrained``).
2. Causal LM after SFT (``--causal-lm DIR``, e.g. ``runs/sft-chat/final`` of configs/sft_chat.yaml; without it a
   tiny Llama is fine-tuned here on prompt/completion rows "the number after 7 is" -> "8", in one process, 300
   steps) quantized with int8-dynamic and scored by greedy generation (exact match) against its source.

Every quantized model is registered in a registry of its own under ``--work`` (the source registered there first
as its parent), so the shared ``runs/registry.sqlite`` is left alone.

    .venv/bin/python benchmarks/quantize.py --out benchmarks/results/quantize.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import DATA, ROOT, SST2_TEST, command_line, write_result

PLAIN_LOAD = """
import sys, transformers
auto = getattr(transformers, sys.argv[2])
model = auto.from_pretrained(sys.argv[1])
kinds = sorted({type(p).__name__ for p in model.parameters()})
print(",".join(kinds), "orchestrator" in sys.modules)
"""


def plain_load(folder: Path, auto: str) -> str:
    """Load ``folder`` in a fresh Python with nothing but transformers; the parameter types it got."""
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), auto], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"plain from_pretrained of {folder} failed:\n{done.stderr[-2000:]}")
    kinds, imported = done.stdout.split()
    assert imported == "False"
    return kinds


@contextlib.contextmanager
def stock_torchao_embeddings() -> Any:
    """torchao's own int8 embedding lookup (the whole table dequantized per lookup) while inside: what a process
    that imports nothing but transformers runs."""
    import torch
    from torchao.quantization import Int8Tensor

    table = Int8Tensor._TORCH_FN_TABLE[Int8Tensor]
    saved = table.pop(torch.nn.functional.embedding, None)
    try:
        yield
    finally:
        if saved is not None:
            table[torch.nn.functional.embedding] = saved


def stock_latency(parent: Path, quantized: Path, threads: int, max_length: int) -> dict[str, float]:
    """Seconds per batch of 32 of source and quantized model with torchao's own embedding lookup."""
    import torch
    from transformers import AutoTokenizer

    from orchestrator.models.quantize import load_model
    from orchestrator.models.scoring import time_models

    torch.set_num_threads(threads)
    texts = [line.rsplit("\t", 1)[0] for line in SST2_TEST.read_text().splitlines()[1:33]]
    batch = dict(AutoTokenizer.from_pretrained(parent)(texts, truncation=True, max_length=max_length, padding=True,
                                                       return_tensors="pt"))  # fmt: skip
    models = {k: load_model(v, "sequence-classification") for k, v in (("parent", parent), ("quantized", quantized))}
    with stock_torchao_embeddings():
        seconds = time_models(models, batch, repeats=11)
    return {**seconds, "ratio": seconds["quantized"] / seconds["parent"]}


def register_source(registry: Any, folder: Path, evals: list[dict[str, str]]) -> Any:
    """The source model as a registered parent (its job file's config; eval files by absolute path)."""
    job = yaml.safe_load((folder / "orchestrator_job.yaml").read_text())
    return registry.register(
        job["name"], method=job.get("method", "full"), artifact=str(folder), config=job, data={"eval": evals},
        metrics={}, base_model=str((job.get("model") or {}).get("path")),
    )  # fmt: skip


def newest_quickstart() -> Path:
    found = sorted((ROOT / "runs").glob("quickstart-*/final/config.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no runs/quickstart-*/final: run `bash scripts/quickstart.sh` first, or pass --classifier")
    return found[-1].parent


def row(label: str, result: Any, metric: str, eval_set: str, seconds: float) -> dict[str, Any]:
    summary = result.metrics["quantize"]
    before, after = summary["parent_eval"][eval_set][metric], result.metrics["eval"][eval_set][metric]
    return {
        "model": label,
        "method": summary["method"],
        "embeddings": summary["embeddings"],
        "metric": f"{eval_set}/{metric}",
        "parent": before,
        "quantized": after,
        "delta_points": 100 * (after - before),
        "weight_bytes_parent": summary["weight_bytes"]["parent"],
        "weight_bytes_quantized": summary["weight_bytes"]["quantized"],
        "weight_ratio": summary["weight_bytes"]["ratio"],
        "latency_parent_s": summary["latency_s"]["parent"],
        "latency_quantized_s": summary["latency_s"]["quantized"],
        "latency_ratio": summary["latency_s"]["ratio"],
        "threads": summary["threads"],
        "registered": result.record.id if result.record else None,
        "parent_id": result.record.parent_id if result.record else None,
        "quantize_s": seconds,
    }


def classifier_rows(source: Path, work: Path, threads: int) -> list[dict[str, Any]]:
    from orchestrator.lifecycle.quantization import quantize_model
    from orchestrator.lifecycle.registry import Registry

    registry = Registry(work / "registry.sqlite")
    job = yaml.safe_load((source / "orchestrator_job.yaml").read_text())
    name = job["data"]["eval"][0].get("name") or "sst2_test"
    parent = register_source(registry, source, [{"name": name, "path": str(SST2_TEST)}])
    rows = []
    for method, embeddings in (("int8-dynamic", "auto"), ("int8-weight", "auto"), ("int8-dynamic", "fp32")):
        out = work / f"minilm-{method}-{embeddings}"
        started = time.perf_counter()
        result = quantize_model(parent.id, str(out), method=method, embeddings=embeddings, registry=registry.path,
                                name=f"minilm-sst2-{method}-{embeddings}", threads=threads)  # fmt: skip
        item = row("MiniLM SST-2", result, "accuracy", name, time.perf_counter() - started)
        item["plain_from_pretrained"] = plain_load(out, "AutoModelForSequenceClassification")
        if result.metrics["quantize"]["kept"] == ["classifier"]:  # int8 embeddings: also torchao's own lookup
            stock = stock_latency(source, out, threads, int(job["data"].get("max_length") or 128))
            item["latency_ratio_stock_torchao_embedding"] = stock["ratio"]
        rows.append(item)
        print(json.dumps(item), flush=True)
    return rows


def tiny_sft(work: Path, steps: int = 300) -> Path:
    """A tiny Llama fine-tuned here on "the number after n is" -> "n+1" (100 rows, trained and scored on the same
    rows: the comparison is quantized vs source, not generalisation), exported with its job file as a run would be."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_causal_lm import build

    from orchestrator.config.sections import DataConfig
    from orchestrator.models.loading import load_tokenizer
    from orchestrator.models.scoring import open_eval_sets

    data = work / "successor.jsonl"
    data.write_text("".join(json.dumps({"q": f"the number after {n} is", "a": f" {n + 1}"}) + "\n" for n in range(100)))
    source = {"path": str(data), "name": "successor", "prompt_column": "q", "completion_column": "a",
              "generate": True, "max_new_tokens": 4}  # fmt: skip
    job = {
        "name": "tiny-sft",
        "model": {"path": str(work / "tiny-llama"), "task": "causal-lm"},
        "data": {"train": {k: v for k, v in source.items() if k not in ("generate", "max_new_tokens", "name")},
                 "eval": [source], "max_length": 32},
        "training": {"eval_batch_size": 50},
        "tracking": {"wandb": {"mode": "disabled"}},
    }  # fmt: skip
    folder = build(work / "tiny-llama", hidden=128, layers=2)
    tokenizer = load_tokenizer(str(folder))
    sets = open_eval_sets(DataConfig.model_validate(job["data"]), task="causal-lm", tokenizer=tokenizer,
                          label_names=[], batch_size=32)  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    reader = sets.readers[0]
    for step in range(steps):
        indices = torch.randint(len(reader), (32,), generator=generator).tolist()
        loss = model(**sets.collator([reader.get(i) for i in indices])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"tiny SFT step {step}: loss {loss.item():.3f}", flush=True)
    sets.close()
    export = work / "tiny-sft" / "final"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    (export / "orchestrator_job.yaml").write_text(yaml.safe_dump(job))
    return export


def causal_rows(source: Path | None, work: Path, threads: int) -> list[dict[str, Any]]:
    from orchestrator.lifecycle.quantization import quantize_model
    from orchestrator.lifecycle.registry import Registry

    label = "causal LM (SFT)" if source else "tiny Llama SFT on successors (trained here)"
    source = source or tiny_sft(work)
    job = yaml.safe_load((source / "orchestrator_job.yaml").read_text())
    generated = [e for e in job["data"]["eval"] if e.get("generate")]
    if not generated:
        raise SystemExit(f"{source}: its job scores no eval set by generation (data.eval[].generate): no exact match")
    registry = Registry(work / "registry.sqlite")
    evals = [{"name": e.get("name") or Path(e["path"]).stem, "path": str(Path(e["path"]).resolve())}
             for e in job["data"]["eval"]]  # fmt: skip
    parent = register_source(registry, source, evals)
    out = work / "causal-int8-dynamic"
    started = time.perf_counter()
    result = quantize_model(parent.id, str(out), registry=registry.path, threads=threads)
    name = generated[0].get("name") or Path(generated[0]["path"]).stem
    item = row(label, result, "exact_match", name, time.perf_counter() - started)
    item["plain_from_pretrained"] = plain_load(out, "AutoModelForCausalLM")
    print(json.dumps(item), flush=True)
    return [item]


def _stock(r: dict[str, Any]) -> str:
    ratio = r.get("latency_ratio_stock_torchao_embedding")
    return f"; {ratio:.3f}x with torchao's whole-table embedding lookup" if ratio is not None else ""


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | embeddings | metric | fp32 | quantized | delta (points) | weight bytes | latency / batch "
        "of 32 | plain from_pretrained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['embeddings']} | {r['metric']} | {r['parent']:.4f} | "
            f"{r['quantized']:.4f} | {r['delta_points']:+.2f} | {r['weight_ratio']:.3f}x "
            f"({r['weight_bytes_quantized'] / 1e6:.1f} MB) | {r['latency_ratio']:.3f}x "
            f"({r['latency_quantized_s']:.3f} s vs {r['latency_parent_s']:.3f} s, {r['threads']} thread(s)){_stock(r)} "
            f"| {r['plain_from_pretrained']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", type=Path, help="MiniLM fine-tuned on SST-2 (default: newest quickstart)")
    parser.add_argument("--causal-lm", type=Path, help="an SFT causal LM's export (default: a tiny one trained here)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every model (default 1)")
    parser.add_argument("--skip", choices=["classifier", "causal"], action="append", default=[])
    parser.add_argument("--work", type=Path, help="folder for the quantized models (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="quantize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "classifier" not in args.skip:
        rows += classifier_rows(args.classifier or newest_quickstart(), work, args.threads)
    if "causal" not in args.skip:
        rows += causal_rows(args.causal_lm, work, args.threads)
    print(table(rows))
    write_result(args.out, {"command": command_line(), "data": str(DATA), "rows": rows, "table": table(rows)})


if __name__ == "__main__":
    main()

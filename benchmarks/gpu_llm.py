"""Causal-LM training throughput and MFU on one GPU: the orchestrator vs a plain HF Trainer + DeepSpeed run.

A ~1.1B Llama-style model (16 blocks, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocab 30,522: MiniLM's
tokenizer) is built from its config with random weights (no hub) and saved as a HF folder. Every variant
trains the same packed blocks of real text (AG News + SST-2 sentences, `data.packing`: seq 2048, no padding)
with bf16, SDPA attention and fused AdamW, batch 8 x 2048 tokens per step:

  orch_full_z2 / orch_full_z3   `orchestrator train` (Ray Train worker + DeepSpeed ZeRO-2 / ZeRO-3), full FT
  orch_lora                     the same with LoRA r16 on every linear layer of the blocks (ZeRO-2)
  hf_full_z2 / hf_lora          transformers.Trainer + DeepSpeed ZeRO-2 (same model, data, batch, optimizer)

Reported per variant: steady-state tokens/s (steps after --warmup), step time, peak CUDA memory, MFU and the
ratio to the HF Trainer run of the same method. MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s,
with FLOPs per token = 6 N + 12 L d T for full fine-tuning (N = parameters in matmuls: every block's linear
layers and the LM head, not the embedding lookup; L blocks, width d, sequence T; PaLM appendix B) and
4 N + 12 L d T for LoRA (frozen weights get no weight-gradient matmuls). Peak: 989 TFLOP/s (H100 SXM dense
bf16; pass --peak-tflops for other GPUs).

    python benchmarks/gpu_llm.py --out benchmarks/results/gpu_llm.json
    python benchmarks/gpu_llm.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \
        --seq 64 --batch 2 --steps 6 --warmup 2      # a CPU smoke run of the same code (fp32, gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DATA, ROOT, command_line, start_ray, write_result

VARIANTS = ("orch_full_z2", "orch_full_z3", "orch_lora", "hf_full_z2", "hf_lora")
# Also accepted by --variants: a full-FT variant name with "_liger" (model.liger_kernel / use_liger_kernel: Liger's
# fused kernels) and/or "_compile" (torch.compile) appended, on both sides, e.g. orch_full_z2_liger_compile.
EXTRA_VARIANTS = ("orch_full_z2_compile", "hf_full_z2_compile", "orch_full_z2_liger_compile",
                  "hf_full_z2_liger_compile")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus_file(destination: Path) -> Path:
    """One text column of real sentences: AG News articles (title + description), then SST-2 sentences."""
    lines = ["text"]
    for line in (DATA / "agnews" / "train.tsv").read_text(encoding="utf-8").splitlines():  # no header: text, label
        lines.append(line.split("\t")[0])
    for line in (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        lines.append(line.split("\t")[0])
    destination.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return destination


def build_model(destination: Path, args: argparse.Namespace) -> tuple[Path, dict[str, int]]:
    """A Llama-style model with random weights, saved as a HF folder with MiniLM's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(args.tokenizer or resolve_model_path("minilm"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 256),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    embedding = model.get_input_embeddings().weight.numel()
    counts = {"params_total": sum(p.numel() for p in model.parameters()), "params_embedding": embedding}
    counts["params_matmul"] = counts["params_total"] - embedding - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n
    )
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return destination, counts


def flops_per_token(args: argparse.Namespace, counts: dict[str, int], lora: bool) -> float:
    n = counts["params_matmul"]
    return (4 if lora else 6) * n + 12 * args.layers * args.hidden * args.seq


def tokens_per_step(args: argparse.Namespace) -> int:
    """Tokens in one optimizer step: micro-batch x sequence x gradient accumulation (packed: no padding)."""
    return args.batch * args.seq * args.grad_accum


def steady_rate(times: list[float], warmup: int, tokens_per_step: int) -> dict[str, float]:
    """Tokens/s over the steps after `warmup` (times: wall clock at the end of each step, in order)."""
    if len(times) <= warmup + 1:
        raise RuntimeError(f"only {len(times)} steps timed; need more than --warmup + 1 ({warmup + 1})")
    seconds = times[-1] - times[warmup]
    steps = len(times) - 1 - warmup
    return {"tokens_per_s": steps * tokens_per_step / seconds, "step_s": seconds / steps}


def run_orchestrator(variant: str, model_dir: Path, corpus: Path, out: Path, args: argparse.Namespace) -> dict:
    import torch

    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    gpu = torch.cuda.is_available()
    name = f"{variant}-{int(time.time())}"
    job: dict[str, Any] = {
        "name": name,
        "model": {"path": str(model_dir), "task": "causal-lm"},
        "data": {"train": {"path": str(corpus), "label_column": None}, "max_length": args.seq, "packing": True,
                 "shuffle": False},
        "training": {"max_steps": args.steps, "batch_size_per_worker": args.batch, "lr": 1e-4,
                     "log_every_steps": 1, "max_grad_norm": 1.0, "warmup_steps": 0},
        "deepspeed": {"stage": 3 if "z3" in variant else 2},
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": float(max(1, (os.cpu_count() or 2) - 1))},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_final": False, "save_best": False},
    }
    if variant.endswith("_compile"):
        job["model"]["torch_compile"] = True
    if "_liger" in variant:
        job["model"]["liger_kernel"] = True
    job["training"]["grad_accumulation"] = args.grad_accum
    if variant == "orch_lora":
        job["method"] = "lora"
        job["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS}
        job["training"]["lr"] = 2e-4
    launched = time.time()
    run_training(config_from_dict(job))
    records = read_metrics(out / name)
    start = next(r for r in records if r["kind"] == "start")
    train = [r for r in records if r["kind"] == "train"]
    result = steady_rate([r["time"] for r in train], args.warmup, tokens_per_step(args))
    result.update(
        time_to_first_step_s=train[0]["time"] - launched,
        peak_cuda_mb=max((r.get("memory/peak_cuda_allocated_mb", 0.0) for r in train), default=0.0),
        params_trainable=start["params_trainable"],
        precision=start["precision"],
        final_loss=train[-1]["train/loss"],
        logged_tokens_per_s=train[-1].get("train/tokens_per_s"),
    )
    return result


def hf_trainer_worker(variant: str, model_dir: Path, corpus: Path, args: argparse.Namespace) -> dict:
    """transformers.Trainer + DeepSpeed ZeRO-2, one process: the baseline a user would write by hand."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from orchestrator.data.encoding import end_of_text_id
    from orchestrator.models.loading import load_tokenizer

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(str(model_dir))
    texts = corpus.read_text(encoding="utf-8").splitlines()[1:]
    needed = (args.steps + 2) * tokens_per_step(args)
    documents, tokens = [], 0
    for start in range(0, len(texts), 4096):  # tokenize only as much text as the run consumes
        ids = tokenizer(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
        documents += ids
        tokens += sum(len(i) + 1 for i in ids)
        if tokens > needed:
            break
    # The baseline's own packing, as HF's run_clm does it (group_texts): documents joined with EOS, cut into blocks.
    stream = np.fromiter((t for doc in documents for t in [*doc, end_of_text_id(tokenizer)]), dtype=np.int32)
    blocks = stream[: len(stream) // args.seq * args.seq].reshape(-1, args.seq)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, Any]:
            ids = torch.from_numpy(blocks[i].astype(np.int64))
            return {"input_ids": ids, "labels": ids.clone()}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    lr = 1e-4
    if variant == "hf_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
        lr = 2e-4
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True},
    }
    step_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_times.append(time.time())

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps, learning_rate=lr,
            lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0, bf16=gpu, logging_steps=1,
            save_strategy="no", report_to=[], optim="adamw_torch_fused" if gpu else "adamw_torch",
            deepspeed=ds_config, dataloader_drop_last=True, disable_tqdm=True, use_cpu=not gpu,
            torch_compile=variant.endswith("_compile"), use_liger_kernel="_liger" in variant,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[Clock()])
        trainer.train()
    result = steady_rate(step_times, args.warmup, tokens_per_step(args))
    result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0
    result["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["final_loss"] = next(
        (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both sides)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: MiniLM's, from the demo extra)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)  # internal: one HF Trainer variant
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        print("HF_RESULT " + json.dumps(hf_trainer_worker(args.hf_worker, args.model_dir, args.corpus, args)))
        return

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = corpus_file(work / "corpus.tsv")
    started = time.time()
    model_dir, counts = build_model(work / "model", args)
    print(f"model: {counts} built in {time.time() - started:.0f} s", flush=True)
    results: dict[str, Any] = {}
    for variant in args.variants:
        try:
            if variant.startswith("orch"):
                start_ray()
                results[variant] = run_orchestrator(variant, model_dir, corpus, work / "runs", args)
            else:
                cmd = [sys.executable, __file__, "--hf-worker", variant, "--model-dir", str(model_dir),
                       "--corpus", str(corpus)] + [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                                                   ("layers", "hidden", "intermediate", "heads", "seq", "batch",
                                                    "steps", "warmup", "grad-accum")] + [f"--kv-heads={args.kv_heads}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("HF_RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"HF Trainer run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
                results[variant] = json.loads(line[len("HF_RESULT "):])
        except Exception as exc:  # one failed variant must not lose the others' numbers
            results[variant] = {"error": str(exc)[-3000:]}
        res = results[variant]
        if "tokens_per_s" in res:
            lora = "lora" in variant
            res["tflops_per_s"] = flops_per_token(args, counts, lora) * res["tokens_per_s"] / 1e12
            res["mfu"] = res["tflops_per_s"] / args.peak_tflops
        print(variant, json.dumps(res)[:800], flush=True)
        if args.out:  # partial results survive a run cut short
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps({"counts": counts, **results}, indent=1))
    pairs = [("orch_full_z3", "hf_full_z2")] + [(v, "hf_" + v[len("orch_"):]) for v in results if v.startswith("orch_")]
    for variant, baseline in pairs:
        if "tokens_per_s" in results.get(variant, {}) and "tokens_per_s" in results.get(baseline, {}):
            results[variant]["vs_hf_trainer"] = results[variant]["tokens_per_s"] / results[baseline]["tokens_per_s"]
    write_result(args.out, {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads")} | counts,
        "seq": args.seq, "batch": args.batch, "grad_accum": args.grad_accum, "steps": args.steps, "warmup": args.warmup,
        "peak_tflops": args.peak_tflops, "variants": results,
        "command": command_line(),
    })


if __name__ == "__main__":
    main()

"""Instruction tuning on AG News as chat (configs/sft_chat.yaml, shrunk to a few CPU minutes per run).

1. The chat rows (scripts/make_chat_data.py: the headline in a user turn, the topic name as the answer) and a small
   chat Llama with random weights and MiniLM's tokenizer.
2. The same steps, seed and data twice: loss on the answers only (``data.train_on: completions``) and on every
   token (``all``). Both are scored by greedy generation on the first 1,000 test headlines:
   ``agnews_chat_test/exact_match`` (the answer equals the topic, case and whitespace aside).
3. A distilled student (``method: distill``): every second block of the answers-only model (the teacher), trained
   with the teacher's logits (KD on the answer tokens) and the labels, the same steps; its exact match as a share
   of the teacher's.

    .venv/bin/python benchmarks/sft_chat.py --out benchmarks/results/sft_chat.json

``--work DIR`` keeps the data, the models and the run folders there (e.g. to quantize the answers-only model's
``final/`` with benchmarks/quantize.py --causal-lm); without it they live in a temp folder removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DATA, ROOT, command_line, run_job, write_result

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_job(name: str, out: Path, data: Path, model: Path, *, steps: int, train_on: str, lr: float,
             batch: int, **sections: Any) -> dict[str, Any]:
    """configs/sft_chat.yaml's job, with ``steps`` steps and one eval (generation on 1,000 test rows) at the end."""
    return {
        "name": name,
        "model": {"path": str(model), "task": "causal-lm"},
        "data": {
            "train": {"path": str(data / "train.jsonl"), "messages_column": "messages"},
            "eval": [{"name": "agnews_chat_test", "path": str(data / "test.jsonl"), "messages_column": "messages",
                      "limit": 1000, "generate": True, "max_new_tokens": 8}],
            "chat_template": CHATML,
            "train_on": train_on,
            "max_length": 128,
        },
        "training": {"max_steps": steps, "lr": lr, "warmup_ratio": 0.05, "lr_schedule": "cosine",
                     "weight_decay": 0.1, "batch_size_per_worker": batch // 2, "log_every_steps": 10,
                     "eval_batch_size": 64, "seed": 0},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 2},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_best": False, "registry": None},
        **sections,
    }


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every run")
    parser.add_argument("--batch", type=int, default=32, help="rows per step (over 2 workers)")
    parser.add_argument("--hidden", type=int, default=128, help="width of the chat Llama")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the chat Llama (the student keeps half)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every run")
    parser.add_argument("--work", type=Path, default=None, help="keep data, models and runs here (default: temp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_chat_data import build_chat_model, convert

    stamp = int(time.time())
    with contextlib.ExitStack() as stack:
        out = args.work.resolve() if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for split in ("train", "test"):
            convert(DATA / "agnews" / f"{split}.tsv", out / "chat" / f"{split}.jsonl")
        model = build_chat_model(out / "chat-llama", hidden=args.hidden, layers=args.layers)
        common = {"steps": args.steps, "lr": args.lr, "batch": args.batch}
        runs = {  # warmup 10: the jobs log every 10 steps
            train_on: run_job(chat_job(f"sft-{train_on}-{stamp}", out, out / "chat", model, train_on=train_on,
                                       **common), warmup=10)
            for train_on in ("completions", "all")
        }
        teacher = Path(runs["completions"]["run_dir"]) / "final"
        runs["student"] = run_job(chat_job(
            f"sft-student-{stamp}", out, out / "chat", out / "chat-llama", train_on="completions", method="distill",
            distill={"teacher": str(teacher), "student_init": "teacher_layers", "keep_every": 2, "alpha": 0.5,
                     "kd_weight": 0.5, "temperature": 2.0}, **common), warmup=10)
    em = {name: run["eval"]["agnews_chat_test/exact_match"] for name, run in runs.items()}
    write_result(args.out, {
        "exact_match": em,
        "completions_over_all": em["completions"] / max(em["all"], 1e-9),
        "student_over_teacher": em["student"] / max(em["completions"], 1e-9),
        "teacher_blocks": args.layers, "student_blocks": args.layers // 2,
        "params": {name: run["params_total"] for name, run in runs.items()},
        "runs": runs, "steps": args.steps, "batch": args.batch, "lr": args.lr, "hidden": args.hidden,
        "command": command_line(),
    })


if __name__ == "__main__":
    main()

"""Distillation on real weights and data: MiniLM-L6 teacher → 2-block student from teacher layers.

1. Teacher: all-MiniLM-L6-v2 fine-tuned on the first `--teacher-limit` SST-2 sentences (or `--teacher DIR`,
   an earlier job's export).
2. Student (distilled): blocks 2 and 5 of the teacher (keep_every 3, DistilBERT-style init, head copied),
   trained on the same sentences with CE (α 0.5) + KL at T=2 (0.5) + hidden-state MSE on the kept pairs.
3. Student (labels only): the same initialisation and steps, cross-entropy on the labels alone.
All three are then scored in this process on sst2/test.tsv (accuracy, agreement with the teacher) and timed
side by side (inference samples/s, batch 64, max_length 64, all CPU threads; best of interleaved passes).

    .venv/bin/python benchmarks/distill.py --out benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import SST2_TEST, run_job, sst2_job, write_result


def score(model_dirs: dict[str, Path], passes: int = 3, batch: int = 64, max_length: int = 64) -> dict[str, dict]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lines = SST2_TEST.read_text().splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines]
    texts, labels = [r[0] for r in rows], torch.tensor([int(r[1]) for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(next(iter(model_dirs.values())))
    batches = [tokenizer(texts[i : i + batch], truncation=True, max_length=max_length, padding=True,
                         return_tensors="pt") for i in range(0, len(texts), batch)]
    models = {k: AutoModelForSequenceClassification.from_pretrained(v).eval() for k, v in model_dirs.items()}
    predictions, speed = {}, {k: 0.0 for k in models}
    with torch.inference_mode():
        for _ in range(passes):  # interleaved, so load changes hit every model alike
            for name, model in models.items():
                started = time.perf_counter()
                preds = torch.cat([model(**b).logits.argmax(-1) for b in batches])
                speed[name] = max(speed[name], len(texts) / (time.perf_counter() - started))
                predictions[name] = preds
    teacher = predictions["teacher"]
    return {
        name: {
            "accuracy": (predictions[name] == labels).float().mean().item(),
            "agreement_with_teacher": (predictions[name] == teacher).float().mean().item(),
            "inference_samples_per_s": speed[name],
            "params": sum(p.numel() for p in models[name].parameters()),
        }
        for name in models
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="an exported teacher folder to reuse")
    parser.add_argument("--teacher-limit", type=int, default=4800)
    parser.add_argument("--student-epochs", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stamp = int(time.time())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        runs = {}
        teacher_dir = args.teacher
        if teacher_dir is None:
            job = sst2_job(f"teacher-{stamp}", out, limit=args.teacher_limit, epochs=1, lr=1e-4)
            job["output"]["save_final"] = True
            runs["teacher"] = run_job(job)
            teacher_dir = Path(runs["teacher"]["run_dir"]) / "final"
        students = {
            "student_distilled": {"alpha": 0.5, "kd_weight": 0.5, "temperature": 2.0, "hidden_weight": 1.0,
                                  "hidden_loss": "mse"},
            "student_labels_only": {"alpha": 1.0, "kd_weight": 0.0, "hidden_weight": 0.0},
        }
        for name, losses in students.items():
            job = sst2_job(f"{name}-{stamp}", out, limit=args.teacher_limit, epochs=args.student_epochs, lr=2e-4,
                           method="distill",
                           distill={"teacher": str(teacher_dir), "student_init": "teacher_layers", "keep_every": 3,
                                    **losses})
            job["output"]["save_final"] = True
            runs[name] = run_job(job)
        scored = score({"teacher": teacher_dir,
                        **{name: Path(runs[name]["run_dir"]) / "final" for name in students}})
    t = scored["teacher"]
    for name in students:
        s = scored[name]
        s["accuracy_vs_teacher"] = s["accuracy"] / t["accuracy"]
        s["speedup_vs_teacher"] = s["inference_samples_per_s"] / t["inference_samples_per_s"]
    write_result(args.out, {"scores": scored, "runs": runs, "teacher_limit": args.teacher_limit,
                            "student_epochs": args.student_epochs,
                            "command": "python benchmarks/distill.py --out benchmarks/results/distill.json"})


if __name__ == "__main__":
    main()

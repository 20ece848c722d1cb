"""Run the benchmark suite and write one JSON and one Markdown table (the README's benchmark table).

    .venv/bin/python benchmarks/run_all.py                      # everything, in order (hours on 2 CPUs)
    .venv/bin/python benchmarks/run_all.py --only zero data_path
    .venv/bin/python benchmarks/run_all.py --render             # only rebuild the table from results/*.json

Each benchmark runs as its own process (its own Ray cluster) and writes benchmarks/results/<name>.json;
the table lists every figure with the command that reproduces it. Results files are not committed: the
README keeps the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = ["data_path", "overhead", "zero", "methods", "unfreeze", "distill", "sweep", "forgetting"]


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rows() -> list[tuple[str, str, str]]:
    """(benchmark, figure, command) rows from whatever results exist."""
    out: list[tuple[str, str, str]] = []
    if r := _load("data_path"):
        out.append(("Data path", f"loader {r['loader_samples_per_s']:.0f} samples/s = {r['loader_vs_train']:.0f}x "
                    f"training ({r['train_samples_per_s']:.1f}); scan {r['rows']:,} rows in {r['scan_s']:.2f} s",
                    r["command"]))
    if r := _load("overhead"):
        one, two = r["orchestrator_1worker_z0"], r["orchestrator_2workers_z2"]
        out.append(("Overhead", f"plain loop {r['plain_samples_per_s']:.1f} samples/s; orchestrator 1 worker ZeRO-0 "
                    f"{one['samples_per_s']:.1f} ({r['ratio_1worker_vs_plain']:.2f}x), 2 workers ZeRO-2 "
                    f"{two['samples_per_s']:.1f} ({r['ratio_2workers_vs_plain']:.2f}x); time to first step "
                    f"{one['time_to_first_step_s']:.1f} s (workers ready {one['worker_setup_s']:.1f} s)",
                    "python benchmarks/overhead.py --out benchmarks/results/overhead.json"))
        for key, how in (("cli_time_to_first_step", "starting its own Ray"),
                         ("cli_time_to_first_step_running_cluster", "on a running `ray start --head`")):
            if cli := r.get(key):
                parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in cli["breakdown_s"].items())
                out.append((f"Time to first step, `orchestrator train` {how}",
                            f"{cli['time_to_first_step_s']:.1f} s: {parts}",
                            "python benchmarks/overhead.py --out benchmarks/results/overhead.json"))
    if r := _load("zero"):
        runs = r["runs"]
        mem = ", ".join(f"ZeRO-{s} {runs[f'2w_z{s}']['peak_rss_mb']:.0f} MB peak / "
                        f"{runs[f'2w_z{s}']['above_start_mb']:.0f} MB above start "
                        f"({runs[f'2w_z{s}']['above_start_vs_stage0']:.2f}x; paper model "
                        f"{runs[f'2w_z{s}']['paper_vs_stage0']:.2f}x)" for s in (0, 1, 2, 3))
        out.append(("ZeRO memory (2 workers, per worker)", mem, r["command"]))
        out.append(("Scaling 1 → 2 workers", f"1 worker x 1 CPU {runs['1w_z0']['samples_per_s']:.1f} samples/s; "
                    f"2 workers ZeRO-0 {runs['2w_z0']['samples_per_s']:.1f}, "
                    f"ZeRO-2 {runs['2w_z2']['samples_per_s']:.1f} "
                    f"→ efficiency {_pct(r['scaling_efficiency_2w_z2'])} (communication/sync share "
                    f"{_pct(r['communication_share_2w_z2'])})", r["command"]))
    if r := _load("methods"):
        v = r["variants"]
        parts = []
        for name, res in v.items():
            acc = res.get("eval", {}).get("sst2_test/accuracy")
            # Frozen groups stay in the optimizer at LR 0, so only LoRA's trainable share is a parameter count.
            share = f", trainable {res['trainable_fraction']:.2%} of params" if res["trainable_fraction"] < 1 else ""
            parts.append(f"{name}: test acc {acc:.4f}, peak RSS {res['peak_rss_mb']:.0f} MB{share}")
        out.append((f"LoRA vs full, frozen layers: accuracy after {r['steps']} steps of 32", "; ".join(parts),
                    r["command"]))
    if r := _load("methods_speed"):
        v = r["variants"]
        out.append((f"Step time vs full fine-tuning ({r['steps']} steps, quiet machine)", "; ".join(
            f"{name}: {res['step_s']:.2f} s/step = {res.get('step_time_vs_full', 1):.2f}x, "
            f"{res['samples_per_s']:.1f} samples/s, peak RSS {res['peak_rss_mb']:.0f} MB" for name, res in v.items()),
            r["command"]))
    if r := _load("unfreeze"):
        s = r["schedules"]
        out.append((f"Unfreezing on {r['examples']:,} examples (3 seeds)", "; ".join(
            f"{k}: {100 * x['accuracy_mean']:.2f} ± {100 * x['accuracy_std']:.2f}" for k, x in s.items()),
            r["command"]))
    if r := _load("distill"):
        s = r["scores"]
        t = s["teacher"]
        parts = [f"teacher (6 blocks) {t['accuracy']:.4f}, {t['inference_samples_per_s']:.0f} samples/s"]
        for k in ("student_distilled", "student_labels_only"):
            x = s[k]
            parts.append(f"{k} (2 blocks) {x['accuracy']:.4f} = {_pct(x['accuracy_vs_teacher'])} of teacher at "
                         f"{x['speedup_vs_teacher']:.2f}x speed, agreement {_pct(x['agreement_with_teacher'])}")
        out.append(("Distillation MiniLM-L6 → 2 blocks", "; ".join(parts), r["command"]))
    if r := _load("sweep"):
        a, f = r["asha"], r["fifo"]
        out.append(("ASHA vs FIFO", f"trial-steps {a['trial_steps']} vs {f['trial_steps']} "
                    f"({r['trial_steps_asha_vs_fifo']:.2f}x); "
                    f"best acc {a['best_metric']:.4f} vs {f['best_metric']:.4f}; "
                    f"wall {a['wall_s'] / 60:.1f} vs {f['wall_s'] / 60:.1f} min; outside training loops "
                    f"{_pct(a['overhead_fraction'])} / {_pct(f['overhead_fraction'])}", r["command"]))
    if r := _load("forgetting"):
        out.append(("Forgetting matrix", r.get("summary", ""), r["command"]))
    return out


def render() -> str:
    lines = ["| Benchmark | Result | Command |", "|---|---|---|"]
    lines += [f"| {a} | {b} | `{c}` |" for a, b, c in rows()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, choices=ORDER)
    parser.add_argument("--render", action="store_true", help="only rebuild the table from existing results")
    parser.add_argument("--distill-teacher", default=None, help="reuse an exported teacher folder")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if not args.render:
        for name in args.only or ORDER:
            command = [sys.executable, str(HERE / f"{name}.py"), "--out", str(RESULTS / f"{name}.json")]
            if name == "distill" and args.distill_teacher:
                command += ["--teacher", args.distill_teacher]
            print("$", " ".join(command), flush=True)
            with open(RESULTS / f"{name}.log", "w") as log:
                code = subprocess.call(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
            print(f"  {name}: exit {code}", flush=True)
    table = render()
    (RESULTS / "summary.md").write_text(table)
    (RESULTS / "summary.json").write_text(json.dumps({n: _load(n) for n in ORDER}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()

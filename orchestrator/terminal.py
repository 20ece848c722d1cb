"""What a run shows on the user's terminal: its progress from metrics.jsonl, and where its full logs are.

The workers' and Ray's own output is not copied to the terminal unless ``-v`` (``ORCHESTRATOR_VERBOSE``, see
``orchestrator.cluster.launcher.ensure_ray``): the run's lines come from the records rank 0 writes
(``orchestrator.tracking.Tracker``), its warnings included.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orchestrator.tracking import verbose_output


class ProgressView:
    """Renders the run's metrics.jsonl: a start-up spinner, the training bar (step, loss, samples/s, ETA), an
    evaluation bar, each evaluation's scores and the workers' warnings. Without a terminal (a pipe, a Ray job's
    log) it prints one line per logged step instead of bars.

    The workers write no record when an evaluation starts, so the evaluation bar starts at the logged step that
    is an eval step (``eval_every_steps``, else the step of the first evaluation, and the last step), and its
    ETA is the duration of the previous evaluation (the first one shows elapsed time only).
    """

    def __init__(self, enabled: bool, *, eval_every_steps: int | None = None, out: Console | None = None):
        self.enabled = enabled
        self.console = out or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description:<5}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.eval_every = eval_every_steps or None
        self.task: Any = None
        self.starting: Any = self.progress.add_task("start", total=None, detail="Ray, workers, model")
        self.total_steps = 0
        self.eval_rows = 0
        self.eval_task: Any = None
        self.eval_started: float | None = None
        self.eval_seconds: float | None = None  # the last evaluation's duration: the next one's estimate
        self.seen = 0

    def __enter__(self) -> ProgressView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, records: list[dict[str, Any]]) -> None:
        for record in records[self.seen :]:
            handler = getattr(self, f"_on_{record.get('kind')}", None)
            if handler is not None:
                handler(record)
        self.seen = len(records)
        self._advance_eval()

    def _print(self, text: str, **style: Any) -> None:
        # soft_wrap: one record, one line (a job's log is read with grep; a terminal wraps long lines itself)
        self.progress.console.print(text, highlight=False, soft_wrap=True, **style)

    def _on_start(self, record: dict[str, Any]) -> None:
        if self.starting is not None:
            self.progress.remove_task(self.starting)
            self.starting = None
        self.total_steps = record["total_steps"]
        self.eval_rows = sum(e.get("rows", 0) for e in (record.get("data") or {}).get("eval", []))
        if self.task is None:
            self.task = self.progress.add_task("train", total=self.total_steps, detail="")
        self.progress.update(self.task, completed=record.get("step", 0))
        resumed = record.get("resumed_from_step")
        note = f", resumed at step {resumed}" if resumed is not None else ""
        self._print(
            f"workers: {record['world_size']}, precision {record['precision']}, parameters "
            f"{record['params_trainable']:,} trainable / {record['params_total']:,}{note}"
        )

    def _on_train(self, record: dict[str, Any]) -> None:
        if self.task is None:
            return
        step, loss, rate = record["step"], record["train/loss"], record["train/samples_per_s"]
        where = f"step {step}/{self.total_steps} loss {loss:.4f}"
        self.progress.update(self.task, completed=step, detail=f"{where} {rate:.1f} samples/s")
        if not self.enabled:
            self._print(f"{where} lr {record['train/lr']:.2e} {rate:.1f} samples/s")
        due = step == self.total_steps or (self.eval_every is not None and step % self.eval_every == 0)
        if due and self.eval_rows and self.enabled:
            self._begin_eval()

    def _begin_eval(self) -> None:
        self.eval_started = time.monotonic()
        total = self.eval_rows if self.eval_seconds else None  # no estimate yet: a pulsing bar
        detail = f"{self.eval_rows:,} rows" + (" (ETA from the last evaluation)" if total else "")
        if self.eval_task is None:
            self.eval_task = self.progress.add_task("eval", total=total, detail=detail)
        else:
            self.progress.reset(self.eval_task, total=total, detail=detail, visible=True)

    def _advance_eval(self) -> None:
        if self.eval_task is None or self.eval_started is None or not self.eval_seconds:
            return
        share = min((time.monotonic() - self.eval_started) / self.eval_seconds, 0.99)
        self.progress.update(self.eval_task, completed=share * self.eval_rows)

    def _on_eval(self, record: dict[str, Any]) -> None:
        if self.eval_every is None and record["step"] < self.total_steps:
            self.eval_every = record["step"]  # the first evaluation's step is the eval interval
        if self.eval_started is not None:
            self.eval_seconds = time.monotonic() - self.eval_started
            self.eval_started = None
        if self.eval_task is not None:
            self.progress.update(self.eval_task, visible=False)
        shown = {k: v for k, v in record.items() if "/" in k and not k.endswith("samples_per_s")}
        text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items() if isinstance(v, float))
        self._print(f"eval @ step {record['step']}: {text}")

    def _on_warning(self, record: dict[str, Any]) -> None:
        self._print(f"warning: {record.get('message', '')}", style="yellow", markup=False)


def ray_logs_dir() -> str | None:
    """The Ray session's log folder on this machine, once this process is connected to Ray."""
    try:
        import ray

        node = ray._private.worker._global_node if ray.is_initialized() else None
        return f"{node.get_session_dir_path()}/logs" if node is not None else None
    except Exception:  # a private API: the hint is optional
        return None


def logs_hint() -> str:
    """A line for an error message: where every worker's log is (nothing with -v: they were shown)."""
    logs = ray_logs_dir()
    return f"\n  every worker's log: {logs} (or run again with -v)" if logs and not verbose_output() else ""

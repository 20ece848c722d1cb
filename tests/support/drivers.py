"""A driver process that dies mid-run: what the resume-from-the-bucket tests kill (SIGKILL, no clean-up)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def kill_driver_when(
    entry: str,
    job: dict[str, Any],
    *,
    ray: Any,
    workdir: Path,
    ready: Callable[[], Any],
    timeout: float = 400,
    poll: float = 0.2,
) -> Any:
    """Run ``entry(config_from_dict(job))`` in a driver process on the test's Ray cluster and SIGKILL it as soon
    as ``ready()`` returns something truthy (polled every ``poll`` seconds); return that value.

    Args:
        entry: ``module:function`` (``orchestrator.cluster.launcher:run_training``, ``orchestrator.tune.sweep:
            run_sweep``).
        ray: the ``ray`` module of the test session (its cluster's GCS address is where the driver connects).
        workdir: the driver's working directory.

    Raises:
        AssertionError: the driver ended (or the timeout passed) before ``ready()`` held.
    """
    module, function = entry.split(":")
    job_file = workdir.parent / f"{job['name']}-driver.json"
    job_file.write_text(json.dumps(job))
    code = (
        f"import json, sys, ray; from orchestrator.config import config_from_dict; from {module} import {function}; "
        "ray.init(address=sys.argv[2], log_to_driver=False); "
        f"{function}(config_from_dict(json.load(open(sys.argv[1]))))"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", code, str(job_file), ray.get_runtime_context().gcs_address],
        cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline and driver.poll() is None:
            value = ready()
            if value:
                break
            time.sleep(poll)
        assert driver.poll() is None and value, f"{entry} ended before its driver could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        return value
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)

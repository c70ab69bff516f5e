"""Helpers for tests that start training in a child process and signal it mid-run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_log_rows(proc: subprocess.Popen, log: Path, rows: int = 3, timeout: float = 90.0) -> None:
    """Wait until the run's log.csv holds at least `rows` rows; fail if the child exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= rows + 1):  # + 1: the header
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"{log} had no {rows} rows after {timeout:.0f} s"
        time.sleep(0.05)

"""Run logs: a CSV file (always) and TensorBoard event files (optional), written by the main rank only."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

from training.atomic import atomic_write_text

CSV_NAME = "log.csv"
# skipped: steps train.nan_policy=skip skipped; scaler_skipped: fp16 steps the GradScaler skipped for overflow (both
# totals since step 0); loss_scale: the GradScaler's scale (fp16 only)
CSV_FIELDS = ("step", "episodes", "loss", "accuracy", "mse", "lr", "grad_norm", "episodes_per_s", "skipped",
              "val_accuracy", "val_mse", "wall_s", "scaler_skipped", "loss_scale")


def truncate_csv(path: Path, last_step: int, drop_partial_row: bool = False) -> None:
    """Drop rows logged after `last_step` (written by a run that crashed after its last checkpoint).

    `drop_partial_row`: also drop the training row at `last_step` (see RunLogger)."""
    if not path.is_file():
        return

    def keep(row: dict[str, str]) -> bool:
        step = int(row["step"])
        # training rows always carry lr; validation rows at the same step never do and are complete
        return step < last_step or (step == last_step and not (drop_partial_row and row.get("lr")))

    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("step") and keep(r)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())  # a crash while rewriting must not lose the rows it keeps


class RunLogger:
    """Appends rows to <run_dir>/log.csv and scalars to TensorBoard under <run_dir>/tb."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: Optional[int] = None,
                 partial_at_resume: bool = False) -> None:
        """Open the CSV (truncated to resume_step when resuming) and, if asked, a SummaryWriter.

        `partial_at_resume`: the checkpoint resumed from holds an unfinished logging window. A training row at
        resume_step then averaged only part of that window (written by a run halted or ended off a log_every
        boundary); the resumed run logs the whole window at its boundary, so that row is dropped, as a run that
        was never stopped has none."""
        self.path = Path(run_dir) / CSV_NAME
        if resume_step is not None:
            truncate_csv(self.path, resume_step, drop_partial_row=partial_at_resume)
        new = not self.path.is_file() or resume_step is None
        self._fh = open(self.path, "w" if new else "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            self._writer.writeheader()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write one row (missing fields left empty) and the finite scalars to TensorBoard."""
        self._writer.writerow({"step": step, **values})
        self._fh.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close both outputs."""
        self._fh.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()

"""Ctrl-C and SIGTERM during training: finish the current step, write a checkpoint, then stop.

A second signal aborts at once (the checkpoints already published stay complete: they are written atomically).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any, Callable, Optional, Union

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM after writing a checkpoint; `result` says where (resume from there).

    A KeyboardInterrupt, so code that does not look for it stops as it would on Ctrl-C (a demo does not carry on
    to its next method), while `metaformer train` catches it and prints how to resume.
    """

    def __init__(self, signal_name: str, result: Any) -> None:
        """Remember which signal stopped the run and the TrainResult of the stopped run."""
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.result = result

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by this signal: 128 + its number (130 for SIGINT)."""
        return 128 + int(getattr(signal, self.signal_name))


class StopRequest:
    """Context manager: while active, SIGINT / SIGTERM set `signal_name` instead of killing the process.

    Only the main thread may install signal handlers; elsewhere (a trainer run from a worker thread) it
    does nothing and signals keep their usual effect.
    """

    def __init__(self, announce: bool = True) -> None:
        """`announce`: print one line on stderr when the first signal arrives (the main rank only)."""
        self.signal_name: Optional[str] = None
        self.announce = announce
        self._previous: dict[int, _Handler] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal has arrived."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is not None:
            # the second signal: the user does not want to wait for the step and the checkpoint
            self.uninstall()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without a final checkpoint")
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            sys.stderr.write(f"\n{self.signal_name} received: finishing this step and writing a checkpoint, then "
                             "stopping (send it again to abort at once)\n")
            sys.stderr.flush()

    def install(self) -> "StopRequest":
        """Catch SIGINT / SIGTERM from now on (main thread only); returns self."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Give SIGINT / SIGTERM back to the handlers they had before install()."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.uninstall()


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGINT / SIGTERM to the trainer, which shuts its workers down itself."""
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group; a worker that died of it would break the
    # batch the trainer is still fetching before it can write its checkpoint.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)

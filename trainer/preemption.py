"""SIGTERM and SIGINT end a run at a step boundary, with a checkpoint, instead of killing it mid-step.

Schedulers send SIGTERM on preemption (Slurm, Kubernetes; torchrun forwards its own to every
rank), a user at a terminal sends SIGINT. The handler only records the signal; the loop folds
"this rank was signalled" into the step's first all-reduce, so every rank stops at the same step
even when one rank alone got the signal. A second SIGINT interrupts at once (KeyboardInterrupt).
"""

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records SIGTERM/SIGINT for the training loop while installed (main thread only; else inert)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        """The first stop signal received, None while none came."""
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _record(self, number: int, frame: FrameType | None) -> None:
        if number == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = number

    def close(self) -> None:
        """Put back the handlers that were there before."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

"""SIGTERM and SIGINT, which schedulers (SLURM, Kubernetes) send before preempting a job, and Ctrl-C.

The first signal only sets ``received``: the trainer finishes the current step, writes a checkpoint and returns
(under torchrun every process learns of it through the step's all-reduce, so all stop at the same step). A second
signal ends the process at once, as if no handler were installed.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager that installs the handlers (main thread only) and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received = ""          # the name of the first signal, "" until one arrives
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:  # the second one: exit now, by the signal's default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        # os.write, not print: a handler may interrupt a print in progress (reentrant buffered writes fail)
        os.write(2, f"\n{name} received: finishing this step and writing a checkpoint (send it again to exit now)\n".encode())

"""Ctrl-C and SIGTERM (what SLURM sends before a time limit or a preemption) as a request to stop training at the next
step boundary, so the run can save last.pt and say how to continue; a second Ctrl-C exits at once."""

import os
import signal
import threading


class Interrupts:
    """While active (a `with` block in the main thread), SIGINT and SIGTERM set `signal` instead of killing the
    process; the training loop polls it between steps."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.HANDLED}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # the second Ctrl-C: no cleanup, no traceback
            os.write(2, b"interrupted again: exiting now, without saving\n")
            os._exit(128 + signum)
        self.signal = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to exit now)\n".encode())

"""Ctrl-C and SIGTERM (what SLURM sends before a time limit or a preemption) as a request to stop training at the next
step boundary, so the run can save last.pt and say how to continue; a second Ctrl-C exits at once.

In a submitit job (hydra/launcher=slurm or submitit_local) submitit's own preemption / time-limit signal (USR2) is
caught the same way; once last.pt is saved, `hand_over` passes it to submitit's handler, which requeues the job
(Hydra's launcher resubmits it with the same arguments), and the requeued job resumes from last.pt
(training.resume_from)."""

import os
import signal
import threading


def submitit_job() -> bool:
    """This process runs a job that submitit launched (SLURM or its local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preemption_signal() -> int:
    """The signal submitit asks the cluster to send before a time limit or a preemption (USR2 unless configured)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class Interrupts:
    """While active (a `with` block in the main thread), SIGINT and SIGTERM (and submitit's preemption signal in a
    submitit job) set `signal` instead of killing the process; the training loop polls it between steps."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            handled = [signal.SIGINT, signal.SIGTERM, *([preemption_signal()] if submitit_job() else [])]
            self._previous = {s: signal.signal(s, self._handle) for s in handled}
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

    def requeues(self) -> bool:
        """The stop was submitit's preemption / time-limit signal, which its own handler answers with a requeue."""
        return (self.signal is not None and self.signal not in (signal.SIGINT, signal.SIGTERM)
                and callable(self._previous.get(self.signal)))

    def hand_over(self) -> None:
        """Pass the signal on to submitit's handler: it checkpoints the job, requeues it and exits (SystemExit)."""
        handler = self._previous[self.signal]
        signal.signal(self.signal, handler)
        handler(self.signal, None)

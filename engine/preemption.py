"""Preemption: SIGTERM / SIGUSR1 -> finish the current step, write a complete checkpoint, exit 75.

Clusters stop jobs with a signal and a grace period (SLURM: SIGTERM to every task of the step, then
SIGKILL ``KillWait`` seconds later, 30 s by default; ``sbatch --signal=USR1@120`` sends SIGUSR1 120 s
before the time limit). :class:`Preemption` installs handlers that only set a flag, so whatever the
process is doing (a forward, a collective, a checkpoint write) completes. At each step boundary the
loops call :meth:`Preemption.agreed`, a collective (one all-reduce of a flag), so that every rank stops
after the *same* step even if only some ranks were signalled (the DeepSpeed launcher signals its ranks
one at a time); they then write a checkpoint and raise :class:`Preempted`, and the entry point exits
with :data:`PREEMPTED_EXIT_CODE` on every rank. ``--resume auto`` continues exactly.

Exit codes of ``engine/train.py``: 0 done, 1 error, 2 bad recipe or arguments, 75 preempted
(``EX_TEMPFAIL``: "try again"; a requeue script can test for it). Launchers report their own code:
``torchrun`` and the DeepSpeed launcher exit non-zero when they themselves are signalled.

Handlers are installed before the DataLoader forks its workers, which inherit them: a signal sent to
the whole process group (``kill -TERM -PGID``, SLURM) sets a harmless flag in the workers instead of
killing them mid-batch.
"""
from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; ``main`` turns it into the exit code."""

    def __init__(self, step: int | None, checkpoint, signal_name: str, what: str = "run"):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f" at step {step}" if step is not None else ""
        saved = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"{what} preempted by {signal_name}{where}{saved}; continue with --resume auto "
                         f"(exit code {PREEMPTED_EXIT_CODE})")


class Preemption:
    """Signal flag with a cross-rank agreement. Use as a context manager around the loop: the previous
    handlers come back on exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def install(self) -> Preemption:
        global _active
        if threading.current_thread() is threading.main_thread():   # signal.signal works only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        _active = self
        return self

    def uninstall(self) -> None:
        global _active
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if _active is self:
            _active = None

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def requested(self) -> bool:
        """This rank got a signal (local, no communication)."""
        return self.signal_name is not None

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal. Collective: every rank calls it at the same point."""
        from geoforge.engine.distributed import any_rank

        stop = any_rank(self.requested())
        if stop and self.signal_name is None:
            self.signal_name = "a signal to another rank"
        return stop


_active: Preemption | None = None


def active() -> Preemption:
    """The installed :class:`Preemption` (by the entry point), or one that is never signalled. Loops
    call this instead of taking a parameter, so their signatures do not change."""
    return _active if _active is not None else Preemption()


__all__ = ["active", "PREEMPTED_EXIT_CODE", "Preempted", "Preemption", "SIGNALS"]

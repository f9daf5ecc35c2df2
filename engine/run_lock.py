"""One writer per run directory: ``<run>/.lock``.

Rank 0 of a run creates ``.lock`` exclusively (``O_CREAT | O_EXCL``) holding JSON ``{host, pid, start,
started, command}`` and removes it when the run ends (normally, on an error, or preempted). A second run
on the same directory finds the file and stops at once naming the holder. A lock whose holder is gone
is *stale* (the holder was killed with SIGKILL, OOM, a node crash): on the same host, a holder whose pid
no longer runs, or runs but started at another time (a reused pid), is detected and the lock is taken
over with a warning. A lock held from another host cannot be probed: the error says so and names the
file to delete once that run is known to be dead.

Collective: every rank calls :func:`acquire_run_lock`; rank 0 decides, the others learn the outcome.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """Another live run holds the run directory; the message names it (host, pid)."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; Linux), None if unknown or not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host')!r}, pid {holder.get('pid')}, since {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


class RunLock:
    """The lock of one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _mine(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._mine()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def stale_reason(self, holder: dict) -> str | None:
        """Why ``holder`` is known to be dead, or None if it may be alive."""
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return f"pid {pid} is not running"
        if holder.get("start") is not None and _start_time(pid) not in (None, holder["start"]):
            return f"pid {pid} now belongs to another process (started at another time)"
        return None

    def acquire(self, warn=print) -> None:
        """Take the lock or raise :class:`RunDirLocked` naming the holder; a stale lock is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # a holder may release (or another taker win) between our steps
            if self._create():
                self.held = True
                return
            try:
                holder = json.loads(self.path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):   # maybe being written this instant: look once more
                time.sleep(1.0)
                try:
                    holder = json.loads(self.path.read_text())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError):
                    holder = {}
            reason = self.stale_reason(holder) if holder else "the lock file is unreadable"
            if reason is None:
                remote = holder.get("host") != socket.gethostname()
                raise RunDirLocked(
                    f"run directory {self.path.parent} is in use by another run ({_describe(holder)}). Use "
                    f"another --run-dir, or wait for that run to end"
                    + (f"; it runs on another host, so if it is known to be dead delete {self.path}" if remote
                       else "") + ".")
            warn(f"warning: taking over the stale lock {self.path} ({_describe(holder)}): {reason}")
            # replace atomically: rename our own file over the stale one (never unlink-then-create, which
            # lets two takers both succeed)
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
            tmp.write_text(json.dumps(self._mine()) + "\n")
            try:
                current = json.loads(self.path.read_text())
            except (OSError, ValueError):
                current = holder
            if current != holder:   # someone else took it over meanwhile: look again
                tmp.unlink(missing_ok=True)
                continue
            tmp.replace(self.path)
            try:   # two takers racing: the last rename wins, the other looks again (and finds it held)
                if json.loads(self.path.read_text()).get("pid") != os.getpid():
                    continue
            except (OSError, ValueError):
                continue
            self.held = True
            return
        raise RunDirLocked(f"run directory {self.path.parent}: could not take {self.path} (contended)")

    def release(self) -> None:
        if not self.held:
            return
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False


def acquire_run_lock(run_dir: Path, world, warn=print) -> RunLock:
    """Collective: rank 0 takes the lock of ``run_dir``; on every rank raise :class:`RunDirLocked` if it
    is held by another live run. Returns the lock (call ``release()`` at the end, on every rank)."""
    from geoforge.engine.distributed import broadcast_object

    lock = RunLock(run_dir)
    error = None
    if world.is_main:
        try:
            lock.acquire(warn)
        except RunDirLocked as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise RunDirLocked(error)
    return lock


__all__ = ["RunDirLocked", "RunLock", "acquire_run_lock", "LOCK_NAME"]

"""One writer per run directory (engine/run_lock.py): held locks refuse naming the holder, stale ones
(dead pid, reused pid) are taken over with a warning, release removes only our own lock. The
end-to-end refusal of a second ``engine/train.py`` on a running run's directory is in test_preemption."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from geoforge.engine.run_lock import LOCK_NAME, RunDirLocked, RunLock


def _write_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_lock_is_exclusive_and_released(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(RunDirLocked) as info:
        RunLock(tmp_path).acquire()   # same host, this (live) pid holds it
    assert f"host {socket.gethostname()!r}, pid {os.getpid()}" in str(info.value)
    assert str(tmp_path) in str(info.value)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = RunLock(tmp_path)
    second.acquire()
    assert second.held


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid, start="1", started="then", command="x")
    warnings = []
    lock = RunLock(tmp_path)
    lock.acquire(warn=warnings.append)
    assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and "stale lock" in warnings[0] and f"pid {dead.pid} is not running" in warnings[0]


def test_reused_pid_is_stale_but_live_holder_is_not(tmp_path):
    # the pid runs (it is ours) but started at another time than the lock records: a reused pid
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start="12345678901", command="old")
    warnings = []
    RunLock(tmp_path).acquire(warn=warnings.append)
    assert "another process" in warnings[0]


def test_lock_from_another_host_is_refused_with_a_hint(tmp_path):
    _write_lock(tmp_path, host="node-17", pid=4242, start="9", started="today", command="train")
    with pytest.raises(RunDirLocked) as info:
        RunLock(tmp_path).acquire()
    text = str(info.value)
    assert "host 'node-17', pid 4242" in text and f"delete {tmp_path / LOCK_NAME}" in text


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    _write_lock(tmp_path, host=socket.gethostname(), pid=1, start=None, command="other")
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()

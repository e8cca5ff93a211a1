"""Kill points: where a test or `bench/kill_resume.py` can SIGKILL a run at an exact step of its writing.

Every durable step of a write reports here (a tensor appended to a shard, a file renamed into place).
Inert unless the environment asks: with ZENITH_KILL_AT=N the process kills itself with SIGKILL at its
N-th step (a real kill -9: no cleanup handler runs), and with ZENITH_STEP_LOG=FILE each step's name is
appended to FILE, so a campaign can count a job's steps and then kill it at each one. Worker processes
inherit the environment and count their own steps.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "ZENITH_KILL_AT"
STEP_LOG = "ZENITH_STEP_LOG"
_steps = 0


def step(name: str) -> None:
    """One durable step of a write is done (`name` says which); kill here if ZENITH_KILL_AT says so."""
    kill_at, log = os.environ.get(KILL_AT), os.environ.get(STEP_LOG)
    if not (kill_at or log):
        return
    global _steps
    _steps += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {_steps} {name}\n")
    if kill_at and _steps == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)

"""Hook scripts that never end, and waiting on processes."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

# Starts a child that sleeps, writes "<own pid> <child pid>" to argv[1], then sleeps itself: a hook that never ends.
HANGING = """\
import os, pathlib, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
tmp = pathlib.Path(sys.argv[1] + ".tmp")
tmp.write_text(f"{os.getpid()} {child.pid}")
tmp.rename(sys.argv[1])
time.sleep(3600)
"""


def hanging_hook(tmp_path: Path, pid_file: str = "pids.txt") -> tuple[str, Path]:
    """A command line for the hanging script, and the file where it writes its pids (`pid_file` may hold
    placeholders)."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING)
    pids = tmp_path / pid_file
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(pids))}", pids


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan may wait a moment for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, limit_s: float = 30.0) -> bool:
    """Poll `condition` until it holds or `limit_s` passes; returns its last value."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()

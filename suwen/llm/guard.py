"""The managed vLLM server's guard: ``python -m suwen.llm.guard FD -- COMMAND ...``.

Suwen starts this small process (leader of a new process group) instead of vLLM itself; it
runs COMMAND (vLLM) as its child in the same group and ends the whole group (API server,
engine core, workers) when

- the Suwen process that started it dies, however it dies (SIGKILL and the OOM killer
  included): FD is the read end of a pipe whose only write end Suwen holds, so the kernel
  closes it and the read returns end-of-file;
- it is told to stop (SIGTERM, SIGINT, SIGHUP), or vLLM exits by itself.

vLLM additionally gets the kernel's parent-death signal: if the guard itself is killed, the
API server is killed with it. Nothing here imports more than the standard library, so the
guard starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GRACE_SECONDS = 10.0  # shorter than the 15 s Suwen waits for the guard itself
POLL_SECONDS = 0.2
USAGE = "usage: python -m suwen.llm.guard FD -- COMMAND [ARG ...]"


# Loaded before any fork: the child between fork and exec only makes the one call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent thread exits (Linux; elsewhere
    a no-op). Called in the child between fork and exec."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _watch_parent(fd: int, stop: threading.Event) -> None:
    """Block on the pipe until Suwen closes it (on exit or death)."""
    with contextlib.suppress(OSError):
        while os.read(fd, 1):
            pass
    stop.set()


def _end_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM every member of the group, wait up to the grace for vLLM, then SIGKILL all
    (the guard included: it has nothing left to do)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal also reaches the guard
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(0, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=GRACE_SECONDS)
    code = child.returncode
    sys.stdout.flush()
    if code is None or _others_in_group():
        os.killpg(0, signal.SIGKILL)


def _others_in_group() -> bool:
    """True while a process other than the guard is left in its group (Linux /proc)."""
    me, group = os.getpid(), os.getpgid(0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write(USAGE + "\n")
        return 2
    fd, command = int(argv[0]), argv[2:]
    os.set_inheritable(fd, False)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    # Spawned from the main thread, which lives as long as the guard: the parent-death
    # signal (tied to the creating thread) fires exactly when the guard dies. Spawned before
    # the watcher thread starts, so the fork happens in a single-threaded process.
    child = subprocess.Popen(command, preexec_fn=die_with_parent)
    threading.Thread(target=_watch_parent, args=(fd, stop), daemon=True).start()
    while not stop.is_set() and child.poll() is None:
        stop.wait(POLL_SECONDS)
    _end_group(child)
    code = child.returncode if child.returncode is not None else 1
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

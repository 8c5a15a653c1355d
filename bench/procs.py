"""Processes the benchmark starts: gateways, redis-server, clients. Every one is registered and stopped at the
end, on success, on error and on SIGTERM/SIGINT.

Client CPU and memory come from ``os.wait4`` on the client's own pid: the kernel's rusage of exactly that
child (user + sys CPU seconds of all its threads, and its peak RSS), not an estimate from sampling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

_LISTENING = re.compile(r"listening on (http://\S+)")


class BenchError(RuntimeError):
    """The benchmark itself broke (as opposed to a client missing a target)."""


class Registry:
    """Every process the benchmark started, so that all of them can be stopped whatever happens."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; only this pid (we started it)."""
        try:
            if proc.returncode is None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        except (ProcessLookupError, ChildProcessError):
            pass
        finally:
            self.forget(proc)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))
        for proc in procs:
            self.stop(proc)


REGISTRY = Registry()


def install_signal_handlers() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that ``finally`` blocks stop every process."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """Environment of every child: the bench package importable, no proxies for loopback, no network
    lookups by litellm at import time."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["LITELLM_TELEMETRY"] = "False"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("IMAGEGEN_API_KEY", None)
    return env


class _Server:
    """A started server process and its log file, both let go by :meth:`stop` (safe to call twice)."""

    proc: subprocess.Popen | None
    _log: IO[str] | None = None

    def stop(self) -> None:
        if self.proc is not None:
            REGISTRY.stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


# -- the gateway ----------------------------------------------------------------------------------------


@dataclass
class Gateway(_Server):
    """``python -m imagegen_gateway`` as a real server on loopback."""

    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    base_url: str = ""
    _ps: psutil.Process | None = None

    def spawn(self) -> Gateway:
        """Start the process; :meth:`wait_ready` waits for it to listen (spawn several, then wait for all)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # --repeat-unseeded: identical requests get identical, cached images, as the benchmarks were measured with.
        argv = [sys.executable, "-m", "imagegen_gateway", "--host", "127.0.0.1", "--port", "0", "--repeat-unseeded",
                *self.args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = REGISTRY.spawn(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, env=child_env())
        return self

    def wait_ready(self, timeout: float = 30.0) -> Gateway:
        if self.base_url:
            return self
        assert self.proc is not None and self.proc.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                match = _LISTENING.search(line)
                if match:
                    found.append(match.group(1))
                    break

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise BenchError(f"gateway did not start ({' '.join(self.args)}); see {self.log_path}")
        self.base_url = found[0]
        # Keep draining stdout so the gateway never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        self._ps = psutil.Process(self.proc.pid)
        return self

    def start(self, timeout: float = 30.0) -> Gateway:
        return self.spawn().wait_ready(timeout)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def cpu_seconds(self) -> float:
        assert self._ps is not None
        times = self._ps.cpu_times()
        return times.user + times.system

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + "/_gateway/stats", timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        request = urllib.request.Request(self.base_url + "/_gateway/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "authorization": "Bearer bench"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


# -- redis ----------------------------------------------------------------------------------------------


@dataclass
class Redis(_Server):
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0

    @staticmethod
    def available() -> str | None:
        return shutil.which("redis-server")

    def start(self, timeout: float = 15.0) -> Redis:
        binary = self.available()
        if binary is None:
            raise BenchError("redis-server not found (apt-get install -y redis-server)")
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no"]
        self.proc = REGISTRY.spawn(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchError(f"redis-server did not start; see {self.log_path}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


# -- a LiteLLM proxy ------------------------------------------------------------------------------------


@dataclass
class LiteLLMProxy(_Server):
    """``litellm --config …`` on a free loopback port (the config from :mod:`bench.litellm_proxy`)."""

    config: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    _ps: psutil.Process | None = None
    _cpu0: float = 0.0

    def start(self, timeout: float = 120.0) -> LiteLLMProxy:
        from bench.litellm_proxy import PROXY_ENV, litellm_binary, proxy_argv

        binary = litellm_binary()
        if binary is None:
            raise BenchError("litellm[proxy] is not installed (pip install -e '.[litellm-proxy]')")
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = REGISTRY.spawn(proxy_argv(binary, self.config, self.port), stdout=self._log,
                                   stderr=subprocess.STDOUT, env={**child_env(), **PROXY_ENV})
        # The proxy imports for several seconds before it listens (more on a busy machine).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    self._ps = psutil.Process(self.proc.pid)
                    self._cpu0 = self.cpu_seconds()
                    return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise BenchError(f"the LiteLLM proxy did not start; see {self.log_path}")

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cpu_seconds(self) -> float:
        """User + system CPU of the proxy and its children so far."""
        assert self._ps is not None
        times = self._ps.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def cpu_since_start(self) -> float:
        return self.cpu_seconds() - self._cpu0

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


# -- measured children ----------------------------------------------------------------------------------


@dataclass
class ChildResult:
    argv: list[str]
    returncode: int | None
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    started_unix: float
    ended_unix: float
    timed_out: bool = False
    #: Gateway CPU while this child ran: mean and worst 1-s share of one core.
    gateway_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def _vm_hwm_kb(pid: int) -> int:
    """Peak RSS of a live process's own address space, in kB (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Child:
    """A client subprocess whose rusage we collect ourselves with ``os.wait4``."""

    def __init__(self, argv: list[str], log_path: Path, *, stdout_path: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.stdout_path = stdout_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115
        self._out = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL  # noqa: SIM115
        self.started_unix = time.time()
        self._started = time.monotonic()
        self.proc = REGISTRY.spawn(argv, stdout=self._out, stderr=self._log, env=child_env())
        self.result: ChildResult | None = None
        #: The child's own peak RSS (VmHWM), sampled while it runs: ``ru_maxrss`` from wait4 would carry this
        #: harness's RSS at fork time across the child's exec.
        self._hwm_kb = 0

    def poll(self) -> ChildResult | None:
        """Reap the child if it has exited (non-blocking)."""
        if self.result is not None:
            return self.result
        self._hwm_kb = max(self._hwm_kb, _vm_hwm_kb(self.proc.pid))
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        return self._finish(status, usage, timed_out=False)

    def _finish(self, status: int, usage: Any, *, timed_out: bool) -> ChildResult:
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        REGISTRY.forget(self.proc)
        self._log.close()
        if self.stdout_path:
            self._out.close()
        self.result = ChildResult(
            argv=self.argv,
            returncode=self.proc.returncode,
            wall_s=time.monotonic() - self._started,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            maxrss_mb=(self._hwm_kb or usage.ru_maxrss) / 1024.0,  # Linux: kilobytes
            started_unix=self.started_unix,
            ended_unix=time.time(),
            timed_out=timed_out,
        )
        return self.result

    def kill(self) -> ChildResult:
        if self.result is not None:
            return self.result
        try:
            self.proc.terminate()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    return self._finish(status, usage, timed_out=True)
                time.sleep(0.05)
            self.proc.kill()
        except ProcessLookupError:
            pass
        _, status, usage = os.wait4(self.proc.pid, 0)
        return self._finish(status, usage, timed_out=True)


def wait_children(
    children: list[Child], *, timeout: float, gateways: list[Gateway | None] | None = None
) -> list[ChildResult]:
    """Wait for every child (killing those still running after ``timeout``), sampling each child's gateway
    CPU once a second so that a saturated gateway is noticed."""
    gateways = gateways or [None] * len(children)
    deadline = time.monotonic() + timeout
    samples: list[list[float]] = [[] for _ in children]
    last = [(time.monotonic(), gw.cpu_seconds() if gw else 0.0) for gw in gateways]
    first = list(last)
    ends: list[tuple[float, float] | None] = [None] * len(children)
    next_sample = time.monotonic() + 1.0
    while True:
        pending = [i for i, child in enumerate(children) if child.poll() is None]
        now = time.monotonic()
        for i, gw in enumerate(gateways):
            if gw is not None and ends[i] is None and i not in pending:
                ends[i] = (now, gw.cpu_seconds())
        if now >= next_sample:
            for i, gw in enumerate(gateways):
                if gw is None or i not in pending:
                    continue
                cpu = gw.cpu_seconds()
                t0, c0 = last[i]
                samples[i].append((cpu - c0) / max(1e-6, now - t0))
                last[i] = (now, cpu)
            next_sample = now + 1.0
        if not pending:
            break
        if now > deadline:
            for i in pending:
                children[i].kill()
            continue
        time.sleep(0.05)
    results = []
    for i, child in enumerate(children):
        result = child.result
        assert result is not None
        gw = gateways[i]
        if gw is not None:
            end = ends[i] or (time.monotonic(), gw.cpu_seconds())
            result.gateway_cpu = {
                "mean_core_share": round((end[1] - first[i][1]) / max(1e-6, end[0] - first[i][0]), 3),
                "max_1s_core_share": round(max(samples[i], default=0.0), 3),
                "cpu_s": round(end[1] - first[i][1], 2),
            }
        results.append(result)
    return results

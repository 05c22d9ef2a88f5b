"""Network namespaces and child processes for the bench.

Everything the bench runs lives in namespaces it creates here, named
``veilbench-<pid>-<role>``, and is removed here: processes are killed by the
PIDs this module recorded when it started them, then the namespaces are
deleted (which deletes their veth ends). Nothing in the root namespace is
configured: veths are created directly inside the namespaces with
``ip -n NS link add ... peer ... netns OTHER``.

Topologies (client 10.199.0.1/24, server 10.199.0.2/24 in both)::

    bare:     [client] vbc ======= vbs [server]
    delayed:  [client] vbc === vbmc [middle] vbms === vbs [server]
                              delaybridge.py: AF_PACKET, +D ms each way
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

BENCH_DIR = Path(__file__).resolve().parent
NS_PREFIX = "veilbench"
SUBNET_PREFIXLEN = 24
CLIENT_IP = "10.199.0.1"
SERVER_IP = "10.199.0.2"
MTU = 1500

# How long a process gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0
# How long a daemon gets to start listening before it counts as failed
# (python programs importing a crypto stack on a busy 2-core box need a few).
LISTEN_TIMEOUT_S = 20.0
# The bridge answers SIGUSR1 between two frames; a second is plenty even when busy.
BRIDGE_REPLY_TIMEOUT_S = 5.0
# Lines of a failed process's log quoted in the error.
LOG_TAIL_LINES = 12


class BenchError(Exception):
    """A step of the bench failed; the message is meant for the results table."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run a short command to completion and return its stdout."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside namespace ``ns`` (``ip netns exec`` execs, so the PID is kept)."""
    return ["ip", "netns", "exec", ns, *argv]


# -- processes ---------------------------------------------------------------

class Proc:
    """A long-running child started in a namespace, tracked by PID."""

    _live: ClassVar[dict[int, Proc]] = {}  # every Proc not yet stopped, for the last-resort cleanup

    def __init__(self, name: str, ns: str, argv: Sequence[str], log_dir: Path,
                 capture_stdout: bool = False) -> None:
        self.name = name
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.stdout_lines: list[str] = []
        self._stdout_event = threading.Event()
        # A new session: Ctrl-C on the terminal reaches only the bench, which
        # then stops every child itself, in order.
        self.popen = subprocess.Popen(
            ns_exec(ns, self.argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        Proc._live[self.pid] = self
        if capture_stdout:
            threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout_lines.append(line)
            self._stdout_event.set()
            self._log.write(b"[stdout] " + raw)
            self._log.flush()

    def wait_stdout(self, pred: Callable[[str], bool], timeout: float,
                    after: int = 0) -> str | None:
        """The first stdout line matching ``pred`` (from line ``after`` on), or None after
        ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stdout_lines[after:]:
                if pred(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                return None
            self._stdout_event.wait(min(left, 0.1))
            self._stdout_event.clear()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-LOG_TAIL_LINES:])

    def fail(self, what: str) -> BenchError:
        rc = self.popen.poll()
        state = f"exited {rc}" if rc is not None else "still running"
        return BenchError(f"{self.name}: {what} ({state}); log: {self.log_tail() or '(empty)'}")

    def peak_rss_kib(self) -> int | None:
        """Peak RSS (VmHWM) of the process plus its descendants, in KiB."""
        total = 0
        found = False
        for pid in [self.pid, *descendants(self.pid)]:
            hwm = read_vmhwm(pid)
            if hwm is not None:
                total += hwm
                found = True
        return total if found else None

    def stop(self) -> None:
        if self.pid not in Proc._live:
            return
        del Proc._live[self.pid]
        kids = descendants(self.pid)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_GRACE_S)
        for pid in kids:  # children it started and left behind, by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()

    @classmethod
    def stop_all(cls) -> None:
        for proc in reversed(list(cls._live.values())):
            with contextlib.suppress(Exception):
                proc.stop()


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                todo.append(int(k))
    return out


def read_vmhwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its live descendants, each with its reaped
    children's (``/proc/PID/stat`` utime, stime, cutime, cstime); 0 for a process gone."""
    ticks = 0
    for p in [pid, *descendants(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: fields are counted after its ")".
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += sum(int(x) for x in fields[11:15])  # fields 14-17 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def listening_ports(pid: int, udp: bool = False) -> set[int]:
    """TCP ports in LISTEN state (UDP: bound sockets) in the network namespace of ``pid``."""
    ports: set[int] = set()
    tables = ("udp", "udp6") if udp else ("tcp", "tcp6")
    state = "07" if udp else "0A"  # TCP_CLOSE: an unconnected UDP socket; TCP_LISTEN
    for table in tables:
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == state:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listen(proc: Proc, port: int, timeout: float = LISTEN_TIMEOUT_S,
                udp: bool = False) -> None:
    """Poll until something in ``proc``'s namespace listens on TCP (or UDP) ``port``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail(f"died before listening on port {port}")
        if port in listening_ports(proc.pid, udp):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise proc.fail(f"not listening on port {port} after {timeout:.0f} s")


# -- namespaces --------------------------------------------------------------

def wait_log(proc: Proc, text: str, timeout: float = LISTEN_TIMEOUT_S) -> None:
    """Wait until ``proc``'s log says ``text``; fail with its log's tail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log_path.read_text(errors="replace"):
            return
        if not proc.alive():
            raise proc.fail(f"exited before {text!r}")
        time.sleep(0.05)
    raise proc.fail(f"no {text!r} after {timeout:.0f} s")


def start_wireguard_devices(start: Callable[[str, str, list[str]], Proc],
                            devices: dict[str, str], work: Path,
                            timeout: float = LISTEN_TIMEOUT_S) -> dict[str, tuple[Path, str]]:
    """A wireguard-go device per ``devices`` entry (where -> interface name; ``start(name,
    where, argv)`` runs a program there) with a fresh key pair each: returns, per where, the
    private key's file and the public key. Interface names are global (the UAPI sockets in
    /var/run/wireguard): callers make them unique."""
    wg, wireguard_go = shutil.which("wg"), shutil.which("wireguard-go")
    if wg is None or wireguard_go is None:
        raise BenchError("wireguard-go or wg is not installed (bench/setup.sh)")
    keys: dict[str, tuple[Path, str]] = {}
    for where, name in devices.items():
        private = run([wg, "genkey"]).strip()
        public = subprocess.run([wg, "pubkey"], input=private + "\n", capture_output=True,
                                text=True, check=True).stdout.strip()
        path = work / f"{name}.key"
        path.write_text(private + "\n")
        path.chmod(0o600)
        keys[where] = (path, public)
        proc = start(f"wireguard-go-{name}", where, [
            "env", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1", "LOG_LEVEL=error",
            wireguard_go, "-f", name])
        deadline = time.monotonic() + timeout
        while not Path(f"/var/run/wireguard/{name}.sock").exists():
            if time.monotonic() > deadline or not proc.alive():
                raise proc.fail("did not create its device")
            time.sleep(0.05)
    return keys


class Topology:
    """The namespaces of one phase of the bench; a context manager that always cleans up."""

    def __init__(self, tag: str, log_dir: Path, delay_ms: float = 0.0, loss_pct: float = 0.0,
                 udp_budget_mb: float | None = None):
        self.tag = tag
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.delay_ms = delay_ms
        self.loss_pct = loss_pct
        self.udp_budget_mb = udp_budget_mb
        self.client = f"{NS_PREFIX}-{tag}-client"
        self.server = f"{NS_PREFIX}-{tag}-server"
        self.middle = f"{NS_PREFIX}-{tag}-middle"
        self.created: list[str] = []
        self.procs: list[Proc] = []
        self.bridge: Proc | None = None

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.created.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        self._add_ns(self.client)
        self._add_ns(self.server)
        if self.delay_ms <= 0 and self.loss_pct <= 0 and self.udp_budget_mb is None:
            run(["ip", "-n", self.client, "link", "add", "vbc", "mtu", str(MTU), "type", "veth",
                 "peer", "name", "vbs", "mtu", str(MTU), "netns", self.server])
        else:
            self._add_ns(self.middle)
            # The middle's kernel must not speak on the link (no IPv6 DAD/RS).
            run(ns_exec(self.middle, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                      "net.ipv6.conf.default.disable_ipv6=1"]))
            run(["ip", "-n", self.client, "link", "add", "vbc", "mtu", str(MTU), "type", "veth",
                 "peer", "name", "vbmc", "mtu", str(MTU), "netns", self.middle])
            run(["ip", "-n", self.server, "link", "add", "vbs", "mtu", str(MTU), "type", "veth",
                 "peer", "name", "vbms", "mtu", str(MTU), "netns", self.middle])
            for dev in ("vbmc", "vbms"):
                run(["ip", "-n", self.middle, "link", "set", dev, "up"])
            if self.loss_pct > 0:
                # The bridge drops whole frames; without this a TSO frame of
                # ~40 segments would be one draw, and loss would come in bursts.
                for ns, dev in ((self.client, "vbc"), (self.server, "vbs")):
                    run(["ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1"])
        for ns, dev, ip in ((self.client, "vbc", CLIENT_IP), (self.server, "vbs", SERVER_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/{SUBNET_PREFIXLEN}", "dev", dev])
        run(["ip", "-n", self.client, "link", "set", "vbc", "up"])
        run(["ip", "-n", self.server, "link", "set", "vbs", "up"])
        if self.middle in self.created:
            argv = [sys.executable, str(BENCH_DIR / "delaybridge.py"), "--a", "vbmc", "--b",
                    "vbms", "--delay", str(self.delay_ms / 2), "--loss", str(self.loss_pct)]
            if self.udp_budget_mb is not None:
                argv += ["--udp-budget", str(self.udp_budget_mb)]
            self.bridge = self.start("delaybridge", self.middle, argv, capture_stdout=True)
            if self.bridge.wait_stdout(lambda s: s == "ready", LISTEN_TIMEOUT_S) is None:
                raise self.bridge.fail("delay bridge did not start")

    def bridge_counters(self) -> dict[str, int]:
        """The bridge's counters since the last call (or its start), which also resets them
        and its UDP budget; {} on a bare link."""
        bridge = self.bridge
        if bridge is None:
            return {}
        seen = len(bridge.stdout_lines)
        os.kill(bridge.pid, signal.SIGUSR1)
        line = bridge.wait_stdout(lambda s: s.startswith("{"), BRIDGE_REPLY_TIMEOUT_S, seen)
        if line is None:
            raise bridge.fail("no counters after SIGUSR1")
        return dict(json.loads(line))

    def start(self, name: str, ns: str, argv: Sequence[str], capture_stdout: bool = False) -> Proc:
        proc = Proc(name, ns, argv, self.log_dir, capture_stdout=capture_stdout)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        # A second Ctrl-C (or a SIGTERM) must not cut the cleanup short.
        held = (signal.SIGINT, signal.SIGTERM)
        in_main = threading.current_thread() is threading.main_thread()
        old = [signal.signal(s, signal.SIG_IGN) for s in held] if in_main else []
        try:
            self._close()
        finally:
            for s, handler in zip(held, old, strict=False):
                signal.signal(s, handler)

    def _close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        for ns in reversed(self.created):
            delete_ns(ns)
        self.created.clear()


def ns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in out.split()]


def delete_ns(ns: str) -> None:
    """Kill what is left inside one of the bench's namespaces, then delete it."""
    for pid in ns_pids(ns):  # only processes the bench started live in its namespaces
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
            return
        if ns not in list_ns():
            return
        time.sleep(0.1)
    print(f"warning: could not delete namespace {ns}", file=sys.stderr)


def list_ns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale(force: bool = False) -> list[str]:
    """Delete namespaces left by bench runs that died (their PID tag is gone)."""
    removed = []
    for ns in list_ns():
        m = re.fullmatch(rf"{NS_PREFIX}-(\d+)-\w+", ns)
        if not m:
            continue
        pid = int(m.group(1))
        if force or (pid != os.getpid() and not Path(f"/proc/{pid}").exists()):
            delete_ns(ns)
            removed.append(ns)
    # Temp dirs of dead runs (run.py names them veilbench-PID-*).
    for d in Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}-*-*"):
        m = re.fullmatch(rf"{NS_PREFIX}-(\d+)-\w+", d.name)
        if m and d.is_dir() and (force or not Path(f"/proc/{m.group(1)}").exists()):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed

"""Real traffic for the lab's controls: captures with tcpdump, network namespaces, and the
programs (OpenVPN, wireguard-go, shadowsocks-libev, trojan, curl, ssh) that make it.

Every process is started here, remembered by PID and stopped in a ``finally``; every
namespace is named ``veillab-<pid>-<tag>``, created by the test and deleted by it (which
deletes the tun devices and veths inside). Nothing in the root namespace is configured:
root-namespace captures only listen on ``lo`` with a filter on the test's own ports.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import procs
from tests.support.wait import wait_until

NS_PREFIX = "veillab"
# tcpdump prints "listening on" once its socket is open; a busy CI box can take a second.
CAPTURE_START_TIMEOUT = 10.0
# After the last packet, give tcpdump this long to write it before it is stopped.
CAPTURE_SETTLE = 0.3


def require(program: str) -> str:
    path = shutil.which(program) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / program).exists()), None)
    if path is None:
        pytest.skip(f"{program} is not installed (scripts/install-deps installs it)")
    return path


# ------------------------------------------------------------------ namespaces
class Netns:
    """A network namespace of the test's own, with only ``lo`` up, always deleted."""

    def __init__(self, tag: str) -> None:
        self.name = f"{NS_PREFIX}-{os.getpid()}-{tag}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                procs.stop(proc)
        self._delete()

    def _delete(self) -> None:
        # Only processes this test started live in its namespace; stop any straggler.
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        # The namespace is busy until the killed processes are gone: retry for 5 s.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: subprocess.run(["ip", "netns", "del", self.name],
                                              capture_output=True).returncode == 0,
                       5, f"namespace {self.name} deleted", poll=0.1)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 20.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(argv), check=True, capture_output=True,
                              timeout=timeout, input=input)

    def start(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(self.argv(argv), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc


# ------------------------------------------------------------------ captures
@contextlib.contextmanager
def capture(path: Path, bpf: str, iface: str = "lo", ns: Netns | None = None
            ) -> Iterator[Path]:
    """tcpdump on ``iface`` (in ``ns``, else the root namespace) while the block runs."""
    tcpdump = require("tcpdump")
    # --immediate-mode: packets reach the file as they arrive, not when a ring block fills
    # (a block still in the ring when tcpdump is stopped would be lost).
    argv = [tcpdump, "-i", iface, "-n", "--immediate-mode", "-U", "-s", "0", "-B", "8192",
            "-w", str(path), bpf]
    if ns is not None:
        argv = ns.argv(argv)
    err_path = path.with_suffix(".tcpdump.log")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(err_path, "listening on", proc, timeout=CAPTURE_START_TIMEOUT)
        yield path
        time.sleep(CAPTURE_SETTLE)  # no sign that tcpdump wrote the last packet: see above
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # tcpdump writes what it has and exits
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(path: Path, text: str, proc: subprocess.Popen[bytes] | None = None,
             timeout: float = 20.0) -> None:
    """Wait until ``text`` is in the log at ``path``; fail (AssertionError, with the log's
    tail) after ``timeout`` or as soon as ``proc``, if given, has exited."""
    def log() -> str:
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def found() -> bool:
        if text in log():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {text!r} was in "
                                 f"{path.name}:\n{log()[-3000:]}")
        return False

    wait_until(found, timeout, lambda: f"{text!r} in {path.name}:\n{log()[-3000:]}")


# ------------------------------------------------------------------ a small PKI
def write_pki(directory: Path, server_name: str = "localhost") -> dict[str, Path]:
    """A CA and a server and a client certificate issued by it (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
              issuer_key: ec.EllipticCurvePrivateKey, ca: bool,
              usage: list[x509.ObjectIdentifier]) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject))
                   .issuer_name(name(issuer)).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=90))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False,
                              key_agreement=True, key_cert_sign=False, crl_sign=False,
                              encipher_only=False, decipher_only=False), critical=True)
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("veil lab test CA", ca_key, "veil lab test CA", ca_key, True, [])
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, cn, usage in (("server", server_name, ExtendedKeyUsageOID.SERVER_AUTH),
                            ("client", "client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(cn, key, "veil lab test CA", ca_key, False, [usage])
        out[role] = directory / f"{role}.pem"
        out[f"{role}_key"] = directory / f"{role}.key"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[f"{role}_key"].chmod(0o600)
    return out


# ------------------------------------------------------------------ curl
def curl(*args: str, timeout: float = 20.0) -> bytes:
    out = subprocess.run([require("curl"), "-sS", "--max-time", str(int(timeout)), *args],
                         capture_output=True, timeout=timeout + 5)
    if out.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {out.stderr.decode()}")
    return out.stdout


def start(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """A program in the root namespace (loopback only), logging to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------ a censored path
CLIENT_IP = "10.198.0.1"
SERVER_IP = "10.198.0.2"


class CensoredPath:
    """client ns -- [censor ns: ``veil lab censor`` bridging two veths] -- server ns.

    Veths are created inside the namespaces (``ip -n NS link add ... peer ... netns OTHER``),
    so nothing touches the root namespace; deleting the namespaces deletes them.
    """

    def __init__(self, workdir: Path, censor_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.client = Netns("cli")
        self.middle = Netns("mid")
        self.server = Netns("srv")
        self.censor_args = list(censor_args)
        self.censor: subprocess.Popen[bytes] | None = None
        self.censor_log = workdir / "censor.jsonl"

    def __enter__(self) -> CensoredPath:
        entered: list[Netns] = []
        try:
            for ns in (self.client, self.middle, self.server):
                ns.__enter__()
                entered.append(ns)
            # The censor's kernel must not speak on the link (no IPv6 router solicitations).
            self.middle.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                             "net.ipv6.conf.default.disable_ipv6=1"])
            self.client.run(["ip", "link", "add", "vc0", "type", "veth", "peer", "name", "vmc",
                             "netns", self.middle.name])
            self.server.run(["ip", "link", "add", "vs0", "type", "veth", "peer", "name", "vms",
                             "netns", self.middle.name])
            for dev in ("vmc", "vms"):
                self.middle.run(["ip", "link", "set", dev, "up"])
            for ns, dev, address in ((self.client, "vc0", CLIENT_IP),
                                     (self.server, "vs0", SERVER_IP)):
                ns.run(["ip", "addr", "add", f"{address}/24", "dev", dev])
                ns.run(["ip", "link", "set", dev, "up"])
            self.censor = self.middle.start(
                [sys.executable, "-m", "veil", "lab", "censor", "--a", "vmc", "--b", "vms",
                 *self.censor_args], self.censor_log)
            wait_for(self.censor_log, "ready", self.censor)
        except BaseException:
            for ns in reversed(entered):
                ns.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.client, self.server, self.middle):
            ns.__exit__(None, None, None)

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.censor_log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


# ------------------------------------------------------------------ nDPI's second opinion
def ndpi_classify(pcap: Path) -> list[tuple[int, str, str]]:
    """(server port, application, category) of each flow, as nDPI (nfstream) names them."""
    nfstream = pytest.importorskip("nfstream", reason="nfstream is not installed "
                                   "(pip install -e '.[test]' installs it)")
    streamer = nfstream.NFStreamer(source=str(pcap), n_dissections=20,
                                   statistical_analysis=False)
    return [(int(flow.dst_port), str(flow.application_name),
             str(flow.application_category_name)) for flow in streamer]

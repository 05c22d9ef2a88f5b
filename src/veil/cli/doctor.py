"""``veil doctor``: what this machine gives veil, and what is missing.

Each check says ``ok``, ``warn`` (veil runs, but a feature or some speed is missing) or
``fail`` (veil will not work here); the command exits 1 when anything failed. Beyond listing
versions it *runs* what new releases of veil's dependencies have broken before: one TLS 1.3
handshake of veil's browser-shaped client against this machine's OpenSSL, with data both ways
through the record layer, for every cipher suite.

The kernel checks (TUN with offloads, nftables) run in a child process inside a network
namespace of its own, made for the check and gone when it exits: nothing on the host's
interfaces, routes or firewall changes. They need root, as ``--tun`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Literal

from veil import __version__

Status = Literal["ok", "warn", "fail"]
MIN_PYTHON = (3, 11)
# Application data each way in the self-test: several full records and a partial one.
SELF_TEST_BYTES = 3 * (1 << 14) + 1000
# The kernel checks run `nft` and open a TUN device: seconds at most, even on a slow box.
NAMESPACE_CHECK_TIMEOUT_S = 20.0
CLONE_NEWNET = 0x40000000


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str  # what was checked: "python", "cryptography", "tls self-test", "tun", ...
    status: Status
    detail: str  # what was found: versions, "offloads on", the error
    hint: str = ""  # what to do about a warn or fail


# ------------------------------------------------------------------------ the checks
def check_python() -> Check:
    version = platform.python_version()
    detail = f"{platform.python_implementation()} {version} ({sys.executable})"
    if sys.version_info < MIN_PYTHON:
        return Check("python", "fail", detail, "veil needs Python 3.11 or newer")
    return Check("python", "ok", detail)


def check_requirements(requirements: list[str] | None = None) -> list[Check]:
    """Every dependency veil declares (for this platform) is installed within its bounds."""
    from packaging.requirements import Requirement

    if requirements is None:
        try:
            requirements = metadata.requires("veil") or []
        except metadata.PackageNotFoundError:
            return [Check("dependencies", "warn", "veil runs from a source tree, not installed: "
                          "its bounds cannot be read", "pip install . (or scripts/install-deps)")]
    checks = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's (tests, bench), or another platform's
        wanted = str(req.specifier) or "any"
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            checks.append(Check(req.name, "fail", f"not installed (veil needs {wanted})",
                                f"pip install '{req.name}{req.specifier}'"))
            continue
        if req.specifier.contains(installed, prereleases=True):
            checks.append(Check(req.name, "ok", f"{installed} ({wanted})"))
        else:
            checks.append(Check(req.name, "fail", f"{installed}, but veil needs {wanted}",
                                f"pip install '{req.name}{req.specifier}'"))
    return checks


def check_openssl() -> Check:
    from cryptography.hazmat.backends.openssl.backend import backend

    detail = (f"Python's ssl: {ssl.OPENSSL_VERSION}; cryptography's: "
              f"{backend.openssl_version_text()}")
    if not ssl.HAS_TLSv1_3:
        return Check("openssl", "fail", detail, "the server's TLS needs OpenSSL with TLS 1.3")
    return Check("openssl", "ok", detail)


def check_event_loop() -> Check:
    try:
        import uvloop  # noqa: F401 - importable is what matters
    except ImportError:
        return Check("event loop", "warn", "asyncio (uvloop is not installed)",
                     "pip install uvloop: about twice the throughput")
    return Check("event loop", "ok", f"uvloop {metadata.version('uvloop')}")


def check_tls_self_test() -> Check:
    """veil's TLS client against this OpenSSL, in memory, once per cipher suite."""
    from veil.transport.tls13.keys import SUITES

    suites = []
    try:
        for suite in sorted(SUITES):
            suites.append(_handshake_and_echo(suite))
    except Exception as exc:  # any failure is the finding; it is reported, not raised
        return Check("tls self-test", "fail", f"{type(exc).__name__}: {exc}",
                     "this cryptography/OpenSSL breaks veil's TLS client: install the "
                     "versions of requirements/veil.lock and report it")
    return Check("tls self-test", "ok",
                 f"handshake and {SELF_TEST_BYTES} bytes each way: {', '.join(suites)}")


def _handshake_and_echo(suite: int) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from veil.manage.state import self_signed_certificate
    from veil.transport.tls13.client import TlsClient
    from veil.transport.tls13.events import ApplicationData, HandshakeComplete
    from veil.transport.tls13.profile import CHROME

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_certificate(key, "doctor.invalid")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with _pem_files(cert.public_bytes(serialization.Encoding.PEM),
                    key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())) as (cert_path, key_path):
        context.load_cert_chain(cert_path, key_path)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    # Python's ssl cannot choose among TLS 1.3 suites: the client offers only the one tested.
    client = TlsClient("doctor.invalid", spec=dataclasses.replace(CHROME, cipher_suites=(suite,)))
    client.connect()
    payload = os.urandom(SELF_TEST_BYTES)
    received = bytearray()
    done = False
    for _ in range(20):  # a handshake takes a few round trips; more means it is stuck
        incoming.write(client.data_to_send())
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        client.receive_data(outgoing.read())
        while (event := client.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                done = True
        if done:
            break
    if not done:
        raise RuntimeError("the TLS handshake did not complete")
    incoming.write(client.data_to_send())
    incoming.write(client.send(payload))
    echoed = bytearray()
    while len(echoed) < len(payload):
        try:
            echoed += server.read(len(payload))
        except ssl.SSLWantReadError:
            break
    if bytes(echoed) != payload:
        raise RuntimeError(f"OpenSSL read {len(echoed)} bytes that are not the {len(payload)} "
                           "veil's client sent")
    server.write(bytes(echoed))
    client.receive_data(outgoing.read())
    while (event := client.next_event()) is not None:
        if isinstance(event, ApplicationData):
            received += event.data
    if bytes(received) != payload:
        raise RuntimeError(f"veil's client read {len(received)} bytes that are not the "
                           f"{len(payload)} OpenSSL sent")
    cipher = server.cipher()
    return cipher[0] if cipher else f"0x{suite:04x}"


@contextlib.contextmanager
def _pem_files(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """Two temporary files for ssl's load_cert_chain, which reads only files."""
    with tempfile.TemporaryDirectory(prefix="veil-doctor-") as directory:
        cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(0o600)
        key_path.write_bytes(key)
        yield str(cert_path), str(key_path)


def check_kernel() -> list[Check]:
    """The kernel and the tools ``--tun`` uses (Linux only)."""
    if sys.platform != "linux":
        return [Check("kernel", "warn", f"{platform.system()} {platform.release()}",
                      "--tun needs Linux; the proxies work everywhere")]
    checks = [Check("kernel", "ok", f"Linux {platform.release()}")]
    nft = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
    if not Path("/dev/net/tun").exists():
        checks.append(Check("tun", "warn", "no /dev/net/tun",
                            "--tun needs the tun module: modprobe tun"))
    if nft is None:
        checks.append(Check("nftables", "warn", "nft is not installed",
                            "--tun needs it: apt-get install nftables"))
    if os.geteuid() != 0:
        checks.append(Check("namespace checks", "warn", "not run: they need root",
                            "run `sudo veil doctor` to check TUN and nftables"))
        return checks
    found = _run_namespace_checks()
    checks += [c for c in found if not (c.name == "nftables" and nft is None)]
    return checks


def _run_namespace_checks() -> list[Check]:
    """Run :func:`_namespace_checks` in a child inside a network namespace of its own."""
    try:
        proc = subprocess.run([sys.executable, "-m", "veil.cli.doctor", "--in-namespace"],
                              capture_output=True, text=True, check=False,
                              timeout=NAMESPACE_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [Check("namespace checks", "fail",
                      f"no answer in {NAMESPACE_CHECK_TIMEOUT_S:.0f} s (TUN or nft hangs)")]
    try:
        return [Check(**item) for item in json.loads(proc.stdout)]
    except (ValueError, TypeError):  # the child crashed: veil's TUN code did
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [Check("namespace checks", "fail", f"the check crashed: {error}")]


def _namespace_checks() -> list[Check]:
    """In a fresh network namespace: open a TUN device with offloads, load an nftables
    table. Both disappear with the namespace when this process exits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        error = os.strerror(ctypes.get_errno())
        return [Check("network namespaces", "warn", f"unshare failed: {error}",
                      "the netns tests and site-to-site need them")]
    checks = [Check("network namespaces", "ok", "a namespace of its own for these checks")]
    from veil.errors import VeilError
    from veil.net.tun_linux import TunDevice, nft

    try:
        device = TunDevice("veildoctor0")
    except VeilError as exc:
        checks.append(Check("tun", "fail", str(exc), "--tun will not work here"))
    else:
        offload = device.offload
        device.close()
        checks.append(Check("tun", "ok" if offload else "warn",
                            "vnet headers, TSO offload " + ("on" if offload else "refused"),
                            "" if offload else "--tun works, one packet per read (slower)"))
    try:
        nft("table inet veil_doctor {\n chain probe {\n"
            "  type filter hook output priority 0;\n }\n}\n")
    except VeilError as exc:
        checks.append(Check("nftables", "fail", str(exc), "--tun's kill switch needs it"))
    else:
        version = subprocess.run(["nft", "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
        checks.append(Check("nftables", "ok", f"{version}: a table loaded"))
    return checks


# ------------------------------------------------------------------------ the command
CHECKS: tuple[Callable[[], Check | list[Check]], ...] = (
    check_python,
    lambda: Check("veil", "ok", f"{__version__} ({Path(__file__).resolve().parents[1]})"),
    check_requirements, check_openssl, check_event_loop, check_tls_self_test, check_kernel)


def run_checks() -> Iterator[Check]:
    for check in CHECKS:
        try:
            found = check()
        except Exception as exc:  # a check that cannot even run is a finding, not a crash
            name = getattr(check, "__name__", "check").removeprefix("check_").replace("_", " ")
            found = Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}")
        yield from (found if isinstance(found, list) else [found])


def run_doctor(args: argparse.Namespace) -> int:
    checks = []
    for check in run_checks():
        checks.append(check)
        if not args.json:
            line = f"{check.status:<4}  {check.name:<18} {check.detail}"
            print(line + (f"\n      {'':<18} -> {check.hint}" if check.hint else ""),
                  flush=True)
    failed = [c.name for c in checks if c.status == "fail"]
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    elif failed:
        print(f"veil will not work here: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def add_doctor_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = sub.add_parser(
        "doctor", help="check this machine: versions, a TLS self-test, TUN and nftables",
        description="Print the versions of Python, OpenSSL, cryptography, uvloop and every "
                    "other dependency; run veil's TLS client against this machine's OpenSSL; "
                    "and, as root, check TUN offloads and nftables inside a throwaway network "
                    "namespace. Exits 1 when veil cannot work here.")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")


if __name__ == "__main__" and sys.argv[1:] == ["--in-namespace"]:
    print(json.dumps([dataclasses.asdict(c) for c in _namespace_checks()]))

"""``veil lab installs``, ``passive`` and ``report`` run as a user runs them (``python -m veil``
in a subprocess) on real traffic: real ``veil serve`` installs on loopback, and captures of a
real veil session's life.

Positive controls: two installs that share a seed (the naive build: one site for all) are
flagged by ``veil lab installs``; a session kept up by a periodic PING (the build before the
idle close) is flagged by ``veil lab passive``. veil passes both: two fresh installs share
nothing a scanner could use, and veil's idle-closing connection shows no heartbeat.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import synth
from tests.lab.test_idle import KEEPALIVE_S, MOMENT_GAP_S, heartbeat_life, veil_idle_life
from tests.support import procs
from veil.lab.flow import Endpoint, Flow, Packet
from veil.lab.idle import NAME as IDLE

#: One lab command: a scan makes about 8 requests per server, each under a second here.
COMMAND_TIMEOUT_S = 60.0
#: The idle detector's options for the scaled-down life of test_idle (nginx's 75 s is 3 s).
IDLE_OPTIONS = ["--keepalive-timeout", str(KEEPALIVE_S), "--moment-gap", str(MOMENT_GAP_S)]


def veil_lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*procs.VEIL, "lab", *args], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two fresh installs (``a``, ``b``) and ``twin``, a third made with ``a``'s seed."""
    a = procs.start_veil_server(tmp_path_factory.mktemp("a"))
    started = [a]
    try:
        started.append(b := procs.start_veil_server(tmp_path_factory.mktemp("b")))
        twin_dir = tmp_path_factory.mktemp("twin")
        (twin_dir / "state").mkdir(mode=0o700)
        seed = twin_dir / "state" / "site.seed"
        seed.write_bytes((a.state / "site.seed").read_bytes())
        seed.chmod(0o600)
        started.append(twin := procs.start_veil_server(twin_dir))
        yield {name: f"127.0.0.1:{s.port}" for name, s in
               (("a", a), ("b", b), ("twin", twin))}
    finally:
        for server in started:
            procs.stop(server.proc)


def test_installs_two_fresh_pass_and_a_shared_seed_is_flagged(
        installs: dict[str, str], tmp_path: Path) -> None:
    fresh = veil_lab("installs", installs["a"], f"https://{installs['b']}", "--json")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    fresh_json = json.loads(fresh.stdout)
    assert fresh_json["installs"] == [installs["a"], f"https://{installs['b']}"]
    assert not fresh_json["verdict"]["flagged"]
    assert fresh_json["verdict"]["details"]["a"]["title"]  # the scan saw a real page

    twins = veil_lab("installs", installs["a"], installs["twin"], "--json")
    assert twins.returncode == 1, twins.stdout + twins.stderr
    verdict = json.loads(twins.stdout)["verdict"]
    print(verdict["evidence"])
    assert verdict["flagged"]
    assert "title" in verdict["details"]["shared_items"]
    assert any("ETag" in e for e in verdict["evidence"])

    text = veil_lab("installs", installs["a"], installs["twin"])
    assert text.returncode == 1
    title_row = next(line for line in text.stdout.splitlines() if line.startswith("title"))
    assert title_row.endswith("SHARED")
    assert "verdict: FLAGGED" in text.stdout

    (fresh_file := tmp_path / "fresh.json").write_text(fresh.stdout)
    (twins_file := tmp_path / "twins.json").write_text(twins.stdout)
    report = veil_lab("report", str(fresh_file), str(twins_file))
    assert report.returncode == 1, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("same-install"))
    assert row.split() == ["same-install", "2", "2", "1"]
    assert f"== installs side by side: {installs['a']} vs {installs['twin']}" in report.stdout

    page = tmp_path / "report.html"
    assert veil_lab("report", str(fresh_file), str(twins_file), "--html", "-o",
                    str(page)).returncode == 1
    html = page.read_text()
    assert html.count("<h2 id='installs-") == 2
    assert f"<th>{installs['a']}</th><th>{installs['twin']}</th>" in html
    assert "<tr class='flag'><td>title</td>" in html
    fresh_section = html[html.index("<h2 id='installs-1'>"):html.index("<h2 id='installs-2'>")]
    assert "<tr class='flag'>" not in fresh_section


def test_installs_usage_errors() -> None:
    bad = veil_lab("installs", "nonsense", "127.0.0.1:1")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    refused = veil_lab("installs", "127.0.0.1:1", "127.0.0.1:1")
    assert refused.returncode == 2 and "cannot scan 127.0.0.1:1" in refused.stderr


def test_installs_of_a_plain_http_port_says_it_speaks_no_tls() -> None:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    serving = threading.Thread(target=site.serve_forever, daemon=True)
    serving.start()
    try:
        target = f"127.0.0.1:{site.server_address[1]}"
        plain = veil_lab("installs", target, target)
    finally:
        site.shutdown()
        site.server_close()
        serving.join()
    assert plain.returncode == 2, plain
    # OpenSSL's reason (WRONG_VERSION_NUMBER here) may differ between its versions.
    assert "no TLS handshake (" in plain.stderr, plain.stderr
    assert f"a plain-HTTP site is http://{target}" in plain.stderr, plain.stderr


# ------------------------------------------------------------------ the idle detector
def write_capture(path: Path, flows: list[Flow], end: float | None = None) -> None:
    """The relay's flows as one capture; ``end``: the capture ran until then (an ACK of the
    first flow's client then, as tcpdump would have seen one)."""
    packets: list[Packet] = []
    for flow in flows:
        packets += synth.packets_of_flow(flow)
    if end is not None:
        packets.append(Packet(end, "tcp", flows[0].client, flows[0].server, b"", 0x10, 0))
    packets.sort(key=lambda p: p.time)
    synth.write_pcap(path, packets)


def record_life(kind: str, pcap: Path) -> None:
    """Run a session's life (``heartbeat``: the build that pinged; ``veil``: today's idle
    close) through test_idle's recording relay in a child process, as tcpdump would record
    it beside the programs, into ``pcap``. A child, because the relay leaves its sockets to
    the loop's end, and their warnings belong to that process, not to this test run."""
    done = subprocess.run([sys.executable, "-m", "tests.lab.test_cli_real", kind, str(pcap)],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0 and pcap.exists(), done.stderr[-3000:]


def _record_life_here(kind: str, pcap: Path) -> None:
    workdir = pcap.with_suffix(".d")
    if kind == "heartbeat":
        flow, end = asyncio.run(heartbeat_life(workdir))
        write_capture(pcap, [flow], end)
    else:
        relay, _, _ = asyncio.run(veil_idle_life(workdir))
        write_capture(pcap, relay.flows)


def idle_verdicts(out: str) -> list[dict[str, Any]]:
    return [next(v for v in flow["verdicts"] if v["detector"] == IDLE)
            for flow in json.loads(out)]


def test_passive_flags_a_heartbeat_and_passes_veils_idle_close(tmp_path: Path) -> None:
    record_life("heartbeat", beating := tmp_path / "heartbeat.pcap")
    flagged = veil_lab("passive", str(beating), "--json", *IDLE_OPTIONS)
    assert flagged.returncode == 1, flagged.stderr
    (verdict,) = idle_verdicts(flagged.stdout)
    print(f"heartbeat build: {verdict['evidence']}")
    # Both tells, or one: on two loaded cores the scaled 0.6 s period can jitter past 10 %.
    assert verdict["flagged"] and verdict["labels"]

    record_life("veil", veil := tmp_path / "veil.pcap")
    passed = veil_lab("passive", str(veil), "--json", *IDLE_OPTIONS)
    verdicts = idle_verdicts(passed.stdout)
    print(f"veil: {[v['evidence'] for v in verdicts]}")
    assert len(verdicts) == 2 and not any(v["flagged"] for v in verdicts)
    assert all(v["applicable"] for v in verdicts)  # judged, not skipped
    assert passed.returncode == 0, passed.stdout  # and no other detector flags veil

    text = veil_lab("passive", str(beating), *IDLE_OPTIONS)
    assert f"FLAGGED by {IDLE}" in text.stdout and "small-record moments every" in text.stdout
    report = veil_lab("report", str(beating), str(veil), *IDLE_OPTIONS)
    assert report.returncode == 1
    row = next(line for line in report.stdout.splitlines() if line.startswith(IDLE))
    assert row.split() == [IDLE, "3", "3", "1"]


def test_the_idle_options_have_nginxs_defaults_and_are_checked(tmp_path: Path) -> None:
    help_text = " ".join(veil_lab("passive", "--help").stdout.split())
    assert "keepalive_timeout" in help_text and "(default: nginx's 75)" in help_text
    # A heartbeat every 15 s for 105 s, judged with nginx's defaults: the unscaled build.
    client, server = Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", 443)
    ping = synth.record(23, bytes(30))
    exchanges: list[tuple[float, Endpoint, Endpoint, bytes]] = [
        (1.0, client, server, synth.record(23, bytes(500))),
        (1.05, server, client, synth.record(23, bytes(3000)))]
    for beat in range(1, 8):
        t = 1.0 + 15.0 * beat
        exchanges += [(t, client, server, ping), (t + 0.05, server, client, ping)]
    seq = {client: 1000, server: 5000}
    packets = [Packet(0.9, "tcp", client, server, b"", 0x02, 999),
               Packet(0.9, "tcp", server, client, b"", 0x12, 4999)]
    for t, src, dst, data in exchanges:
        packets.append(Packet(t, "tcp", src, dst, data, 0x18, seq[src]))
        seq[src] += len(data)
    synth.write_pcap(capture := tmp_path / "beats.pcap", packets)
    out = veil_lab("passive", str(capture), "--json")
    (verdict,) = idle_verdicts(out.stdout)
    assert out.returncode == 1
    assert set(verdict["labels"]) == {"heartbeat", "immortal"}
    # Told the server closes after 200 s, nothing is immortal; the beat is still a beat.
    (verdict,) = idle_verdicts(veil_lab("passive", str(capture), "--json",
                                        "--keepalive-timeout", "200").stdout)
    assert verdict["labels"] == ["heartbeat"]
    bad = veil_lab("passive", str(capture), "--moment-gap", "0")
    assert bad.returncode == 2 and "--moment-gap" in bad.stderr


if __name__ == "__main__":
    _record_life_here(sys.argv[1], Path(sys.argv[2]))

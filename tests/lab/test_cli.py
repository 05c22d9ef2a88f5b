"""``veil lab passive|probe|report`` as a user runs them (in process)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.lab import synth
from tests.lab.test_probe import serving, website
from veil.cli import main
from veil.lab.flow import Direction, Endpoint

C, S = Direction.CLIENT, Direction.SERVER


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """A shadowsocks-like flow and a TLS flow to a blocked name."""
    packets = synth.tcp_packets([(C, random.Random(1).randbytes(150))],
                                server=Endpoint("10.0.0.2", 8388))
    hello = synth.hello_from_lists([0x1301], [0x0000], None, [], sni="www.blocked.example")
    packets += synth.tcp_packets([(C, hello)], client=Endpoint("10.0.0.1", 40001))
    path = tmp_path / "capture.pcap"
    synth.write_pcap(path, packets)
    return path


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_passive_text_and_json(capture: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# comment\nblocked.example\n")
    assert run(["lab", "passive", str(capture), "--blocklist", str(blocklist)]) == 1
    out = capsys.readouterr().out
    assert "tcp 10.0.0.1:40000 -> 10.0.0.2:8388" in out
    assert "FLAGGED by fully-encrypted, protocol-signatures" in out
    assert "SNI 'www.blocked.example' is on the block list" in out

    assert run(["lab", "passive", str(capture), "--json"]) == 1
    flows = json.loads(capsys.readouterr().out)
    assert [f["flagged"] for f in flows] == [
        ["fully-encrypted", "protocol-signatures"], ["clienthello-fingerprint"]]
    (json_file := tmp_path / "flows.json").write_text(json.dumps(flows))

    assert run(["lab", "report", str(json_file), "--html", "-o", str(tmp_path / "r.html")]) == 1
    assert capsys.readouterr().err == (
        f"veil: wrote {tmp_path / 'r.html'}: flagged by fully-encrypted, protocol-signatures, "
        "clienthello-fingerprint\n")  # not silent
    page = (tmp_path / "r.html").read_text()
    assert "<h2 id='fully-encrypted'>" in page and "10.0.0.2:8388" in page
    assert run(["lab", "report", str(capture)]) == 1
    table = capsys.readouterr().out
    assert table.splitlines()[1].split() == ["fully-encrypted", "2", "2", "1"]


def test_probe_exit_status(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with serving(website) as a, serving(website) as b:
        assert run(["lab", "probe", a.address, "--reference", b.address, "--wait", "0.5",
                    "--no-tls"]) == 0
        assert "verdict: passes" in capsys.readouterr().out
        assert run(["lab", "probe", a.address, "--reference", "127.0.0.1:1", "--wait", "0.5",
                    "--no-tls", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"]["flagged"] and result["probes"][0]["name"] == "silence"
    (tmp_path / "probe.json").write_text(json.dumps(result))
    assert run(["lab", "report", str(tmp_path / "probe.json")]) == 1
    assert "FLAG 127.0.0.1:" in capsys.readouterr().out


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["lab", "probe", "nonsense"]) == 1
    assert "HOST:PORT" in capsys.readouterr().err
    assert run(["lab", "censor", "--a", "x", "--b", "y", "--probability", "2"]) == 2
    assert run(["lab", "censor", "--a", "x", "--b", "y", "--block", "nonsense"]) == 2
    assert "cannot block on" in capsys.readouterr().err
    censor = ["lab", "censor", "--a", "x", "--b", "y"]
    assert run([*censor, "--throttle-drop", "0.5"]) == 2
    assert "needs --throttle-after" in capsys.readouterr().err
    assert run([*censor, "--block-port", "70000"]) == 2
    assert "not a port" in capsys.readouterr().err
    (rules := tmp_path / "rules").write_text("block-port 443\nblock-everything\n")
    assert run([*censor, "--rules", str(rules)]) == 2
    assert "line 2" in capsys.readouterr().err
    (bad := tmp_path / "bad.pcap").write_bytes(b"nope")
    assert run(["lab", "passive", str(bad)]) == 2
    assert "not a pcap" in capsys.readouterr().err

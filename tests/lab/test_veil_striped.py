"""The lab's detectors on a striped client's traffic (``--connections 3 --stripe``): each of
its TLS connections must pass what a single veil connection passes (tests/lab/test_veil.py),
while an 8 MiB download may be spread over them in CHUNKs (veil.protocol.stripe).

The lab judges flows one at a time: it has no detector that counts parallel connections to
one host, so what it cannot say here is whether 3 connections that carry data at once look
like a browser's (HTTP/1.1 keeps up to 6 per host; with h2, which veil's handshake
negotiates, a browser keeps one per origin). The detectors themselves are checked against
naive builds in tests/lab/test_controls.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.test_veil import SHOULD_PASS, capture_fetch
from tests.support import procs

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CONNECTIONS = 3


def test_every_connection_of_a_striped_pool_passes(module_dir: Path,
                                                   nginx: procs.Nginx) -> None:
    workdir = module_dir / "lab-veil-striped"
    server = procs.start_veil_server(workdir, "--cover", f"http://127.0.0.1:{nginx.http_port}")
    try:
        flows = capture_fetch(workdir, server, f"http://127.0.0.1:{nginx.http_port}", "striped",
                              client_args=("--connections", str(CONNECTIONS), "--stripe"))
    finally:
        procs.stop(server.proc)
    assert len(flows) == CONNECTIONS, [f.flow for f in flows]
    # How much of the download each connection carried: on loopback the stream's own
    # connection mostly keeps up, and pieces move to the others only when it falls behind
    # (veil.net.stripe.SWITCH_MARGIN), so the split varies with the machine's load.
    print(f"\nbytes down per connection: {sorted(f.flow['server_bytes'] for f in flows)}")
    for report in flows:
        for detector in (*SHOULD_PASS, "tls-in-tls"):
            verdict = report.verdict(detector)
            assert not verdict.flagged, (detector, verdict.evidence)

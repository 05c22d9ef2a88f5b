"""The blocking story end to end: a censor in the path blocks veil's server while a download
runs; the client moves to the CDN way by itself, the next download works within 10 s, and when
the block lifts the client returns to the direct way. A slow, lossy but working path moves
nothing. UDP (SOCKS5 UDP ASSOCIATE) works over the CDN way.

Topology (tests/netns/blocklab.py)::

    [client] ==== [middle: veil lab censor --rules FILE | impair bridge] ==== [server]
    veil connect KEY (direct 10.198.0.2:8443,       veil serve 10.198.0.2:8443 --via
    then https://cdn.test/SECRET/ at 10.198.0.3)    nginx as a CDN on 10.198.0.3:443

Real CLI processes; which address carried each download comes from nftables counters in the
client's namespace, the switches from the client's log.

The client runs with veil's defaults. A blackholed server under a live session is found
when the user's next request hears nothing: a PING 2 s after its OPEN, the session declared
dead 5 s later, and the way left at once (a session that stopped answering blocks its way on
the first time): 7.3 s from block to a working download measured here; 25.8 s before the
probe, when only Chromium's ping with a write after 10 s of silence found it. A reset is
found at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netns.blocklab import (
    CDN_IP,
    CDN_NAME,
    EVERY_WAY_FAILED,
    SERVER_IP,
    SERVER_PORT,
    SOCKS_PORT,
    SWITCHED_AWAY,
    SWITCHED_BACK,
    UDP_ECHO_PORT,
    BlockLab,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# The lab's requirement (issue 16): from the block to the next download that succeeds.
# Measured here with veil's defaults: a reset 0.7-1.5 s (the live session is reset, two
# refused reconnects 0.25-0.75 s apart, the CDN way connects in ~0.1 s); a blackhole 7.3 s (the
# next request's OPEN hears nothing: a PING 2 s later, no answer within 5 s, the way blocked at
# once as the session went silent, then the CDN way in ~0.3 s). The margin over the blackhole,
# ~2.5 s, is for late timers and slow starts on a loaded 2-core box; the bound itself is the
# lab's requirement.
BLOCK_TO_WORKING_S = 10.0
# One download of the next file (1 MiB): ~0.1 s on either way here, 0.5 s on a loaded box.
ATTEMPT_S = 4.0
# After the block lifts: the prober's first try of the direct way comes probe_initial (5 s)
# x 0.5-1.5 after the block, later ones after 10 s x 0.5-1.5 (FailoverConfig), so the direct
# way is back within ~15 s of the block at worst; measured 2-6 s after the lift. Margin for a
# loaded box: 2x.
BACK_WITHIN_S = 30.0
# The negative control: 150 ms round trip and 1 % loss each way (issue 16's figures).
SLOW_DELAY_MS = 75.0
SLOW_LOSS = 0.01
# Downloads over the slow path: 1 MiB at 150 ms RTT and 1 % loss took 0.4-1.5 s here; the
# bound is 20x that, for a loss burst on a loaded box (a failure here is not a switch).
SLOW_DOWNLOADS = 5
SLOW_DOWNLOAD_S = 30.0

BLOCKS = {
    # The GFW's 20 Aug 2025: forged RSTs on every connection to the server's port.
    "rst": f"block-port {SERVER_PORT}\ninject-rst\n",
    # A null-routed server address; the CDN's address stays reachable.
    "blackhole": f"block-ip {SERVER_IP}\n",
}

UDP_CLIENT = r"""
import json, os, socket, struct, sys
socks_port, echo_port = int(sys.argv[1]), int(sys.argv[2])
ctrl = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
ctrl.sendall(b"\x05\x01\x00")
assert ctrl.recv(2) == b"\x05\x00"
ctrl.sendall(b"\x05\x03\x00\x01" + bytes(6))
reply = ctrl.recv(10)
assert reply[:2] == b"\x05\x00", reply
relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port)
echoed = []
for size in (1, 100, 1200, 8000):
    payload = os.urandom(size)
    udp.sendto(header + payload, relay)
    data, _ = udp.recvfrom(65536)
    echoed.append(data == header + payload)
udp.close()
ctrl.close()
print(json.dumps({"echoed": echoed}))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[BlockLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces (CI runs as root)")
    for program in ("nginx", "curl", "nft"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            pytest.skip(f"{program} is not installed (scripts/install-deps installs it)")
    with BlockLab() as blocklab:
        blocklab.start_veil_server()
        blocklab.start_veil_client()
        yield blocklab


@pytest.fixture
def direct(lab: BlockLab) -> Iterator[BlockLab]:
    """The censor, no rules, and the client back on the direct way; no rules afterwards."""
    if lab.censor is None:
        lab.use_censor()
    lab.set_rules("")
    wait_until(lambda: lab.carrier_of_next(ATTEMPT_S) == SERVER_IP, BACK_WITHIN_S,
               "the next download on the direct way", poll=0.2)
    try:
        yield lab
    finally:
        lab.set_rules("")


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_a_blocked_server_moves_the_client_to_the_cdn_and_back(
        direct: BlockLab, kind: str) -> None:
    lab = direct
    # A download is running through the forward when the block comes.
    running = lab.start("client", "curl-running", lab.curl_argv(
        "huge.bin", "/dev/null", 120, "--limit-rate", "2M"))
    try:
        wait_until(lambda: lab.received()[SERVER_IP] > 2 * 1024 * 1024, 10,
                   "the running download under way")
        mark = lab.log_mark()
        blocked = lab.set_rules(BLOCKS[kind])
        took = lab.time_to_working(blocked, BLOCK_TO_WORKING_S)
        switched = SWITCHED_AWAY.search(lab.log_since(mark))
        assert switched, lab.log_since(mark)
        assert switched["to"].startswith(f"https://{CDN_NAME}/"), switched.group(0)
        assert EVERY_WAY_FAILED not in lab.log_since(mark)
        assert took <= BLOCK_TO_WORKING_S, (took, lab.log_since(mark))
        # The next download after it goes through the CDN's address, not the server's.
        assert lab.carrier_of_next(ATTEMPT_S) == CDN_IP
    finally:
        lab.stop(running)
    mark = lab.log_mark()
    lifted = lab.set_rules("")
    wait_until(lambda: SWITCHED_BACK.search(lab.log_since(mark)), BACK_WITHIN_S,
               lambda: f"the client back on the direct way: {lab.log_since(mark)[-3000:]}",
               poll=0.1)
    back = time.monotonic() - lifted
    assert lab.carrier_of_next(ATTEMPT_S) == SERVER_IP
    print(f"{kind}: '{switched.group(0)}'; the next download worked {took:.1f} s after the "
          f"block; back on the direct way {back:.1f} s after the block lifted")


def test_udp_through_socks5_works_over_the_cdn_way(direct: BlockLab) -> None:
    lab = direct
    mark = lab.log_mark()
    blocked = lab.set_rules(BLOCKS["rst"])
    lab.time_to_working(blocked, BLOCK_TO_WORKING_S)
    assert SWITCHED_AWAY.search(lab.log_since(mark)), lab.log_since(mark)
    before = lab.received()
    script = lab.dir / "udp_client.py"
    script.write_text(UDP_CLIENT)
    out = lab.exec("client", sys.executable, str(script), str(SOCKS_PORT), str(UDP_ECHO_PORT))
    assert json.loads(out.stdout.splitlines()[-1]) == {"echoed": [True] * 4}, out.stdout
    after = lab.received()
    assert after[SERVER_IP] == before[SERVER_IP]  # nothing from the blocked server...
    assert after[CDN_IP] - before[CDN_IP] >= 8000  # ...the datagrams came through the CDN


def test_a_slow_lossy_working_path_moves_nothing(lab: BlockLab) -> None:
    """Negative control: 150 ms round trip and 1 % loss each way, a fresh client, several
    downloads on fresh and reused sessions: every one works, on the direct way, with no
    switch. (The positive control is the test above: the same client does switch on a
    block.)"""
    bridge = lab.use_impair(SLOW_DELAY_MS, SLOW_LOSS)
    try:
        lab.restart_client()
        mark = lab.log_mark()
        took = []
        for _ in range(SLOW_DOWNLOADS):
            started = time.monotonic()
            assert lab.carrier_of_next(SLOW_DOWNLOAD_S) == SERVER_IP, lab.log_since(mark)
            took.append(round(time.monotonic() - started, 1))
        stats = bridge.stats()
        assert stats["b2a"]["lost"] > 0, stats  # the loss did happen
        log = lab.log_since(mark)
        assert " blocked (" not in log and EVERY_WAY_FAILED not in log, log
        print(f"slow path (150 ms RTT, 1 % loss): {SLOW_DOWNLOADS} x 1 MiB in {took} s, "
              f"no switch; frames lost server->client {stats['b2a']['lost']}")
    finally:
        lab.use_censor()
        lab.restart_client()

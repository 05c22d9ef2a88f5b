"""What the operator learns of a block, and a throttle the client must leave, end to end in
namespaces (tests/netns/blocklab.py: client -- lab censor -- server, nginx as a CDN on the
server's second address).

Block reports: the censor blocks the direct way (a blackhole, then forged RSTs, each on a fresh
lab); the client moves to the CDN way and reports the block through it; the server counts it
per way in and kind in /metrics and runs its ``--on-block`` hook, with nothing of the user's
traffic in either. The report can only have come through the CDN: the direct way is blocked
when it is counted, and the server's only veil session then is the CDN way's.

A persistent throttle (Russia's TSPU: each connection to the server's address frozen after N
bytes): every handshake fits in the free bytes, so a probe of the direct way succeeds and only
a download finds the freeze. The client must end up on the CDN way with downloads working
within seconds, and must not flap: a way that is given back and freezes again is probed ever
more slowly (protocol/failover.py). The negative control (150 ms RTT and 1 % loss move
nothing) is tests/netns/test_blocking.py's test_a_slow_lossy_working_path_moves_nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.netns.blocklab import (
    CDN_NAME,
    CLIENT_IP,
    FORWARD_PORT,
    NEXT_SIZE,
    SERVER_IP,
    SERVER_PORT,
    SWITCHED_AWAY,
    SWITCHED_BACK,
    BlockLab,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# The server's admin listener (for /metrics), on its namespace's loopback: no credentials.
ADMIN_PORT = 9180
# The direct way as reports, metrics and the hook name it (veil.protocol.report.way_label).
DIRECT_WAY = f"tls://{SERVER_IP}:{SERVER_PORT}"
BLOCKS = {
    # A null-routed server address: a live session's next request hears nothing (silent), or
    # a new connection's handshake times out.
    "blackhole": (f"block-ip {SERVER_IP}\n", {"silent", "timeout"}),
    # The GFW's forged RSTs on every connection to the server's port: a SYN's RST is a refusal.
    "rst": (f"block-port {SERVER_PORT}\ninject-rst\n", {"refused", "reset", "cut"}),
}
# From the block to the report counted at the server: the switch (~1 s for RSTs, ~7 s for a
# blackhole under a live session, test_blocking.py) and the report on the CDN session's first
# flight; 2x for a loaded 2-core box.
REPORT_COUNTED_S = 20.0
# A request on the client's tunnel after the block, as a user's would be: finds a blackhole.
NUDGE_S = 4.0

# Russia's TSPU froze connections to foreign hosting after ~16 KB (2024-25); the lab freezes
# only connections to the server's address (the CDN's edge is elsewhere).
THROTTLE_AFTER = 16384
THROTTLE = f"throttle-ip {SERVER_IP}\nthrottle-after {THROTTLE_AFTER}\nthrottle-drop 1\n"
# The requirement for the throttle: downloads work over the CDN way within ~15 s of
# the freeze (a frozen download's next request: 2 s then a PING unanswered for 5 s, the way
# left at once; the CDN way in ~0.3 s). Margin for a loaded box.
FREEZE_TO_WORKING_S = 15.0
# How long the client is watched under the freeze, with a user downloading all along.
WATCH_S = 60.0
# Under the freeze the client goes away (~7 s after it), back at the first probe (its
# handshake fits in the free bytes: 5 s x 0.5-1.5 later), away again when the next download
# freezes (~20 s: that download hangs until the one after it probes the session), back at the
# next probe... The i-th stay on the CDN way lasts at least its probe wait at its shortest:
# probe_initial x relapse_factor ** i x 0.5 (the jitter), less a tenth for timers on a busy
# box. Before the relapse backoff every stay was 2.5-7.5 s (measured 3.5-7 s; 4-6 switches).
PROBE_INITIAL_S = 5.0
RELAPSE_FACTOR = 4.0
LEAST_STAY = [0.9 * 0.5 * PROBE_INITIAL_S * RELAPSE_FACTOR ** i for i in range(8)]
# Switches in WATCH_S: with the stays above, at most away, back, away, back, away.
MAX_SWITCHES = 5
# The client's log lines start with their time.
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"
# Each download in the watch: 1 MiB takes ~0.1 s on the CDN way; one that hangs on a frozen
# session waits for the freeze to be found.
WATCH_ATTEMPT_S = 10.0


def _needs_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces (CI runs as root)")
    for program in ("nginx", "curl", "nft"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            pytest.skip(f"{program} is not installed (scripts/install-deps installs it)")


@pytest.fixture
def reporting_lab() -> Iterator[BlockLab]:
    """A fresh lab per block (the hook runs once per way and hour), its server with /metrics
    and an --on-block hook that writes the alert's environment to a file."""
    _needs_lab()
    with BlockLab() as lab:
        hook_out = lab.dir / "on-block.out"
        script = f"env | grep ^VEIL_ | sort > {shlex.quote(str(hook_out))}.tmp && " \
                 f"mv {shlex.quote(str(hook_out))}.tmp {shlex.quote(str(hook_out))}"
        lab.start_veil_server("--admin", f"127.0.0.1:{ADMIN_PORT}",
                              "--on-block", f"sh -c {shlex.quote(script)}")
        lab.start_veil_client()
        yield lab


def metrics(lab: BlockLab) -> str:
    return lab.exec("server", "curl", "-sS", "--max-time", "5",
                    f"http://127.0.0.1:{ADMIN_PORT}/metrics").stdout


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text (None: not there)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"(\w+)(?:\{([^}]*)\})? (\S+)", line)
        if match and match[1] == name and ",".join(sorted((match[2] or "").split(","))) == wanted:
            return float(match[3])
    return None


def reported_kinds(text: str) -> dict[str, float]:
    return {kind: value for kind in ("refused", "unreachable", "reset", "cut", "timeout",
                                     "foreign", "silent", "other")
            if (value := sample(text, "veil_way_in_blocked_reports_total", way_in=DIRECT_WAY,
                                kind=kind))}


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_a_block_is_reported_through_the_cdn_and_counted_per_way_and_kind(
        reporting_lab: BlockLab, block: str) -> None:
    lab = reporting_lab
    rules, kinds = BLOCKS[block]
    assert lab.carrier_of_next() == SERVER_IP
    assert reported_kinds(metrics(lab)) == {}
    # A download is running when the block comes.
    running = lab.start("client", "curl-running", lab.curl_argv(
        "huge.bin", "/dev/null", 120, "--limit-rate", "2M"))
    nudges = []
    try:
        wait_until(lambda: lab.received()[SERVER_IP] > 2 * 1024 * 1024, 10,
                   "the running download under way")
        blocked = lab.set_rules(rules)
        counted: dict[str, float] = {}

        def report_counted() -> bool:
            nonlocal counted
            if not nudges or time.monotonic() - nudges[-1][0] > NUDGE_S:
                # The user asks for something now and then, as a user would: a blackhole
                # under a live session is found by a request that hears nothing.
                out = lab.dir / f"nudge-{len(nudges)}.out"
                nudges.append((time.monotonic(), lab.start(
                    "client", "curl-nudge", lab.curl_argv("next.bin", out, NUDGE_S))))
            counted = reported_kinds(metrics(lab))
            return bool(counted)
        wait_until(report_counted, REPORT_COUNTED_S,
                   lambda: f"the report counted: {lab.log_since(0)[-3000:]}", poll=0.1)
        took = time.monotonic() - blocked
        text = metrics(lab)
    finally:
        lab.stop(running)
        for _, nudge in nudges:
            lab.stop(nudge)
    assert set(counted) <= kinds and sum(counted.values()) == 1, counted
    # It came through the CDN: the direct way is still blocked, and the server's one session
    # through the CDN is the client's (the report rode its first flight). A blackholed direct
    # session lingers at the server until TCP gives up.
    assert lab.rules.read_text() == rules
    assert sample(text, "veil_sessions_active", way_in="cdn") == 1, text
    assert SWITCHED_AWAY.search(lab.log_since(0)), lab.log_since(0)
    assert sample(text, "veil_way_in_blocked_users", way_in=DIRECT_WAY) == 1, text
    assert sample(text, "veil_users_active_recent") == 1, text
    # The operator's alert: one user of one, on the direct way, with the kind it saw.
    hook_out = lab.dir / "on-block.out"
    wait_until(hook_out.exists, 10, "the --on-block hook run")
    hook = dict(line.split("=", 1) for line in hook_out.read_text().splitlines())
    assert hook["VEIL_WAY_IN"] == DIRECT_WAY and hook["VEIL_KIND"] in counted, hook
    assert hook["VEIL_USERS"] == "1" and hook["VEIL_ACTIVE_USERS"] == "1", hook
    assert time.time() - 180 <= int(hook["VEIL_SINCE"]) <= time.time(), hook
    assert lab.server is not None
    alert = re.search(r"way in \S+ reported blocked .*", lab.server.text())
    assert alert and alert[0].startswith(f"way in {DIRECT_WAY} reported blocked"), alert
    # Nothing of the user's traffic in what the operator sees of the report: no destination,
    # no path, no address of the client's, not the CDN way's secret path.
    seen = "\n".join([hook_out.read_text(), alert[0],
                      *(line for line in text.splitlines() if "way_in_block" in line),
                      *re.findall(r".*reports blocked.*", lab.server.text())])
    for private in ("127.0.0.1", f":{FORWARD_PORT}", "next.bin", "huge.bin", CLIENT_IP,
                    lab.secret.strip("/")):
        assert private not in seen, (private, seen)
    print(f"{block}: the report ({counted}) counted at the server {took:.1f} s after the "
          f"block, through the CDN way; the hook ran: {hook}")


# ---------------------------------------------------------------------- the throttle


def cdn_stays(log: str) -> list[float]:
    """Seconds from each switch away from the direct way to the switch back after it."""
    stays, left = [], None
    for line in log.splitlines():
        if SWITCHED_AWAY.search(line) or SWITCHED_BACK.search(line):
            at = datetime.strptime(line[:23], LOG_TIME).timestamp()
            if SWITCHED_AWAY.search(line):
                left = at
            elif left is not None:
                stays.append(at - left)
                left = None
    return stays


@pytest.fixture
def throttle_lab() -> Iterator[BlockLab]:
    _needs_lab()
    with BlockLab() as lab:
        lab.start_veil_server()
        lab.start_veil_client()
        yield lab


def test_a_freeze_after_n_bytes_moves_the_client_to_the_cdn_without_flapping(
        throttle_lab: BlockLab) -> None:
    lab = throttle_lab
    assert lab.carrier_of_next() == SERVER_IP
    running = lab.start("client", "curl-running", lab.curl_argv(
        "huge.bin", "/dev/null", 120, "--limit-rate", "2M"))
    try:
        wait_until(lambda: lab.received()[SERVER_IP] > 2 * 1024 * 1024, 10,
                   "the running download under way")
        mark = lab.log_mark()
        frozen = lab.set_rules(THROTTLE)
        took = lab.time_to_working(frozen, FREEZE_TO_WORKING_S)
    finally:
        lab.stop(running)
    switched = SWITCHED_AWAY.search(lab.log_since(mark))
    assert switched and switched["to"].startswith(f"https://{CDN_NAME}/"), lab.log_since(mark)
    # A user downloading all along: the downloads work (most of them on the CDN way), and the
    # client does not flap between the ways.
    ok = failed = 0
    on_direct = 0
    while time.monotonic() < frozen + WATCH_S:
        before = lab.received()
        if lab.fetch_next(WATCH_ATTEMPT_S):
            ok += 1
            on_direct += lab.received()[SERVER_IP] - before[SERVER_IP] >= NEXT_SIZE
        else:
            failed += 1
        time.sleep(0.5)
    log = lab.log_since(mark)
    away = len(SWITCHED_AWAY.findall(log))
    back = len(SWITCHED_BACK.findall(log))
    assert away + back <= MAX_SWITCHES, log
    # The client never flaps: each time the direct way is given back and freezes again, it
    # stays on the CDN way longer before trying the direct way again.
    stays = cdn_stays(log)
    assert all(stay >= least for stay, least in zip(stays, LEAST_STAY, strict=False)), stays
    assert ok >= 3 * failed, (ok, failed, log)
    assert on_direct == 0, (on_direct, log)  # no 1 MiB gets through a freeze after 16 KiB
    print("\n".join(line for line in log.splitlines()
                    if SWITCHED_AWAY.search(line) or SWITCHED_BACK.search(line)))
    print(f"throttle (freeze after {THROTTLE_AFTER} B): downloads worked {took:.1f} s after "
          f"the freeze; {away + back} switches in {WATCH_S:.0f} s ({away} away, {back} back); "
          f"{ok} downloads worked, {failed} failed; stays on the CDN way "
          f"{[round(stay, 1) for stay in stays]} s")

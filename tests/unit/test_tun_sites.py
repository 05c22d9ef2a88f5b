"""The server's site-to-site hand-over (veil.server.tun.TunServer.from_session), without a
device: which session a packet goes to, and what never reaches the server's kernel."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

from veil.server.tun import TunServer, TunServerOptions, _IpRelay
from veil.store.base import User


class FakeSession:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_packet(self, stream_id: int, packet: bytes) -> None:
        self.sent.append(packet)


class FakeDriver:
    writing_paused = False

    def __init__(self) -> None:
        self.session = FakeSession()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def packet(src: str, dst: str) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 1, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return bytes(10) + header


def relay(server: TunServer, user: str, index: int) -> _IpRelay:
    v4, v6 = server.pool.interfaces(index)
    made = _IpRelay(server, FakeDriver(), 1, index, v4, v6, user)  # type: ignore[arg-type]
    server._site_relays.setdefault(user, []).append(made)
    server._routes[v4.ip.packed] = made
    return made


def sent(r: _IpRelay) -> list[bytes]:
    driver: Any = r.driver
    return list(driver.session.sent)


def test_site_packets_go_between_sessions_and_never_to_the_device() -> None:
    async def main() -> None:
        server = TunServer(TunServerOptions())
        written: list[bytes] = []
        server.write = written.append  # type: ignore[method-assign,assignment]
        server.set_users([User("sh", b"", b"1", 0.0, sites=("192.168.10.0/24",)),
                          User("bj", b"", b"2", 0.0, sites=("192.168.20.0/24",)),
                          User("alice", b"", b"3", 0.0, reach=("sh",)),
                          User("bob", b"", b"4", 0.0)])
        sh, bj = relay(server, "sh", 2), relay(server, "bj", 3)
        alice, bob = relay(server, "alice", 4), relay(server, "bob", 5)
        bj_newest = relay(server, "bj", 6)
        # sh's LAN to bj's LAN: to bj's newest session, as it is (no NAT).
        lan_to_lan = packet("192.168.10.5", "192.168.20.7")
        sh.on_packet(lan_to_lan)
        await asyncio.sleep(0)  # the hand-over's flush
        assert sent(bj_newest) == [lan_to_lan] and sent(bj) == []
        assert bj_newest.driver.flushes == 1  # type: ignore[attr-defined]
        # The older session carries the site once the newest is gone; replies from any.
        bj_newest.close = lambda: None  # type: ignore[method-assign]
        server.forget(bj_newest)
        sh.on_packet(lan_to_lan)
        bj.on_packet(packet("192.168.20.7", "192.168.10.5"))
        assert sent(bj) == [lan_to_lan] and len(sent(sh)) == 1
        # Spoofing: sh may not send from bj's subnet, nor from anywhere else.
        sh.on_packet(packet("192.168.20.9", "192.168.20.7"))
        sh.on_packet(packet("10.1.1.1", "192.168.20.7"))
        assert server.spoofed == 2
        # A site's LAN reaches no Internet through the server, and no device not allowed.
        sh.on_packet(packet("192.168.10.5", "203.0.113.2"))
        sh.on_packet(packet("192.168.10.5", str(bob.v4.ip)))
        assert server.filtered == 2 and written == []
        # alice may reach sh (and sh's hosts may answer her); bob may reach no site.
        alice.on_packet(packet(str(alice.v4.ip), "192.168.10.5"))
        sh.on_packet(packet("192.168.10.5", str(alice.v4.ip)))
        bob.on_packet(packet(str(bob.v4.ip), "192.168.10.5"))
        alice.on_packet(packet(str(alice.v4.ip), "192.168.20.7"))
        assert len(sent(sh)) == 2 and len(sent(alice)) == 1 and server.filtered == 4
        # A device's other traffic goes to the kernel (the Internet), as without sites.
        bob.on_packet(packet(str(bob.v4.ip), "203.0.113.2"))
        assert written == [packet(str(bob.v4.ip), "203.0.113.2")]

    asyncio.run(main())

"""The panel in a real browser (Debian's Chromium, headless, driven by Playwright): log in, add
a user, see its QR code, connect a real veil client with its key, watch the session, revoke
the user and watch the session vanish. A screenshot of each page is kept in
test-artifacts/admin/."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.admin.conftest import PASSWORD, Harness
from tests.support import procs
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "admin"
# The lead's live revocation closes sessions within 1 s; the page is reloaded until then.
VANISH_WITHIN_S = 5.0

if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
                "scripts/install-deps installs it)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_add_user_see_qr_connect_revoke_and_watch_the_session_vanish(
        harness: Harness, browser: Browser, module_dir: Path,
        tcp_echo: procs.TcpEcho) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(10_000)
    base = harness.admin.url

    page.goto(f"{base}/users")
    expect(page).to_have_url(f"{base}/login")
    shot(page, "1-login")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    expect(page).to_have_url(f"{base}/users")
    expect(page.locator("#users tr[data-user=alice]")).to_be_visible()
    shot(page, "2-users")

    page.fill("#add-user input[name=name]", "erin")
    page.fill("#add-user input[name=limit]", "50GB/month")
    page.click("#add-user button")
    expect(page).to_have_url(f"{base}/users/erin?done=added")
    qr = page.locator("#access-key .qr svg")
    expect(qr).to_be_visible()
    assert qr.bounding_box() is not None and qr.bounding_box()["width"] > 100  # type: ignore[index]
    key = page.locator("#access-key code.key").inner_text().strip()
    assert key.startswith("veil://")
    assert "key" not in page.url and key not in page.url
    shot(page, "3-user-added")

    # A real client with the key shown on the page; the server picks the user up within a
    # refresh interval.
    wait_until(lambda: "erin" in harness.server.live.directory.by_name, 10,
               "the server to load erin")
    spec = f"0:127.0.0.1:{tcp_echo.port}"
    client = procs.start_veil_client(module_dir, key, socks=False, forwards=[spec])
    port = client.forwards[spec]
    tunnelled: socket.socket | None = None
    try:
        tunnelled = socket.create_connection(("127.0.0.1", port), timeout=10)
        tunnelled.sendall(b"y" * 200_000)
        got = 0
        while got < 200_000:
            got += len(tunnelled.recv(65536))

        page.goto(f"{base}/sessions")
        row = page.locator("#sessions tr[data-user=erin]")
        expect(row).to_be_visible()
        expect(row).to_contain_text("veil")
        shot(page, "4-sessions")

        wait_until(lambda: "erin" in harness.server.live.user_bytes, 10,
                   "erin's bytes in the live counters")

        def charted() -> bool:  # the next refresh writes the usage to the store, so the chart
            page.goto(f"{base}/traffic")
            return page.locator("svg.chart polyline").count() == 1

        wait_until(charted, 10, "erin's usage on the traffic chart", poll=0.1)
        expect(page.locator("svg.chart polyline")).to_have_count(1)
        expect(page.locator("#traffic")).to_contain_text("erin")
        shot(page, "5-traffic")

        page.goto(f"{base}/health")
        expect(page.locator("#health")).to_contain_text("veil 0.")
        expect(page.locator("#health")).to_contain_text("Certificate expires")
        shot(page, "6-health")

        page.goto(f"{base}/users/erin")
        expect(page.locator("svg.chart")).to_be_visible()
        page.click("button[data-action=revoke]")
        expect(page).to_have_url(f"{base}/users/erin?done=revoked")
        expect(page.locator("dd.status-revoked")).to_have_text("revoked")
        expect(page.locator("#access-key")).to_have_count(0)  # a dead key is not shown
        shot(page, "7-user-revoked")

        page.goto(f"{base}/sessions")

        def vanished() -> bool:
            if not page.locator("#sessions tr[data-user=erin]").count():
                return True
            page.reload()
            return False

        wait_until(vanished, VANISH_WITHIN_S, "the session to end after revoke", poll=0.2)
        expect(page.locator("#sessions")).to_contain_text("Nobody is connected")
        shot(page, "8-sessions-after-revoke")
        # And the tunnelled connection is really gone.
        tunnelled.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert tunnelled.recv(1) == b""
    finally:
        if tunnelled is not None:
            tunnelled.close()
        procs.stop(client.proc)
    page.close()


def test_a_users_exports_render_with_their_qr_codes_and_the_list_is_searched(
        trojan_harness: Harness, browser: Browser) -> None:
    """Every export on a user's page is drawn, with a QR code a phone can scan (over 100 px),
    the configurations open without a script, and the subscription rotates from the page."""
    h = trojan_harness
    h.run(_add_users(h, [f"team{i:02d}" for i in range(60)]))
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(10_000)
    base = h.admin.url
    page.goto(f"{base}/login")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    expect(page).to_have_url(f"{base}/users")

    expect(page.locator("#users tbody tr")).to_have_count(50)
    page.fill("#search input[name=q]", "team05")
    page.click("#search button")
    expect(page).to_have_url(f"{base}/users?q=team05")
    expect(page.locator("#users tbody tr")).to_have_count(1)
    page.goto(f"{base}/users")
    page.click("nav.pages a[rel=next]")
    expect(page).to_have_url(f"{base}/users?page=2")
    expect(page.locator("#users tbody tr")).to_have_count(11)
    shot(page, "9-users-page-2")

    page.goto(f"{base}/users/alice")
    for card in ("access-key", "subscription", "trojan", "clash", "sing-box"):
        qr = page.locator(f"#{card} .qr svg")
        expect(qr).to_have_count(1)
        expect(qr).to_be_visible()
        box = qr.bounding_box()
        assert box is not None and box["width"] > 100, (card, box)
    config = page.locator("#sing-box pre.config")
    expect(config).not_to_be_visible()
    page.click("#sing-box details summary")
    expect(config).to_be_visible()
    expect(config).to_contain_text('"mixed"')
    shot(page, "10-user-exports")

    old = page.locator("#subscription code.key").first.inner_text()
    page.click("button[data-action=rotate-subscription]")
    expect(page).to_have_url(f"{base}/users/alice?done=rotated")
    assert page.locator("#subscription code.key").first.inner_text() != old
    page.click("button[data-action=reset-usage]")
    expect(page).to_have_url(f"{base}/users/alice?done=usage_reset")
    page.click("button[data-action=end-sessions]")
    expect(page).to_have_url(f"{base}/users/alice?done=sessions_ended")

    page.goto(f"{base}/health")
    expect(page.locator("#health")).to_contain_text("Memory in use")
    expect(page.locator("#fleet tr[data-server]")).to_have_count(1)
    shot(page, "11-health-fleet")
    page.close()


async def _add_users(h: Harness, names: list[str]) -> None:
    for name in names:
        h.server.users.add(name)

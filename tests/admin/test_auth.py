"""The panel's building blocks without a server: password hashing, sessions, the login rate
limit, the API token, the listen address rule and the chart."""

from __future__ import annotations

import pytest

from veil.admin import auth
from veil.admin.chart import Series, bucketize, line_chart
from veil.admin.listen import AdminListen, check_admin_listen, parse_admin_listen
from veil.errors import ConfigError

# Cheap parameters for the tests that are not about the cost itself.
FAST = {"memory_kib": 1024, "iterations": 1, "lanes": 1}


def test_the_password_is_stored_as_a_memory_hard_argon2id_hash() -> None:
    encoded = auth.hash_password("hunter2 but longer")
    assert encoded.startswith(f"$argon2id$v=19$m={auth.ARGON2_MEMORY_KIB},t=3,p=4$")
    assert "hunter2" not in encoded
    assert auth.verify_password("hunter2 but longer", encoded)
    assert not auth.verify_password("hunter2 but longer!", encoded)
    assert auth.hash_password("same", **FAST) != auth.hash_password("same", **FAST)  # salted


def test_malformed_or_costly_hashes_do_not_verify() -> None:
    encoded = auth.hash_password("pw", **FAST)
    for bad in ("", "plain", encoded.replace("argon2id", "argon2i"), encoded[:-4],
                encoded + "$extra", "x" * 1000):
        assert not auth.verify_password("pw", bad)
    # A tampered setting asking for 4 GiB per login is refused without trying.
    huge = encoded.replace("m=1024", "m=4194304")
    assert not auth.verify_password("pw", huge)


def test_sessions_expire_when_idle_old_or_the_password_changes() -> None:
    sessions = auth.Sessions(idle_s=10, max_age_s=100, max_sessions=3)
    sid, session = sessions.create(0.0, "tag")
    assert sessions.get(sid, 5.0, "tag") is session
    assert sessions.get(sid, 14.0, "tag") is session  # used at 5: not idle for 10 yet
    assert sessions.get(sid, 25.0, "tag") is None  # idle
    sid, _ = sessions.create(0.0, "tag")
    for t in range(5, 100, 5):
        assert sessions.get(sid, float(t), "tag") is not None
    assert sessions.get(sid, 101.0, "tag") is None  # too old, however busy
    sid, _ = sessions.create(0.0, "tag")
    assert sessions.get(sid, 1.0, "other") is None  # opened under another password
    assert sessions.get(sid, 1.0, "tag") is None  # and gone for good
    assert sessions.get("not-a-session", 1.0, "tag") is None


def test_sessions_are_bounded_and_have_distinct_ids_and_csrf_tokens() -> None:
    sessions = auth.Sessions(max_sessions=3)
    made = [sessions.create(0.0, "t") for _ in range(4)]
    assert len(sessions) == 3
    assert sessions.get(made[0][0], 1.0, "t") is None  # the oldest went
    assert len({sid for sid, _ in made} | {s.csrf for _, s in made}) == 8
    assert all(len(sid) >= 43 for sid, _ in made)  # 256 bits
    sessions.drop(made[3][0])
    assert sessions.get(made[3][0], 1.0, "t") is None
    assert auth.csrf_ok(made[2][1].csrf, made[2][1])
    assert not auth.csrf_ok(made[1][1].csrf, made[2][1])
    assert not auth.csrf_ok(None, made[2][1]) and not auth.csrf_ok("", made[2][1])


def test_login_failures_are_limited_per_address_in_a_sliding_window() -> None:
    limiter = auth.LoginLimiter(max_failures=3, window_s=60)
    for t in (0.0, 10.0, 20.0):
        assert limiter.retry_after("a", t) is None
        limiter.failed("a", t)
    assert limiter.retry_after("a", 30.0) == pytest.approx(30.0)
    assert limiter.retry_after("b", 30.0) is None  # another address is not affected
    assert limiter.retry_after("a", 60.0) is None  # the first failure left the window
    limiter.failed("a", 61.0)
    assert limiter.retry_after("a", 62.0) == pytest.approx(8.0)
    limiter.succeeded("a")
    assert limiter.retry_after("a", 62.0) is None


def test_the_limiter_tracks_a_bounded_number_of_addresses() -> None:
    limiter = auth.LoginLimiter(max_failures=1, window_s=60, max_addresses=2)
    limiter.failed("a", 0.0)
    limiter.failed("b", 0.0)
    limiter.failed("c", 0.0)
    assert limiter.retry_after("c", 1.0) is not None
    assert limiter.retry_after("a", 1.0) is None  # forgotten, oldest first


def test_the_api_token_is_random_and_only_its_hash_is_kept() -> None:
    token, digest = auth.new_api_token()
    assert token.startswith(auth.API_TOKEN_PREFIX) and token not in digest
    assert auth.token_matches(token, digest)
    assert not auth.token_matches(token + "x", digest)
    assert not auth.token_matches(token, None) and not auth.token_matches(token, "")
    assert auth.new_api_token()[0] != token


def test_admin_listen_addresses() -> None:
    assert parse_admin_listen("127.0.0.1:8080") == AdminListen("127.0.0.1", 8080)
    assert parse_admin_listen("[::1]:8080") == AdminListen("::1", 8080)
    assert parse_admin_listen("https://0.0.0.0:8443") == AdminListen("0.0.0.0", 8443, True)
    assert str(AdminListen("::1", 1, True)) == "https://[::1]:1"
    for bad in ("8080", "host:", ":80", "127.0.0.1:http", "127.0.0.1:70000", "[::1]8080"):
        with pytest.raises(ConfigError):
            parse_admin_listen(bad)
    with pytest.raises(ConfigError, match="without TLS"):
        check_admin_listen("10.0.0.1", tls=False)


def test_the_chart_buckets_and_escapes() -> None:
    assert bucketize([(0, 1), (3599, 2), (3600, 4), (7200 * 10, 8), (-1, 16)], 0, 3600,
                     3) == [3, 4, 0]
    svg = line_chart([Series("<script>", [0, 5000, 0])], start=0, step=3600, title="a&b")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a&amp;b" in svg
    assert svg.count("<polyline") == 1
    assert "no traffic" in line_chart([Series("idle", [0, 0])], start=0, step=3600, title="t")


def test_verifications_in_parallel_threads_all_answer() -> None:
    """cryptography 50.x (within veil's bounds) hangs or raises MemoryError when two Argon2
    derivations run at once; the panel verifies in threads, so auth serialises them."""
    import threading

    stored = auth.hash_password("right")
    results: list[bool] = []
    threads = [threading.Thread(target=lambda p=p: results.append(auth.verify_password(p, stored)))
               for p in ("right", "wrong", "right", "wrong")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "an Argon2 verification hung"
    assert sorted(results) == [False, False, True, True]

"""The fuzz targets in fuzz/ (docs/fuzzing.md), three ways:

1. every seed (fuzz/corpus/<target>/) and every saved crash (fuzz/crashes/<target>/) replayed
   through its target's ``test_one_input``, in process: the crashes stay fixed;
2. property tests: hypothesis drives the same targets, oracles included, for the parsers
   tests/unit does not already cover with hypothesis (the built-in cover's HTTP parser, the
   TLS 1.3 client, the gate's ways in, trojan:// links, the client side of a session);
3. (slow) ``fuzz/run.py`` runs every target under atheris for a few seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ_DIR))
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))
MAX_SEEDS = 30
MAX_SEED_BYTES = 4096


def target(name: str) -> ModuleType:
    return importlib.import_module(f"fuzz_{name}")


def _files() -> list[object]:
    cases: list[object] = []
    for name in TARGETS:
        for kind in ("corpus", "crashes"):
            folder = FUZZ_DIR / kind / name
            if folder.is_dir():
                cases += [pytest.param(name, path, id=f"{kind}/{name}/{path.name}")
                          for path in sorted(folder.iterdir()) if path.is_file()]
    return cases


# ------------------------------------------------------------------ 1. replay
@pytest.mark.parametrize(("name", "path"), _files())
def test_replay(name: str, path: Path) -> None:
    target(name).test_one_input(path.read_bytes())


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_are_kept_small_and_in_step_with_the_encoders(name: str) -> None:
    files = sorted(p.name for p in (FUZZ_DIR / "corpus" / name).iterdir())
    assert files, f"no seeds for {name}: python3 fuzz/run.py --write-seeds {name}"
    assert len(files) <= MAX_SEEDS
    assert all((FUZZ_DIR / "corpus" / name / f).stat().st_size <= MAX_SEED_BYTES for f in files)
    # Seeds are made by veil's own encoders: when those change, regenerate them.
    assert files == sorted(target(name).seeds())


# ------------------------------------------------------------------ 2. properties
def with_header(*headers: int) -> st.SearchStrategy[bytes]:
    """A target input: its leading control bytes (flags, cutting), then a body."""
    return st.tuples(st.sampled_from(headers), st.integers(0, 255)).map(bytes)


_REQUEST_LINES = st.sampled_from([
    b"GET / HTTP/1.1", b"HEAD /index.html HTTP/1.1", b"POST / HTTP/1.0", b"GET /robots.txt",
    b"GET http://[::1]:80/a/../style.css?x HTTP/1.1", b"OPTIONS * HTTP/1.1",
    b"GET /%2e%2e/ HTTP/1.1",
    b"PUT /x HTTP/1.1", b"GET / HTTP/2.0", b"get / HTTP/1.1", b"\x16\x03\x01\x00\x05"])
_HEADERS = st.sampled_from([
    b"Host: example.com", b"Host: a", b"Connection: close", b"Connection: keep-alive",
    b"Content-Length: 5", b"Content-Length: 99999999", b"Transfer-Encoding: chunked",
    b"Range: bytes=0-3,-2", b"If-None-Match: *", b"Expect: 100-continue",
    b"If-Modified-Since: Wed, 15 Mar 2023 13:20:00 GMT", b"User-Agent: MSIE 6.0",
    b"Bad Header: x", b"X: \x00", b"Cookie: " + b"c" * 9000])
_HTTP_REQUESTS = st.builds(
    lambda line, headers, eol, body: line + eol + b"".join(h + eol for h in headers) + eol + body,
    _REQUEST_LINES, st.lists(_HEADERS, max_size=6), st.sampled_from([b"\r\n", b"\n"]),
    st.binary(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_header(*range(16)),
       st.one_of(st.binary(max_size=2000),
                 st.lists(_HTTP_REQUESTS, min_size=1, max_size=4).map(b"".join)))
def test_cover_answers_anything_like_nginx(head: bytes, body: bytes) -> None:
    target("cover").test_one_input(head + body)


@settings(max_examples=150, deadline=None)
@given(with_header(0, 1, 2), st.binary(max_size=600))
def test_tls13_client_fails_cleanly_on_any_server_bytes(head: bytes, body: bytes) -> None:
    target("tls13").test_one_input(head + body)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([1, 2]), st.integers(0, 255),
       st.lists(st.tuples(st.sampled_from([21, 22, 23, 20, 0]), st.binary(max_size=80)),
                max_size=4))
def test_tls13_client_fails_cleanly_on_any_encrypted_records(
        mode: int, cutting: int, records: list[tuple[int, bytes]]) -> None:
    body = b"".join(bytes((t,)) + len(c).to_bytes(2, "big") + c for t, c in records)
    target("tls13").test_one_input(bytes((mode, cutting)) + body)


def _mutations(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    """A seed with one byte changed, some cut off, or something appended."""
    def mutate(seed: bytes, where: int, value: int, cut: int, tail: bytes) -> bytes:
        data = bytearray(seed)
        if data:
            data[where % len(data)] = value
        return bytes(data[: len(data) - cut % (len(data) + 1)]) + tail
    return st.builds(mutate, st.sampled_from(sorted(seeds.values())), st.integers(0, 10_000),
                     st.integers(0, 255), st.integers(0, 100), st.binary(max_size=20))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_gate_accepts_nothing_without_a_credential(data: st.DataObject) -> None:
    auth = target("auth")
    value = data.draw(st.one_of(st.binary(max_size=200), _mutations(auth.seeds())))
    auth.test_one_input(value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=120).map(str.encode),
                 st.builds(lambda user, host, port, query, frag:
                           f"trojan://{user}@{host}:{port}?{query}#{frag}".encode(),
                           st.text(max_size=10), st.text(max_size=12),
                           st.integers(-5, 70_000), st.text(max_size=20),
                           st.text(max_size=8))))
def test_trojan_links_parse_or_fail_cleanly_and_round_trip(text: bytes) -> None:
    target("trojan").test_one_input(b"\x02\x00" + text)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_client_side_of_a_session_takes_any_server_bytes(data: st.DataObject) -> None:
    frames = target("frames")
    value = data.draw(st.one_of(
        st.tuples(with_header(1, 5), st.binary(max_size=600)).map(b"".join),
        _mutations({k: v for k, v in frames.seeds().items() if v[0] & 1})))
    frames.test_one_input(value)


# ------------------------------------------------------------------ 3. fuzzing
SECONDS_PER_TARGET = 5  # all targets together stay under a minute, startup included


@pytest.mark.slow
@pytest.mark.timeout(60 + 30 * len(TARGETS))
def test_fuzzing_finds_no_crash(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install -e '.[test]' on Linux installs it)")
    proc = subprocess.run(
        [sys.executable, str(FUZZ_DIR / "run.py"), "--seconds", str(SECONDS_PER_TARGET),
         "--crashes", str(tmp_path)],
        capture_output=True, text=True, check=False)
    crashes = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert proc.returncode == 0 and not crashes, proc.stdout + proc.stderr
    assert len(proc.stdout.splitlines()) == len(TARGETS)

"""nginx's session settings set through libssl (veil.manage.libssl), and what happens when
they cannot be: the context is left as it is and one warning names what then differs.

Handshakes run in memory between a real client context and ``server_ssl_context``; what is
asserted is what a client reads from the server (ticket lifetime, resumption), and the
SSL_CTX's own values read back through libssl.
"""

from __future__ import annotations

import _json
import ctypes
import logging
import ssl
from pathlib import Path

import pytest

from veil.manage import libssl
from veil.manage.state import init_state, server_ssl_context
from veil.protocol.address import Address

LISTEN = Address("127.0.0.1", 8443)
# More round trips than any TLS handshake needs (TLS 1.2 with a session id: 2).
HANDSHAKE_FLIGHTS = 8


def _server_context(tmp_path: Path) -> ssl.SSLContext:
    state, _ = init_state(tmp_path / "state", listen=LISTEN)
    return server_ssl_context(state)


def _client_context(*, maximum: ssl.TLSVersion | None = None,
                    tickets: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


def _connect(server: ssl.SSLContext, client: ssl.SSLContext,
             session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    """A full exchange in memory, up to the tickets a server sends after the handshake;
    returns the client's end."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, client_out, server_hostname="example.com",
                                 session=session)
    server_end = server.wrap_bio(to_server, server_out, server_side=True)
    done = [False, False]
    for _ in range(HANDSHAKE_FLIGHTS):
        for index, end in enumerate((client_end, server_end)):
            if not done[index]:
                try:
                    end.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if all(done):
            break
    assert all(done), "handshake did not complete"
    server_end.write(b"x")  # after the tickets: reading it makes the client take them
    to_client.write(server_out.read())
    assert client_end.read(1) == b"x"
    # A clean close, both ways: OpenSSL drops from its cache the session of a connection
    # freed without one, which would hide whether the cache keeps sessions at all.
    with pytest.raises(ssl.SSLWantReadError):
        client_end.unwrap()
    to_server.write(client_out.read())
    server_end.unwrap()
    return client_end


def _resumed(server: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    first = _connect(server, client)
    return _connect(server, client, session=first.session).session_reused


def _sessions_of(context: ssl.SSLContext) -> tuple[int, int]:
    """The SSL_CTX's session timeout and cache mode, read through libssl."""
    lib = libssl.load_libssl(libssl.SSL_MODULE_LIBRARY)
    assert not isinstance(lib, str), lib
    pointer = libssl.context_pointer(context)
    return (lib.get_timeout(pointer),
            lib.ctrl(pointer, libssl.SSL_CTRL_GET_SESS_CACHE_MODE, 0, None))


# ------------------------------------------------------------------ applied
@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_tickets_carry_nginx_lifetime_and_still_resume(
        tmp_path: Path, maximum: ssl.TLSVersion | None) -> None:
    server = _server_context(tmp_path)
    client = _client_context(maximum=maximum)
    session = _connect(server, client).session
    assert session is not None and session.has_ticket
    assert session.ticket_lifetime_hint == libssl.NGINX_SESSION_TIMEOUT
    assert _resumed(server, client)


def test_a_tls12_session_id_does_not_resume(tmp_path: Path) -> None:
    """ssl_session_cache none: a session id is announced, no session is kept."""
    server = _server_context(tmp_path)
    client = _client_context(maximum=ssl.TLSVersion.TLSv1_2, tickets=False)
    first = _connect(server, client)
    assert first.session is not None and len(first.session.id) == 32
    assert not _resumed(server, client)


def test_a_ticket_from_another_server_does_not_resume(tmp_path: Path) -> None:
    """Same certificate, so the same session id context: the ticket keys still differ per
    context, as they do between two nginx processes without ssl_session_ticket_key."""
    state, _ = init_state(tmp_path / "state", listen=LISTEN)
    one, other = server_ssl_context(state), server_ssl_context(state)
    client = _client_context()
    session = _connect(one, client).session
    assert not _connect(other, client, session=session).session_reused


def test_the_session_id_context_is_nginx_digest() -> None:
    """nginx 1.22's http module: SHA-1("HTTP" || SHA-1(certificate DER)), 20 bytes."""
    context = libssl.nginx_session_id_context(b"certificate")
    assert context.hex() == "c149e6f7f8b49c82b1a39e0cecb12508d73f522b"
    assert len(context) == 20


# ------------------------------------------------------------------ not applied
def _fresh_server(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context with its certificate loaded and nothing else set, and that
    certificate's DER."""
    state, _ = init_state(tmp_path / name, listen=LISTEN)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(state.cert_path, state.key_path)
    return context, ssl.PEM_cert_to_DER_cert(state.cert_path.read_text())


def _untouched(context: ssl.SSLContext) -> bool:
    return _sessions_of(context) == (libssl.OPENSSL_DEFAULT_TIMEOUT,
                                     libssl.OPENSSL_DEFAULT_CACHE_MODE)


def _warning(caplog: pytest.LogCaptureFixture) -> str:
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "veil.manage" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "ticket lifetime (7200 s, nginx 300 s)" in warnings[0]
    return warnings[0]


def test_a_pointer_to_another_ssl_ctx_is_not_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The one stand-in in this file: ``context_pointer`` is replaced to simulate a layout
    where the word after the object header is not this context's SSL_CTX. It returns the
    SSL_CTX of another real server context: valid to read, with the same options, timeout
    and cache mode as every fresh one, but another certificate. Neither may be written."""
    context, certificate = _fresh_server(tmp_path, "one")
    stranger, _ = _fresh_server(tmp_path, "other")
    monkeypatch.setattr(libssl, "context_pointer",
                        lambda _context: ctypes.c_void_p.from_address(
                            id(stranger) + object.__basicsize__).value)
    with caplog.at_level(logging.WARNING, logger="veil.manage"):
        assert not libssl.match_nginx_sessions(context, certificate)
    assert "its certificate is not the one the context was given" in _warning(caplog)
    monkeypatch.undo()
    assert _untouched(context) and _untouched(stranger)


def test_a_context_already_changed_is_not_written_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A timeout other than OpenSSL's default means the SSL_CTX is not the fresh one this
    expects: left alone, with the warning."""
    context, certificate = _fresh_server(tmp_path, "state")
    assert libssl.match_nginx_sessions(context, certificate)
    with caplog.at_level(logging.WARNING, logger="veil.manage"):
        assert not libssl.match_nginx_sessions(context, certificate)
    assert "session timeout is 300" in _warning(caplog)
    assert _sessions_of(context) == (libssl.NGINX_SESSION_TIMEOUT, libssl.NGINX_CACHE_MODE)


def test_missing_symbols_leave_the_context_as_it_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Symbols looked up through a library that does not have them (CPython's _json
    extension, which no libssl backs): the server still gets a working context, with
    OpenSSL's session defaults, and the warning says so."""
    context, certificate = _fresh_server(tmp_path, "state")
    with caplog.at_level(logging.WARNING, logger="veil.manage"):
        assert not libssl.match_nginx_sessions(context, certificate, library=_json.__file__)
    assert "undefined symbol: OpenSSL_version_num" in _warning(caplog)
    assert _untouched(context)
    session = _connect(context, _client_context()).session
    assert session is not None
    assert session.ticket_lifetime_hint == libssl.OPENSSL_DEFAULT_TIMEOUT


# ------------------------------------------------------------------ shared ticket keys
@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_contexts_given_the_same_ticket_keys_resume_each_others_tickets(
        tmp_path: Path, maximum: ssl.TLSVersion | None) -> None:
    """--workers: each worker builds its own context; with the parent's keys a ticket one
    issued resumes on another (the positive control is the test above: without, it does
    not), and the ticket keeps nginx's lifetime and length."""
    state, _ = init_state(tmp_path / "state", listen=LISTEN)
    keys = bytes(range(libssl.TICKET_KEYS_SIZE))
    one, other = server_ssl_context(state), server_ssl_context(state)
    plain = server_ssl_context(state)
    assert libssl.set_ticket_keys(one, keys) and libssl.set_ticket_keys(other, keys)
    client = _client_context(maximum=maximum)
    session = _connect(one, client).session
    assert session is not None and session.ticket_lifetime_hint == libssl.NGINX_SESSION_TIMEOUT
    assert _connect(other, client, session=session).session_reused
    assert len(session.id) == len(_connect(plain, client).session.id)  # type: ignore[union-attr]


def test_ticket_keys_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        libssl.set_ticket_keys(_server_context(tmp_path), bytes(48))

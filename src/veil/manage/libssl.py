"""nginx's session settings on a server :class:`ssl.SSLContext`, set through libssl itself.

A prober reads three things about sessions from one or two connections that Python's ``ssl``
module has no call for, and that a default nginx 1.22 sets differently from OpenSSL's
defaults (``ngx_ssl_session_cache`` with ``ssl_session_timeout 5m``, ``ssl_session_cache
none``, ``ssl_session_tickets on``):

- the ticket lifetime (TLS 1.2's lifetime hint, TLS 1.3's ``ticket_lifetime``) is the
  SSL_CTX's session timeout: nginx sets 300 s, OpenSSL's default is 7,200 s;
- the ticket length: a ticket is the encrypted session, which carries the SSL_CTX's session
  id context; nginx sets a 20-byte one (SHA-1 of ``"HTTP"`` and the SHA-1 of each of its
  certificates), CPython a 7-byte one, so veil's tickets were 16 bytes shorter (224, nginx's 240);
- TLS 1.2 resumption by session id: ``ssl_session_cache none`` announces a session id but
  stores nothing (``SSL_SESS_CACHE_SERVER | NO_AUTO_CLEAR | NO_INTERNAL_STORE``, cache size
  1), so it never resumes one; OpenSSL's internal cache would.

CPython's ``_ssl._SSLContext`` object holds its ``SSL_CTX *`` right after the object header,
so :func:`match_nginx_sessions` reads that pointer and calls libssl on it through ctypes,
with the symbols looked up through the ``_ssl`` extension's own handle (a dlsym on it
searches the libssl and libcrypto it was linked against: the same library, not another
copy). It writes nothing unless everything checks out first: CPython, the known layout,
every symbol, the library's version equal to :data:`ssl.OPENSSL_VERSION_NUMBER`, and the
pointer's SSL_CTX answering the context's own options, OpenSSL's default timeout and cache
mode, and presenting the very certificate the caller loaded. Otherwise the context stays as
it is and one WARNING says which of nginx's parameters then differ: a prober can tell, but
the server still serves.

This is the one place veil reaches past the ``ssl`` module; it lives beside
``server_ssl_context`` (``manage/state.py``), which is its only caller.
"""

from __future__ import annotations

import _ssl
import ctypes
import hashlib
import logging
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

log = logging.getLogger("veil.manage")

# The _ssl extension's shared object: a dlsym through it finds the libssl it was linked
# against (None where _ssl is built into the interpreter).
SSL_MODULE_LIBRARY: str | None = getattr(_ssl, "__file__", None)

# nginx's ssl_session_timeout default (5m): what SSL_CTX_set_timeout gets, and so every
# ticket's lifetime.
NGINX_SESSION_TIMEOUT = 300
# What nginx's http module digests first into its session id context (its "HTTP" string).
NGINX_HTTP_SESSION_CONTEXT = b"HTTP"
# ssl_session_cache none: a server cache that stores nothing, of size 1 (what nginx sets).
SSL_SESS_CACHE_SERVER = 0x0002
SSL_SESS_CACHE_NO_AUTO_CLEAR = 0x0080
SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x0200
NGINX_CACHE_MODE = (SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_AUTO_CLEAR
                    | SSL_SESS_CACHE_NO_INTERNAL_STORE)
NGINX_CACHE_SIZE = 1
# What a fresh SSL_CTX has, checked before writing: OpenSSL's TLS methods' session timeout
# (2 hours) and the server cache mode.
OPENSSL_DEFAULT_TIMEOUT = 7200
OPENSSL_DEFAULT_CACHE_MODE = SSL_SESS_CACHE_SERVER
# SSL_CTX_set/get_session_cache_mode and SSL_CTX_sess_set_cache_size are macros over
# SSL_CTX_ctrl with these commands (ssl.h, stable since OpenSSL 0.9.8).
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_GET_SESS_CACHE_MODE = 45
# SSL_CTX_get/set_tlsext_ticket_keys are macros over SSL_CTX_ctrl with these commands; the
# keys are a 16-byte key name, a 32-byte HMAC key and a 32-byte AES key (OpenSSL 1.1 and 3).
SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEYS_SIZE = 80

# What a prober sees when the settings could not be applied, for the warning.
DIFFERENCES = (f"ticket lifetime ({OPENSSL_DEFAULT_TIMEOUT} s, nginx {NGINX_SESSION_TIMEOUT} s), "
               "the ticket length (without nginx's session id context) and TLS 1.2 "
               "session-id resumption (nginx's ssl_session_cache none never resumes)")


@dataclass(frozen=True, slots=True)
class LibSSL:
    """The libssl functions used here, typed; ``ctx`` arguments are ``SSL_CTX *``."""

    version_num: Callable[..., int]
    get_options: Callable[..., int]
    get_timeout: Callable[..., int]
    set_timeout: Callable[..., int]
    set_session_id_context: Callable[..., int]
    ctrl: Callable[..., int]
    get0_certificate: Callable[..., int | None]  # an X509 *, owned by the SSL_CTX
    i2d_x509: Callable[..., int]  # libcrypto's DER encoder, reached through libssl's needs


def _function(library: ctypes.CDLL, name: str, restype: type,
              argtypes: list[type]) -> Callable[..., int]:
    function = getattr(library, name)  # AttributeError if it is missing
    function.restype = restype
    function.argtypes = argtypes
    typed: Callable[..., int] = function
    return typed


@cache
def load_libssl(path: str | None) -> LibSSL | str:
    """libssl's functions as found through the shared object at ``path`` (``_ssl``'s: its
    own libssl), or why they cannot be had (a reason for the warning)."""
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if path is None:
        return "the _ssl module is built into the interpreter (no library to look symbols up in)"
    try:
        library = ctypes.CDLL(path)
        ctx, long, uint = ctypes.c_void_p, ctypes.c_long, ctypes.c_uint
        lib = LibSSL(
            version_num=_function(library, "OpenSSL_version_num", ctypes.c_ulong, []),
            get_options=_function(library, "SSL_CTX_get_options", ctypes.c_uint64, [ctx]),
            get_timeout=_function(library, "SSL_CTX_get_timeout", long, [ctx]),
            set_timeout=_function(library, "SSL_CTX_set_timeout", long, [ctx, long]),
            set_session_id_context=_function(library, "SSL_CTX_set_session_id_context",
                                             ctypes.c_int, [ctx, ctypes.c_char_p, uint]),
            ctrl=_function(library, "SSL_CTX_ctrl", long,
                           [ctx, ctypes.c_int, long, ctypes.c_void_p]),
            get0_certificate=_function(library, "SSL_CTX_get0_certificate", ctypes.c_void_p,
                                       [ctx]),
            i2d_x509=_function(library, "i2d_X509", ctypes.c_int,
                               [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]),
        )
    except (OSError, AttributeError) as exc:
        return f"libssl is not usable through {path}: {exc}"
    if lib.version_num() != ssl.OPENSSL_VERSION_NUMBER:
        return (f"the library found is OpenSSL {lib.version_num():#x}, ssl was built with "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x}")
    return lib


def context_pointer(context: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX *`` a CPython ``_ssl._SSLContext`` holds right after its object header,
    or None where that layout cannot be assumed. Reads only inside the object itself."""
    offset = object.__basicsize__
    if (not isinstance(context, _ssl._SSLContext)
            or _ssl._SSLContext.__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p)):
        return None
    return ctypes.c_void_p.from_address(id(context) + offset).value


def nginx_session_id_context(certificate_der: bytes) -> bytes:
    """What nginx's http module gives SSL_CTX_set_session_id_context for one certificate:
    SHA-1 over its "HTTP" string and the certificate's SHA-1 (no client CA list)."""
    # An identifier that has to equal nginx's, not a security measure.
    certificate_digest = hashlib.sha1(certificate_der, usedforsecurity=False).digest()
    return hashlib.sha1(NGINX_HTTP_SESSION_CONTEXT + certificate_digest,
                        usedforsecurity=False).digest()


def _certificate_der(lib: LibSSL, pointer: int) -> bytes | None:
    """The DER of the certificate the SSL_CTX at ``pointer`` presents, None if it has none."""
    certificate = lib.get0_certificate(pointer)
    if not certificate:
        return None
    length = lib.i2d_x509(certificate, None)
    if length <= 0:
        return None
    der = ctypes.create_string_buffer(length)
    cursor = ctypes.c_void_p(ctypes.addressof(der))  # i2d_X509 writes there and advances it
    if lib.i2d_x509(certificate, ctypes.byref(cursor)) != length:
        return None
    return der.raw


def _mismatch(lib: LibSSL, pointer: int | None, context: ssl.SSLContext,
              certificate_der: bytes) -> str | None:
    """Why ``pointer`` is not known to be ``context``'s fresh SSL_CTX, or None if it is.
    Options, timeout and cache mode are the same in every fresh SSL_CTX of a process: they
    tell an SSL_CTX from something else; the certificate tells this one from another."""
    if not pointer:
        return "no SSL_CTX pointer where CPython keeps it"
    options = lib.get_options(pointer)
    if options != context.options:
        return f"its options {options:#x} are not the context's {int(context.options):#x}"
    timeout = lib.get_timeout(pointer)
    if timeout != OPENSSL_DEFAULT_TIMEOUT:
        return f"its session timeout is {timeout}, not OpenSSL's default {OPENSSL_DEFAULT_TIMEOUT}"
    mode = lib.ctrl(pointer, SSL_CTRL_GET_SESS_CACHE_MODE, 0, None)
    if mode != OPENSSL_DEFAULT_CACHE_MODE:
        return f"its session cache mode is {mode:#x}, not OpenSSL's default"
    if _certificate_der(lib, pointer) != certificate_der:
        return "its certificate is not the one the context was given"
    return None


def match_nginx_sessions(context: ssl.SSLContext, certificate_der: bytes, *,
                         library: str | None = SSL_MODULE_LIBRARY) -> bool:
    """Give a freshly made server ``context``, whose certificate ``certificate_der`` (DER,
    the leaf) is loaded, nginx's session timeout, session id context and ``ssl_session_cache
    none``. True if done; False, with one WARNING naming what then differs from nginx, if
    anything did not check out, in which case nothing was written. ``library``: the shared
    object libssl is looked up through, by default the ``_ssl`` module's (another one only in
    tests)."""
    lib = load_libssl(library)
    reason: str | None = lib if isinstance(lib, str) else None
    if not isinstance(lib, str):
        pointer = context_pointer(context)
        reason = _mismatch(lib, pointer, context, certificate_der)
        if reason is None and pointer is not None:
            session_context = nginx_session_id_context(certificate_der)
            lib.set_timeout(pointer, NGINX_SESSION_TIMEOUT)
            written = lib.set_session_id_context(pointer, session_context, len(session_context))
            lib.ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_MODE, NGINX_CACHE_MODE, None)
            lib.ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_SIZE, NGINX_CACHE_SIZE, None)
            if (written == 1 and lib.get_timeout(pointer) == NGINX_SESSION_TIMEOUT
                    and lib.ctrl(pointer, SSL_CTRL_GET_SESS_CACHE_MODE, 0, None)
                    == NGINX_CACHE_MODE):
                return True
            reason = "libssl did not take them all"
    log.warning("nginx's TLS session settings not applied, so a prober can tell veil from "
                "nginx by the %s: %s", DIFFERENCES, reason)
    return False


def set_ticket_keys(context: ssl.SSLContext, keys: bytes, *,
                    library: str | None = SSL_MODULE_LIBRARY) -> bool:
    """Give the server ``context`` these session-ticket keys (:data:`TICKET_KEYS_SIZE`
    bytes) instead of the random ones each SSL_CTX draws: worker processes that share them
    resume each other's tickets, as nginx's workers do (they inherit the master's SSL_CTX).
    The ticket's shape does not change (the same 16-byte key name, AES and HMAC). True if
    libssl took them and reads them back; False, with a WARNING, if not: then a ticket
    resumes only on the worker that issued it and a full handshake happens elsewhere."""
    if len(keys) != TICKET_KEYS_SIZE:
        raise ValueError(f"ticket keys are {TICKET_KEYS_SIZE} bytes")
    lib = load_libssl(library)
    reason = lib if isinstance(lib, str) else None
    if not isinstance(lib, str):
        pointer = context_pointer(context)
        if not pointer or lib.get_options(pointer) != context.options:
            reason = "no SSL_CTX where CPython keeps it"
        else:
            given = ctypes.create_string_buffer(keys, TICKET_KEYS_SIZE)
            read = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
            if (lib.ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_SIZE, given) == 1
                    and lib.ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEYS_SIZE,
                                 read) == 1 and read.raw == keys):
                return True
            reason = "libssl did not take them"
    log.warning("shared TLS ticket keys not set, so a ticket resumes only on the worker that "
                "issued it: %s", reason)
    return False

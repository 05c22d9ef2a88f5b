"""Obtaining the server's certificate from a CA over ACME (RFC 8555), blocking: the server
runs :func:`obtain_certificate` in a worker thread (veil.server.acme schedules it).

The certificate is requested for the state's own key (DIR/key.pem, the one every access key
pins), so a CA-issued certificate, and each renewal of it, keeps every key valid: clients pin
the key, never the certificate or its chain (docs/operations.md, "Certificates").

The name is proven with TLS-ALPN-01 (RFC 8737) on veil's own port: the CA's validation
connects to NAME:443 with ALPN ``acme-tls/1`` and SNI NAME, and the gate answers that one
ClientHello with a challenge certificate while the order waits (``publish``). veil owns its
port, so no second listener (port 80 for HTTP-01) and no DNS API is needed. The ``acme``
library no longer ships TLS-ALPN-01, so its two message classes are defined here, on the
library's own base classes; the JOSE, nonces, polling and finalisation are the library's.

::

    DIR/acme-cert.pem           the CA's chain for DIR/key.pem (leaf first), once obtained
    DIR/acme-account-ID.json    the ACME account key per CA directory (0600)
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy import errors as josepy_errors
from josepy import jwa, jwk

from veil.errors import VeilError
from veil.manage.state import ACME_CERT_NAME, write_private

log = logging.getLogger("veil.acme")

#: Let's Encrypt's production directory: what ``--public NAME`` uses by default.
LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
# One HTTP request to the CA: Let's Encrypt answers in well under a second; a CA that does not
# answer in this long is down for this attempt (the server retries later, veil.server.acme).
ACME_REQUEST_TIMEOUT_S = 30
# A whole order, from the validation to the issued certificate: Let's Encrypt validates from
# several places in seconds; past this the attempt fails and is retried later.
ACME_ORDER_DEADLINE_S = 120.0
# The longest Retry-After a CA's error answer is obeyed for: Let's Encrypt's rate limits name at
# most a week (certificates per registered domain); a later time is taken as this, so that a
# wrong date cannot stop renewals for good.
RETRY_AFTER_MAX_S = 7 * 24 * 3600.0
# badNonce answers retried for one request, each at once with the fresh nonce the error
# carried (RFC 8555 6.5): a CA sends one when its nonce store rotated, Pebble on purpose a set
# share of the time (PEBBLE_WFE_NONCEREJECT); a run of this many means something else is wrong.
BAD_NONCE_RETRIES = 30
# Names no public CA issues for (RFC 2606, 6761, 6762, 8375): the default directory is not
# asked about them; an explicit --acme-directory (a private CA) may be.
RESERVED_SUFFIXES = ("localhost", "local", "test", "invalid", "example", "example.com",
                     "example.net", "example.org", "internal", "lan", "home.arpa")
# The certificate extension a TLS-ALPN-01 challenge certificate carries (RFC 8737 3).
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

#: Called from the worker thread with (name, context) to answer validations for ``name`` with
#: ``context``, and with (name, None) to stop; returns once the gate does so.
Publish = Callable[[str, "ssl.SSLContext | None"], None]


@dataclass(frozen=True, slots=True)
class Obtained:
    """A certificate :func:`obtain_certificate` obtained."""

    #: DIR/acme-cert.pem, the chain just written.
    path: Path
    #: badNonce answers the CA gave (and that were retried) on the way.
    bad_nonces: int


class AcmeError(VeilError):
    """An ACME order failed: the CA refused or could not validate, or could not be reached.
    ``code``: ``acme_unreachable``, ``acme_refused`` (an error answer, e.g. rateLimited),
    ``acme_validation`` (the CA could not see the challenge at the name) or ``acme_cancelled``
    (the server stopped during the order). ``retry_after``: the seconds the CA asked the next
    try to wait (its Retry-After header, at most :data:`RETRY_AFTER_MAX_S`), or None."""

    code = "acme_failed"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: datetime.datetime) -> float | None:
    """A Retry-After header's wait in seconds (delta-seconds or an HTTP date, RFC 9110
    10.2.3), at most :data:`RETRY_AFTER_MAX_S`; None without a header or for one that does
    not parse."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT; a date without a zone is taken so
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - now).total_seconds()
    return min(RETRY_AFTER_MAX_S, max(0.0, seconds))


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge: an empty object (RFC 8555 7.5.1); the proof is
    the certificate the CA's validation gets."""

    typ = "tls-alpn-01"


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """A tls-alpn-01 challenge (RFC 8737)."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jwk.JWK, **kwargs: Any) -> bytes:
        """The acmeIdentifier value: SHA-256 of the key authorization (RFC 8737 3)."""
        return hashlib.sha256(self.key_authorization(account_key).encode()).digest()


challenges.Challenge.register(TLSALPN01)
challenges.ChallengeResponse.register(TLSALPN01Response)


def public_ca_may_issue(name: str) -> bool:
    """Whether a public CA could issue for ``name``: a DNS name with a dot, not an address
    and not under a reserved name."""
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        pass
    name = name.lower().rstrip(".")
    return "." in name and not any(name == s or name.endswith("." + s)
                                   for s in RESERVED_SUFFIXES)


def challenge_certificate(name: str, digest: bytes) -> tuple[bytes, bytes]:
    """(certificate, key) PEM of a TLS-ALPN-01 challenge certificate for ``name``: self-signed,
    the name as its only subjectAltName, and the critical acmeIdentifier extension holding
    ``digest`` (RFC 8737 3). Its key is new and thrown away with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    # The extension's value is an ASN.1 OCTET STRING of the 32-byte digest.
    identifier = x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(identifier, critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def challenge_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context that presents the challenge certificate and agrees on ``acme-tls/1``
    alone (RFC 8737 3: TLS 1.2 or later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["acme-tls/1"])
    # load_cert_chain reads files only: a private directory that is gone right after.
    with tempfile.TemporaryDirectory(prefix="veil-acme-") as scratch:
        path = Path(scratch) / "challenge.pem"
        write_private(path, key_pem + cert_pem)
        context.load_cert_chain(path)
    return context


class _Network(client.ClientNetwork):
    """acme's network layer with a CA bundle for the directory's TLS (``--acme-ca-bundle``),
    badNonce retried up to :data:`BAD_NONCE_RETRIES` times (the library tries twice), the
    Retry-After of the last error answer kept, and no request started once ``cancelled``."""

    def __init__(self, key: jwk.JWK, ca_bundle: Path | None, timeout: float,
                 cancelled: threading.Event) -> None:
        # requests takes a float timeout; the library's annotation says int.
        super().__init__(key, alg=jwa.ES256, timeout=timeout)  # type: ignore[arg-type]
        if ca_bundle is not None:
            # requests' `verify` takes a CA file's path as well as a bool.
            self.verify_ssl = str(ca_bundle)  # type: ignore[assignment]
        self.cancelled = cancelled
        #: badNonce answers retried so far (tests read it).
        self.bad_nonces = 0
        #: The Retry-After (seconds) of the last error answer, None if it had none.
        self.retry_after: float | None = None

    def _send_request(self, method: str, url: str, *args: Any,
                      **kwargs: Any) -> requests.Response:
        # Between requests is where an order can stop: the library's polls sleep 1 s between
        # them, and a request lasts at most the timeout.
        if self.cancelled.is_set():
            raise AcmeError("the server is stopping", code="acme_cancelled")
        response = super()._send_request(method, url, *args, **kwargs)
        if not response.ok:
            self.retry_after = retry_after_seconds(response.headers.get("Retry-After"),
                                                   datetime.datetime.now(datetime.UTC))
        return response

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(BAD_NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
                self.bad_nonces += 1
        return self._post_once(*args, **kwargs)


def _account_key(directory: Path, directory_url: str) -> jwk.JWKEC:
    """This state's account key at the CA behind ``directory_url``, made on first use: one
    account per CA, since an account exists only at the CA that made it."""
    ident = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
    path = directory / f"acme-account-{ident}.json"
    try:
        raw = json.loads(path.read_text())
        key = jwk.JWKEC.json_loads(json.dumps(raw["key"]))
        assert isinstance(key, jwk.JWKEC)
        return key
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, josepy_errors.DeserializationError) as exc:
        raise AcmeError(f"{path} is damaged ({exc}): delete it to register a new account",
                        code="acme_refused") from exc
    key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    write_private(path, (json.dumps({"directory": directory_url,
                                      "key": key.to_json()}) + "\n").encode())
    return key


def _csr(key_pem: bytes, name: str) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)  # state.py's kinds
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _why_unreachable(exc: BaseException) -> str:
    """The cause of a failed request in a few words: requests wraps it in urllib3's pool and
    retry errors, whose text names the pool before the reason."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within the request timeout ({exc.__class__.__name__})"
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if reason is not None:  # urllib3's MaxRetryError: the reason is the last attempt's error
        return str(reason).rsplit("): ", 1)[-1]
    return str(exc)


def obtain_certificate(directory: Path, name: str, *, directory_url: str,
                       ca_bundle: Path | None = None, email: str | None = None,
                       publish: Publish, cancelled: threading.Event | None = None,
                       request_timeout: float = ACME_REQUEST_TIMEOUT_S) -> Obtained:
    """Order a certificate for ``name`` and the state's key from the CA at ``directory_url``,
    answer its TLS-ALPN-01 challenge through ``publish``, and write the chain into
    DIR/acme-cert.pem, atomically. Blocking (seconds; each request at most
    ``request_timeout``, the order at most :data:`ACME_ORDER_DEADLINE_S`); once ``cancelled``
    is set, no further request is made (AcmeError ``acme_cancelled``; a pending order is left
    to expire at the CA, as RFC 8555 lets it). Raises :class:`AcmeError` and leaves
    DIR/acme-cert.pem as it was."""
    published = False
    net: _Network | None = None
    try:
        net = _Network(_account_key(directory, directory_url), ca_bundle, request_timeout,
                       cancelled or threading.Event())
        acme = client.ClientV2(client.ClientV2.get_directory(directory_url, net), net)
        registration = messages.NewRegistration.from_data(email=email,
                                                          terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except errors.ConflictError as exists:  # this key has an account there already
            acme.query_registration(messages.RegistrationResource(
                uri=exists.location, body=messages.Registration()))
        order = acme.new_order(_csr((directory / "key.pem").read_bytes(), name))
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # the CA remembers an earlier validation
            challenge = next((c for c in authorization.body.challenges
                              if isinstance(c.chall, TLSALPN01)), None)
            if challenge is None:
                raise AcmeError(f"the CA offers no tls-alpn-01 challenge for {name}",
                                code="acme_refused")
            response, digest = challenge.chall.response_and_validation(net.key)
            publish(name, challenge_context(*challenge_certificate(name, digest)))
            published = True
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ACME_ORDER_DEADLINE_S)
        final = acme.poll_and_finalize(order, deadline)
    except AcmeError:
        raise
    except errors.ValidationError as exc:
        problems = "; ".join(
            f"{c.error.detail or c.error.code}" for authz in exc.failed_authzrs
            for c in authz.body.challenges if c.error is not None)
        raise AcmeError(f"the CA could not validate {name} (TLS-ALPN-01 on port 443 of the "
                        f"address the name resolves to): {problems}",
                        code="acme_validation") from exc
    except messages.Error as exc:
        retry_after = net.retry_after if net is not None else None
        after = f" (it asks to wait {retry_after:.0f} s)" if retry_after is not None else ""
        raise AcmeError(f"the CA refused: {exc.code or exc.typ}: {exc.detail}{after}",
                        code="acme_refused", retry_after=retry_after) from exc
    except (requests.RequestException, errors.Error, OSError, ValueError) as exc:
        raise AcmeError(f"cannot reach the CA at {directory_url}: {_why_unreachable(exc)}",
                        code="acme_unreachable") from exc
    finally:
        if published:
            publish(name, None)
        if net is not None:
            net.session.close()
    chain = final.fullchain_pem.encode()
    path = directory / ACME_CERT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(chain)
    os.replace(tmp, path)
    return Obtained(path, net.bad_nonces)

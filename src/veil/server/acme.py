"""Keeping a CA certificate for the server's DNS name: obtained over ACME at start (in a worker
thread: the ``acme`` library blocks), renewed when a third of its life is left, and swapped in
without a restart (new handshakes get it, live sessions keep theirs). A failed order is
retried with a growing delay (never sooner than the CA's Retry-After) while the server serves
the certificate it has: the previous CA one, or the self-signed one until the first succeeds.
At stop, an order under way is abandoned: its thread makes no further request."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable

from veil.config import ServerOptions
from veil.manage.acme import (
    ACME_REQUEST_TIMEOUT_S,
    LETS_ENCRYPT_DIRECTORY,
    AcmeError,
    Obtained,
    obtain_certificate,
    public_ca_may_issue,
)
from veil.manage.state import ServerState, current_ca_certificate, renew_before

log = logging.getLogger("veil.server")

# The first retry after a failed order, doubled after each further failure up to
# RETRY_MAX_S: soon enough to recover from a CA's blip or a DNS record just made, slow enough
# to stay far below Let's Encrypt's limit of 5 failed validations per name an hour.
RETRY_FIRST_S = 60.0
RETRY_MAX_S = 6 * 3600.0
# The longest sleep between looks at the certificate's renewal time: a certificate replaced
# behind the server's back (a restored backup) is noticed within a day.
RECHECK_S = 24 * 3600.0
# How long the worker thread waits for the event loop to install or remove a challenge
# certificate: the loop answers in microseconds unless it is stuck.
PUBLISH_TIMEOUT_S = 10.0
# How long stop() waits for an order's thread to see it is cancelled: it looks before each
# request, and the library polls once a second; a request to a CA that hangs may last
# ACME_REQUEST_TIMEOUT_S, and the stop does not wait that out (the thread is a daemon, ends
# when the request does and touches nothing of the server's after).
STOP_GRACE_S = 2.0


def acme_directory_for(options: ServerOptions, state: ServerState) -> str | None:
    """The ACME directory the server's certificate comes from, or None for none: not with
    ``--self-signed`` or ``--cert``, not for an IP address, and by default (Let's Encrypt)
    only for a name a public CA may issue for."""
    if options.self_signed or state.cert_source == "operator" or state.sni is None:
        return None
    if options.acme_directory is not None:
        return options.acme_directory
    return LETS_ENCRYPT_DIRECTORY if public_ca_may_issue(state.sni) else None


class CertificateRenewer:
    """Obtains and renews the certificate of ``state().sni`` from ``directory_url``; a
    challenge is answered through ``challenges`` (the gate's), a new certificate put in force
    with ``reload`` (the server's: it re-reads the state and builds a new TLS context)."""

    def __init__(self, directory_url: str, options: ServerOptions,
                 state: Callable[[], ServerState],
                 challenges: dict[str, ssl.SSLContext],
                 reload: Callable[[], Awaitable[None]]) -> None:
        self.directory_url = directory_url
        self.options = options
        self._state = state
        self._challenges = challenges
        self._reload = reload
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Orders that failed in a row (the retry delay doubles with each).
        self.failures = 0
        #: Certificates obtained since start, each counted once in force.
        self.obtained = 0
        #: badNonce answers the CA gave in the orders that succeeded (each one retried).
        self.bad_nonces = 0
        #: The first retry's delay, doubled per failure up to ``retry_max_s`` (tests shorten
        #: it), and one request's timeout.
        self.retry_first_s = RETRY_FIRST_S
        self.retry_max_s = RETRY_MAX_S
        self.request_timeout_s: float = ACME_REQUEST_TIMEOUT_S
        #: The delays waited after each failure, in order (what the log said).
        self.retry_delays: list[float] = []
        # Set at stop: the order's thread makes no further request.
        self._cancelled = threading.Event()
        self._worker: threading.Thread | None = None

    def due_in(self) -> float:
        """Seconds until the certificate should be renewed; 0 without a usable one."""
        state = self._state()
        assert state.sni is not None  # acme_directory_for
        cert = current_ca_certificate(state.directory, state.sni)
        if cert is None:
            return 0.0
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        renew_at = cert.not_valid_after_utc - renew_before(lifetime)
        return max(0.0, (renew_at - datetime.datetime.now(datetime.UTC)).total_seconds())

    async def renew(self) -> None:
        """One order, and the certificate in force once issued; raises :class:`AcmeError`."""
        loop = self._loop = asyncio.get_running_loop()
        state = self._state()
        assert state.sni is not None
        sni = state.sni
        done: asyncio.Future[Obtained] = loop.create_future()

        def settle(outcome: Obtained | BaseException) -> None:
            if done.done():  # cancelled by stop()
                return
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

        def order() -> None:
            outcome: Obtained | BaseException
            try:
                outcome = obtain_certificate(
                    state.directory, sni, directory_url=self.directory_url,
                    ca_bundle=self.options.acme_ca_bundle, email=self.options.acme_email,
                    publish=self._publish, cancelled=self._cancelled,
                    request_timeout=self.request_timeout_s)
            except BaseException as exc:  # handed to the loop and raised there
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopped long ago
                loop.call_soon_threadsafe(settle, outcome)

        # A daemon thread of its own, not asyncio.to_thread: the default executor is waited
        # for when the loop ends, and a request to a CA that hangs would hold the exit.
        self._worker = threading.Thread(target=order, name="veil-acme", daemon=True)
        self._worker.start()
        obtained = await done
        self.bad_nonces += obtained.bad_nonces
        await self._reload()
        self.obtained += 1

    async def run(self) -> None:
        """Renew whenever due, until cancelled; failures are logged and retried."""
        while True:
            due = self.due_in()
            if due > 0:
                await asyncio.sleep(min(due, RECHECK_S))
                continue
            try:
                await self.renew()
            except AcmeError as exc:
                self.failures += 1
                delay = min(self.retry_max_s, self.retry_first_s * 2 ** (self.failures - 1))
                # A CA's Retry-After (a rate limit) is obeyed even past the backoff's cap.
                delay = round(max(delay, exc.retry_after or 0.0), 1)
                self.retry_delays.append(delay)
                state = self._state()
                log.error("ACME: no certificate for %s from %s: %s; still presenting the %s "
                          "certificate; next try in %g s", state.sni, self.directory_url,
                          exc, state.cert_source, delay)
                await asyncio.sleep(delay)
                continue
            self.failures = 0
            log.info("ACME: obtained a certificate for %s from %s; presenting it from now on",
                     self._state().sni, self.directory_url)

    async def stop(self) -> None:
        """Abandon an order under way: its thread makes no further request, and its challenge
        certificate is withdrawn. Waits at most :data:`STOP_GRACE_S` for the thread."""
        self._cancelled.set()
        worker = self._worker
        if worker is None or not worker.is_alive():
            return
        await asyncio.to_thread(worker.join, STOP_GRACE_S)
        self._challenges.clear()  # whatever the thread could not withdraw itself
        state = self._state()
        if worker.is_alive():
            log.info("ACME: stopped while a request to %s was under way; the order for %s is "
                     "abandoned (it ends with that request, within %g s)", self.directory_url,
                     state.sni, self.request_timeout_s)
        else:
            log.info("ACME: the order for %s under way was abandoned at stop", state.sni)

    def _publish(self, name: str, context: ssl.SSLContext | None) -> None:
        """From the worker thread: the gate answers ``name``'s validations with ``context``
        (None: no more), in force when this returns. Nothing is published once stopping."""
        if context is not None and self._cancelled.is_set():
            raise AcmeError("the server is stopping", code="acme_cancelled")
        applied = threading.Event()

        def apply() -> None:
            if context is None:
                self._challenges.pop(name, None)
            else:
                self._challenges[name] = context
            applied.set()

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: the server stopped during the order
            return
        if not applied.wait(PUBLISH_TIMEOUT_S) and context is not None:
            raise AcmeError("the server did not install the challenge certificate",
                            code="acme_cancelled")

"""The cover site's files and nginx's static-file semantics over them.

:class:`CoverSite` answers one parsed :class:`Request` as nginx's index and static modules and
its header filters would (conditional and range requests, ETags, error pages with the
MSIE/Chrome padding); :mod:`veil.cover.http1` and :mod:`veil.cover.http2` carry its answers.

The built-in site
    Generated per install by :mod:`veil.cover.generate` from the seed in the server's state:
    pages, names, sizes and file times (hence ``Last-Modified`` and ``ETag``) differ between
    installs and stay the same across restarts, as a real site's files do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from veil.cover.generate import SiteSeed, fresh_seed, generate_site
from veil.cover.nginx import (
    MSIE_PADDING,
    REASONS,
    SERVER_NAME,
    STATUS_TO_HTTPS,
    error_page,
    http_date,
    parse_http_time,
)

__all__ = ["DEFAULT_MTIME", "Answer", "CoverSite", "Request", "Responder", "Response",
           "SiteFile"]

#: 2023-03-15 13:20:00 UTC: a fixed file time for sites built by hand (tests).
DEFAULT_MTIME = 1678886400

CRLF = b"\r\n"

#: nginx's mime.types, for the extensions a small site uses.
_MIME_TYPES: dict[str, bytes] = {
    "html": b"text/html", "htm": b"text/html", "shtml": b"text/html",
    "css": b"text/css", "xml": b"text/xml", "txt": b"text/plain",
    "js": b"application/javascript", "json": b"application/json",
    "gif": b"image/gif", "jpeg": b"image/jpeg", "jpg": b"image/jpeg", "png": b"image/png",
    "svg": b"image/svg+xml", "svgz": b"image/svg+xml", "webp": b"image/webp",
    "ico": b"image/x-icon", "woff": b"font/woff", "woff2": b"font/woff2",
    "pdf": b"application/pdf", "zip": b"application/zip",
}
_DEFAULT_TYPE = b"application/octet-stream"


@dataclass(frozen=True)
class SiteFile:
    """One file of the cover site.

    Attributes:
        body: the file's bytes.
        content_type: as nginx's mime.types would give it for the file's extension.
        mtime: whole seconds since the epoch; drives Last-Modified and the ETag.
    """

    body: bytes
    content_type: bytes
    mtime: int

    @property
    def etag(self) -> bytes:
        """nginx's ETag: hex mtime, dash, hex size, in quotes."""
        return b'"%x-%x"' % (self.mtime, len(self.body))


def _mime_for(name: str) -> bytes:
    dot = name.rfind(".")
    if dot < 0:
        return _DEFAULT_TYPE
    return _MIME_TYPES.get(name[dot + 1:], _DEFAULT_TYPE)


@dataclass(frozen=True)
class Request:
    """A request whose request line and headers were accepted by the parser.

    Attributes:
        method: the method token as sent (``b"GET"``).
        uri: the normalised, percent-decoded path (``b"/index.html"``).
        version: nginx's number: 9 for HTTP/0.9, 1000 for 1.0, 1001 for 1.1.
        headers: the headers that matter, by lower-case name, first value.
        content_length: -1 when absent.
        chunked: Transfer-Encoding: chunked.
        keepalive: whether nginx would keep the connection after the response.
        msie_padding: whether error pages get the MSIE/Chrome padding.
        args: the query string as sent, without its ``?`` (nginx's ``$args``).
    """

    method: bytes
    uri: bytes
    version: int
    headers: Mapping[bytes, bytes] = field(default_factory=dict)
    content_length: int = -1
    chunked: bool = False
    keepalive: bool = False
    msie_padding: bool = False
    args: bytes = b""


@dataclass(frozen=True)
class Answer:
    """What a :class:`Responder` serves instead of the site's files: a 200 with this body.

    Attributes:
        body: the response body.
        content_type: its Content-Type.
        headers: further ``(name, value)`` header lines, after nginx's own.
    """

    body: bytes
    content_type: bytes
    headers: Sequence[tuple[bytes, bytes]] = ()


class Responder(Protocol):
    """Something the built-in site asks about each GET or HEAD before it looks at its own
    files, on HTTP/1.1 and HTTP/2 alike (the subscriptions, veil.server.subscription). A
    request it does not answer (None) is served as always, so a responder that answers
    nothing a stranger can send changes nothing a stranger sees."""

    def answer(self, req: Request) -> Answer | None:
        """The answer for ``req``, or None to leave it to the site. Called in the event
        loop for every GET and HEAD: it must not block."""


@dataclass
class Response:
    """What a request produced: the bytes and what the connection does afterwards."""

    data: bytes
    status: int
    keepalive: bool
    #: close at once whatever else holds (nginx's "terminate request" path, e.g. after 412).
    terminate: bool = False
    #: send "HTTP/1.1 100 Continue" first (Expect: 100-continue on a GET that is served).
    continue_first: bool = False


class CoverSite:
    """The files of the cover site and nginx's static-file semantics over them.

    ``files`` maps a name in the site's root (no slashes: the site is flat) to its file.
    """

    def __init__(self, files: Mapping[str, SiteFile]) -> None:
        for name in files:
            if not name or "/" in name:
                raise ValueError(f"cover site file names must be flat, got {name!r}")
        self._files = {("/" + name).encode(): f for name, f in files.items()}
        #: Asked before the files (GET and HEAD that nginx would serve): None asks nobody.
        self.responder: Responder | None = None
        # nginx's ngx_temp_number: multipart range boundaries count up from 1 per process.
        self._boundary = 0

    @classmethod
    def builtin(cls, seed: SiteSeed | None = None) -> CoverSite:
        """The site generated for ``seed`` (the install's, from its state); without one, for
        a fresh seed: a site of its own for this process alone (tests, embedding)."""
        generated = generate_site(seed or fresh_seed())
        return cls({name: SiteFile(f.body, _mime_for(name), f.mtime)
                    for name, f in sorted(generated.items())})

    @property
    def names(self) -> list[str]:
        return sorted(k.decode()[1:] for k in self._files)

    # -- responses ---------------------------------------------------------------------

    def error(self, status: int, *, date: float, version: int = 1001, head: bool = False,
              keepalive: bool = False, msie_padding: bool = False,
              extra_headers: bytes = b"") -> bytes:
        """nginx's special response for ``status`` (a 4xx/5xx or 494/497), as bytes.

        ``date``: the Unix time its Date header shows (the caller's clock, not read here).
        """
        body = error_page(status)
        if msie_padding and version >= 1000:
            body += MSIE_PADDING
        if version < 1000:
            return body
        header = self._header(status, b"text/html", len(body), date=date, last_modified=None,
                              keepalive=keepalive, extra=extra_headers)
        return header if head else header + body

    def _header(self, status: int, content_type: bytes | None, length: int | None, *,
                date: float, last_modified: int | None, keepalive: bool,
                extra: bytes = b"") -> bytes:
        out = [b"HTTP/1.1 ", REASONS[status], CRLF, b"Server: ", SERVER_NAME, CRLF,
               b"Date: ", http_date(date), CRLF]
        if content_type is not None:
            out += [b"Content-Type: ", content_type, CRLF]
        if length is not None:
            out += [b"Content-Length: %d\r\n" % length]
        if last_modified is not None:
            out += [b"Last-Modified: ", http_date(last_modified), CRLF]
        out.append(b"Connection: keep-alive\r\n" if keepalive else b"Connection: close\r\n")
        out += [extra, CRLF]
        return b"".join(out)

    def respond(self, req: Request, *, date: float) -> Response:
        """Serve ``req`` as nginx's index + static modules and header filters would.

        ``date``: the Unix time the Date header shows.
        """
        method = req.method
        head = method == b"HEAD"
        if self.responder is not None and method in (b"GET", b"HEAD") and req.version >= 1000:
            answer = self.responder.answer(req)
            if answer is not None:
                return self._answered(req, answer, head=head, date=date)
        allowed = method in (b"GET", b"HEAD", b"POST")
        uri = req.uri
        if uri.endswith(b"/"):
            if not allowed:
                return self.fail(req, 405, date=date)
            if uri != b"/":
                return self.fail(req, 404, date=date)
            uri = b"/index.html"  # the index module's internal redirect
        elif not allowed:
            return self.fail(req, 405, date=date)
        f = self._files.get(uri)
        if f is None:
            return self.fail(req, 404, date=date)
        if method == b"POST":
            return self.fail(req, 405, date=date)
        expect = req.headers.get(b"expect")
        continue_first = (req.version >= 1001 and expect is not None
                          and expect.lower() == b"100-continue")
        if req.version < 1000:
            return Response(f.body, 200, False, continue_first=False)

        # ngx_http_not_modified_filter
        ius = req.headers.get(b"if-unmodified-since")
        if ius is not None:
            t = parse_http_time(ius)
            if t is None or t < f.mtime:
                return self.fail(req, 412, date=date, terminate=True,
                                  continue_first=continue_first)
        im = req.headers.get(b"if-match")
        if im is not None and not _etag_match(im, f.etag, weak=False):
            return self.fail(req, 412, date=date, terminate=True,
                                  continue_first=continue_first)
        ims = req.headers.get(b"if-modified-since")
        inm = req.headers.get(b"if-none-match")
        if ims is not None or inm is not None:
            modified = ims is not None and parse_http_time(ims) != f.mtime
            if not modified and inm is not None and not _etag_match(inm, f.etag, weak=True):
                modified = True
            if not modified:
                data = self._header(304, None, None, date=date, last_modified=f.mtime,
                                    keepalive=req.keepalive, extra=b"ETag: " + f.etag + CRLF)
                return Response(data, 304, req.keepalive, continue_first=continue_first)

        # ngx_http_range_header_filter
        rng = req.headers.get(b"range")
        if rng is not None and rng[:6].lower() == b"bytes=" and self._if_range_ok(req, f):
            ranges = _parse_ranges(rng[6:], len(f.body))
            if ranges == "unsatisfiable":
                extra = b"Content-Range: bytes */%d\r\n" % len(f.body)
                return self.fail(req, 416, date=date, extra_headers=extra,
                                  continue_first=continue_first)
            if isinstance(ranges, list):
                return self._ranged(req, f, ranges, head, continue_first, date)

        data = self._header(200, f.content_type, len(f.body), date=date, last_modified=f.mtime,
                            keepalive=req.keepalive,
                            extra=b"ETag: " + f.etag + b"\r\nAccept-Ranges: bytes\r\n")
        if not head:
            data += f.body
        return Response(data, 200, req.keepalive, continue_first=continue_first)

    def _answered(self, req: Request, answer: Answer, *, head: bool, date: float) -> Response:
        """A responder's answer, framed as nginx frames a 200 (no Last-Modified: a
        generated answer, as from a proxied application)."""
        extra = b"".join(name + b": " + value + CRLF for name, value in answer.headers)
        data = self._header(200, answer.content_type, len(answer.body), date=date,
                            last_modified=None, keepalive=req.keepalive, extra=extra)
        if not head:
            data += answer.body
        return Response(data, 200, req.keepalive)

    @staticmethod
    def _if_range_ok(req: Request, f: SiteFile) -> bool:
        if_range = req.headers.get(b"if-range")
        if if_range is None:
            return True
        if if_range.startswith(b'"'):
            return if_range == f.etag
        return parse_http_time(if_range) == f.mtime

    def _ranged(self, req: Request, f: SiteFile, ranges: list[tuple[int, int]], head: bool,
                continue_first: bool, date: float) -> Response:
        size = len(f.body)
        tag = b"ETag: " + f.etag + CRLF
        if len(ranges) == 1:
            start, end = ranges[0]
            extra = tag + b"Content-Range: bytes %d-%d/%d\r\n" % (start, end - 1, size)
            data = self._header(206, f.content_type, end - start, date=date,
                                last_modified=f.mtime,
                                keepalive=req.keepalive, extra=extra)
            if not head:
                data += f.body[start:end]
            return Response(data, 206, req.keepalive, continue_first=continue_first)
        self._boundary += 1
        boundary = b"%020d" % self._boundary
        parts = []
        for start, end in ranges:
            parts += [b"\r\n--", boundary, b"\r\nContent-Type: ", f.content_type,
                      b"\r\nContent-Range: bytes %d-%d/%d\r\n\r\n" % (start, end - 1, size),
                      f.body[start:end]]
        parts += [b"\r\n--", boundary, b"--\r\n"]
        body = b"".join(parts)
        ctype = b"multipart/byteranges; boundary=" + boundary
        data = self._header(206, ctype, len(body), date=date, last_modified=f.mtime,
                            keepalive=req.keepalive, extra=tag)
        if not head:
            data += body
        return Response(data, 206, req.keepalive, continue_first=continue_first)

    def fail(self, req: Request, status: int, *, date: float, terminate: bool = False,
             extra_headers: bytes = b"", continue_first: bool = False) -> Response:
        """Answer ``req`` with the error page for ``status``; whether the connection stays
        is decided as nginx's special response handler does."""
        keepalive = req.keepalive and status not in _CLOSING_STATUSES
        data = self.error(status, date=date, version=req.version, head=req.method == b"HEAD",
                          keepalive=keepalive, msie_padding=req.msie_padding,
                          extra_headers=extra_headers)
        return Response(data, status, keepalive and not terminate, terminate=terminate,
                        continue_first=continue_first)


# ngx_http_special_response_handler turns keep-alive off for these.
_CLOSING_STATUSES = frozenset({400, 413, 414, STATUS_TO_HTTPS, 500, 501})


def _etag_match(header: bytes, etag: bytes, *, weak: bool) -> bool:
    """ngx_http_test_if_match: is ``etag`` in the comma-separated list ``header``?"""
    if header == b"*":
        return True
    start, end = 0, len(header)
    while start < end:
        if weak and end - start > 2 and header[start:start + 2] == b"W/":
            start += 2
        if len(etag) > end - start:
            return False
        if header[start:start + len(etag)] == etag:
            start += len(etag)
            while start < end and header[start] in b" \t":
                start += 1
            if start == end or header[start] == 0x2C:
                return True
        while start < end and header[start] != 0x2C:
            start += 1
        while start < end and header[start] in b" \t,":
            start += 1
    return False


def _parse_ranges(spec: bytes, size: int) -> list[tuple[int, int]] | str:
    """ngx_http_range_parse: a list of [start, end) pairs, "unsatisfiable" or "ignore"."""
    s = spec + b"\0"
    p = 0
    ranges: list[tuple[int, int]] = []
    total = 0
    limit = (1 << 63) - 1

    def digits(p: int) -> tuple[int, int] | None:
        n = 0
        while 0x30 <= s[p] <= 0x39:
            n = n * 10 + s[p] - 0x30
            if n > limit:
                return None
            p += 1
        return n, p

    while True:
        start = end = 0
        suffix = False
        while s[p] == 0x20:
            p += 1
        if s[p] != 0x2D:
            if not 0x30 <= s[p] <= 0x39:
                return "unsatisfiable"
            got = digits(p)
            if got is None:
                return "unsatisfiable"
            start, p = got
            while s[p] == 0x20:
                p += 1
            if s[p] != 0x2D:
                return "unsatisfiable"
            p += 1
            while s[p] == 0x20:
                p += 1
            if s[p] in (0x2C, 0):
                end = size
                got_end = True
            else:
                got_end = False
        else:
            suffix = True
            p += 1
            got_end = False
        if not got_end:
            if not 0x30 <= s[p] <= 0x39:
                return "unsatisfiable"
            got = digits(p)
            if got is None:
                return "unsatisfiable"
            end, p = got
            while s[p] == 0x20:
                p += 1
            if s[p] not in (0x2C, 0):
                return "unsatisfiable"
            if suffix:
                start = size - end if end < size else 0
                end = size - 1
            end = size if end >= size else end + 1
        if start < end:
            ranges.append((start, end))
            total += end - start
        elif start == 0:
            return "ignore"
        if s[p] != 0x2C:
            break
        p += 1
    if not ranges:
        return "unsatisfiable"
    if total > size:
        return "ignore"
    return ranges

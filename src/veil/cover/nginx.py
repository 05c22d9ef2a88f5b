"""nginx 1.22.1's fixed parts, shared by the HTTP/1.1 and HTTP/2 emulations.

Its default limits and timeouts, status lines and error pages, the dates it writes and reads,
the byte tables of its parsers and its MSIE/Chrome test: everything here is a value or a pure
function, so :mod:`veil.cover.http1` and :mod:`veil.cover.http2` answer from one copy.
"""

from __future__ import annotations

from email.utils import formatdate

# -- limits and timeouts: nginx 1.22 defaults, each a named constant (STYLE habit 10) ---------

SERVER_NAME = b"nginx/1.22.1"
#: client_header_buffer_size 1k: the first read of a request goes into a buffer this big.
CLIENT_HEADER_BUFFER_SIZE = 1024
#: large_client_header_buffers 4 8k: a request line or header line must fit in one of these,
#: and a request may use at most four of them. Past that nginx answers 414 or 400 (494).
LARGE_HEADER_BUFFER_SIZE = 8192
LARGE_HEADER_BUFFERS = 4
#: client_max_body_size 1m: a larger Content-Length gets 413.
CLIENT_MAX_BODY_SIZE = 1024 * 1024
#: keepalive_requests 1000: the 1000th request on a connection gets "Connection: close".
KEEPALIVE_REQUESTS = 1000
#: keepalive_time 1h: a connection older than this is not kept alive after a response.
KEEPALIVE_TIME = 3600.0
#: client_header_timeout 60s, keepalive_timeout 75s, lingering_timeout 5s, lingering_time 30s.
CLIENT_HEADER_TIMEOUT = 60.0
KEEPALIVE_TIMEOUT = 75.0
LINGERING_TIMEOUT = 5.0
LINGERING_TIME = 30.0
#: off_t's maximum: a larger Content-Length is invalid (400).
MAX_OFF_T = (1 << 63) - 1

#: Status lines by status (494 and 497 are written as 400, as nginx does).
REASONS: dict[int, bytes] = {
    100: b"100 Continue",
    200: b"200 OK",
    206: b"206 Partial Content",
    304: b"304 Not Modified",
    400: b"400 Bad Request",
    403: b"403 Forbidden",
    404: b"404 Not Found",
    405: b"405 Not Allowed",
    412: b"412 Precondition Failed",
    413: b"413 Request Entity Too Large",
    414: b"414 Request-URI Too Large",
    416: b"416 Requested Range Not Satisfiable",
    494: b"400 Bad Request",
    497: b"400 Bad Request",
    500: b"500 Internal Server Error",
    501: b"501 Not Implemented",
    505: b"505 HTTP Version Not Supported",
}

# nginx's pseudo-statuses: 494 "request header too large", 497 "plain HTTP to HTTPS port".
STATUS_HEADER_TOO_LARGE = 494
STATUS_TO_HTTPS = 497

_PAGE_TAIL = b"<hr><center>" + SERVER_NAME + b"</center>\r\n</body>\r\n</html>\r\n"
MSIE_PADDING = b"<!-- a padding to disable MSIE and Chrome friendly error page -->\r\n" * 6


def error_page(status: int) -> bytes:
    """The body of nginx's special response for ``status`` (ngx_http_error_pages)."""
    if status == STATUS_HEADER_TOO_LARGE:
        head = (
            b"<html>\r\n<head><title>400 Request Header Or Cookie Too Large</title></head>\r\n"
            b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
            b"<center>Request Header Or Cookie Too Large</center>\r\n"
        )
    elif status == STATUS_TO_HTTPS:
        head = (
            b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port"
            b"</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
            b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
        )
    else:
        title = REASONS[status]
        head = (
            b"<html>\r\n<head><title>" + title + b"</title></head>\r\n<body>\r\n<center><h1>"
            + title + b"</h1></center>\r\n"
        )
    return head + _PAGE_TAIL


# -- the byte tables of nginx's parsers (ngx_http_parse.c) -----------------------------------

#: nginx's "usual" table: URI bytes that need no further attention (no "#%+./?", no CTLs).
USUAL = frozenset(c for c in range(0x21, 256) if c not in b"#%+./?\x7f")
METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
ALPHA = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
DIGITS = frozenset(b"0123456789")
HOST_CHARS = ALPHA | DIGITS | frozenset(b".-")
SCHEMA_CHARS = ALPHA | DIGITS | frozenset(b"+-.")
IP_LITERAL_CHARS = ALPHA | DIGITS | frozenset(b":-._~!$&'()*+,;=")
#: ngx_http_parse_header_line's lowcase table: bytes that may appear in a valid header name.
HEADER_NAME_CHARS = ALPHA | DIGITS | frozenset(b"-")

#: Headers that may appear only once (ngx_http_process_unique_header_line in 1.22).
UNIQUE_HEADERS = frozenset({
    b"if-modified-since", b"if-unmodified-since", b"if-match", b"if-none-match",
    b"content-length", b"content-range", b"if-range", b"transfer-encoding", b"expect",
    b"authorization",
})


def pads_error_pages(user_agent: bytes) -> bool:
    """Whether nginx pads error pages for this User-Agent (its MSIE / Chrome test)."""
    msie = user_agent.find(b"MSIE ")
    if msie >= 0 and msie + 7 < len(user_agent) and b"Opera" not in user_agent:
        return True
    return (b"Opera" not in user_agent and b"Gecko/" not in user_agent
            and b"Chrome/" in user_agent)


# -- dates --------------------------------------------------------------------------------------


def http_date(ts: float) -> bytes:
    """``ts`` as nginx writes it in Date and Last-Modified (RFC 1123, GMT)."""
    return formatdate(ts, usegmt=True).encode("ascii")


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def parse_http_time(value: bytes) -> int | None:
    """Parse an HTTP date the way nginx's ``ngx_parse_http_time`` does; None on error.

    Accepts RFC 1123, RFC 850 and asctime forms and ignores anything after the seconds (or
    the asctime year), as nginx does.
    """
    v = value + b"\0" * 32  # nginx reads past the end into the NUL-terminated buffer

    def at(i: int) -> int:
        return v[i]

    def digit(i: int) -> bool:
        return 0x30 <= v[i] <= 0x39

    end = len(value)
    isoc = False
    p = 0
    while p < end:
        if at(p) == 0x2C:
            break
        if at(p) == 0x20:
            isoc = True
            break
        p += 1
    p += 1
    while p < end and at(p) == 0x20:
        p += 1
    if end - p < 18:
        return None
    fmt = "isoc" if isoc else ""
    day = 32
    year = 2038
    if not isoc:
        if not (digit(p) and digit(p + 1)):
            return None
        day = (at(p) - 0x30) * 10 + at(p + 1) - 0x30
        p += 2
        if at(p) == 0x20:
            if end - p < 18:
                return None
            fmt = "rfc822"
        elif at(p) == 0x2D:
            fmt = "rfc850"
        else:
            return None
        p += 1
    c0, c1, c2 = at(p), at(p + 1), at(p + 2)
    if c0 == ord("J"):
        month = 0 if c1 == ord("a") else (5 if c2 == ord("n") else 6)
    elif c0 == ord("F"):
        month = 1
    elif c0 == ord("M"):
        month = 2 if c2 == ord("r") else 4
    elif c0 == ord("A"):
        month = 3 if c1 == ord("p") else 7
    elif c0 == ord("S"):
        month = 8
    elif c0 == ord("O"):
        month = 9
    elif c0 == ord("N"):
        month = 10
    elif c0 == ord("D"):
        month = 11
    else:
        return None
    p += 3
    if (fmt == "rfc822" and at(p) != 0x20) or (fmt == "rfc850" and at(p) != 0x2D):
        return None
    p += 1
    if fmt == "rfc822":
        if not all(digit(p + k) for k in range(4)):
            return None
        year = int(v[p:p + 4])
        p += 4
    elif fmt == "rfc850":
        if not (digit(p) and digit(p + 1)):
            return None
        year = int(v[p:p + 2])
        year += 2000 if year < 70 else 1900
        p += 2
    if fmt == "isoc":
        if at(p) == 0x20:
            p += 1
        if not digit(p):
            return None
        day = at(p) - 0x30
        p += 1
        if at(p) != 0x20:
            if not digit(p):
                return None
            day = day * 10 + at(p) - 0x30
            p += 1
        if end - p < 14:
            return None
    if at(p) != 0x20:
        return None
    p += 1
    fields: list[int] = []
    for k in range(3):
        if not (digit(p) and digit(p + 1)):
            return None
        fields.append((at(p) - 0x30) * 10 + at(p + 1) - 0x30)
        p += 2
        if k < 2:
            if at(p) != 0x3A:
                return None
            p += 1
    hour, minute, sec = fields
    if fmt == "isoc":
        if at(p) != 0x20:
            return None
        p += 1
        if not all(digit(p + k) for k in range(4)):
            return None
        year = int(v[p:p + 4])
    if hour > 23 or minute > 59 or sec > 60:
        return None
    if day == 29 and month == 1:
        if (year & 3) or (year % 100 == 0 and year % 400 != 0):
            return None
    elif day > _MONTH_DAYS[month]:
        return None
    month -= 1
    if month <= 0:
        month += 12
        year -= 1
    days = (365 * year + year // 4 - year // 100 + year // 400 + 367 * month // 12 - 30 + day - 1
            - 719527 + 31 + 28)
    return days * 86400 + hour * 3600 + minute * 60 + sec

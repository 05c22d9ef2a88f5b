"""nginx's normalisation of a request's Host and path, shared by HTTP/1.1 and HTTP/2."""

from __future__ import annotations

from veil.cover.nginx import DIGITS, USUAL

__all__ = ["parse_complex_uri", "validate_host"]


def validate_host(host: bytes) -> bytes | None:
    """ngx_http_validate_host: the lower-cased host without port, or None if invalid."""
    dot_pos = len(host)
    host_len = len(host)
    state = 0  # 0 usual, 1 literal, 2 rest
    for i, ch in enumerate(host):
        if ch == 0x2E:
            if dot_pos == i - 1:
                return None
            dot_pos = i
        elif ch == 0x3A:
            if state == 0:
                host_len = i
                state = 2
        elif ch == 0x5B:
            if i == 0:
                state = 1
        elif ch == 0x5D:
            if state == 1:
                host_len = i + 1
                state = 2
        elif ch == 0x2F or ch <= 0x20 or ch == 0x7F:
            return None
    if dot_pos == host_len - 1:
        host_len -= 1
    if host_len <= 0:
        return None
    return host[:host_len].lower()


def parse_complex_uri(raw: bytes, *, empty_path: bool = False) -> bytes | None:
    """ngx_http_parse_complex_uri with merge_slashes on: the decoded path, or None (400)."""
    usual, slash, dot, dot_dot, quoted, quoted_second = range(6)
    u = bytearray(b"/" if empty_path else b"")
    state = usual
    quoted_state = usual
    decoded = 0
    n = len(raw)
    p = 0
    ch = raw[0] if n else 0
    p = 1

    def next_ch() -> int:
        nonlocal p
        c = raw[p] if p < n else 0x20
        p += 1
        return c

    def go_up() -> bool:
        # u -= 4 then back to the previous slash: remove "/seg/.." from the output.
        k = len(u) - 4
        while True:
            if k < 0:
                return False
            if u[k] == 0x2F:
                del u[k + 1:]
                return True
            k -= 1

    while p <= n:
        if state == usual:
            if ch in USUAL:
                u.append(ch)
                ch = next_ch()
                continue
            if ch == 0x2F:
                state = slash
                u.append(ch)
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            elif ch in (0x3F, 0x23):
                return bytes(u)
            else:
                u.append(ch)
            ch = next_ch()
        elif state == slash:
            if ch in USUAL:
                state = usual
                u.append(ch)
                ch = next_ch()
                continue
            if ch == 0x2F:
                pass
            elif ch == 0x2E:
                state = dot
                u.append(ch)
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            elif ch in (0x3F, 0x23):
                return bytes(u)
            else:
                state = usual
                u.append(ch)
            ch = next_ch()
        elif state == dot:
            if ch in USUAL:
                state = usual
                u.append(ch)
                ch = next_ch()
                continue
            if ch == 0x2F:
                state = slash
                u.pop()
            elif ch == 0x2E:
                state = dot_dot
                u.append(ch)
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            elif ch in (0x3F, 0x23):
                u.pop()
                return bytes(u)
            else:
                state = usual
                u.append(ch)
            ch = next_ch()
        elif state == dot_dot:
            if ch in USUAL:
                state = usual
                u.append(ch)
                ch = next_ch()
                continue
            if ch in (0x2F, 0x3F, 0x23):
                if not go_up():
                    return None
                if ch != 0x2F:
                    return bytes(u)
                state = slash
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            else:
                state = usual
                u.append(ch)
            ch = next_ch()
        elif state == quoted:
            if ch in DIGITS:
                decoded = ch - 0x30
            elif 0x61 <= (ch | 0x20) <= 0x66:
                decoded = (ch | 0x20) - 0x61 + 10
            else:
                return None
            state = quoted_second
            ch = next_ch()
        else:  # quoted_second
            if ch in DIGITS:
                ch = (decoded << 4) + ch - 0x30
                if ch in (0x25, 0x23):
                    state = usual
                    u.append(ch)
                    ch = next_ch()
                    continue
                if ch == 0:
                    return None
                state = quoted_state
                continue
            if 0x61 <= (ch | 0x20) <= 0x66:
                ch = (decoded << 4) + (ch | 0x20) - 0x61 + 10
                if ch == 0x3F:
                    state = usual
                    u.append(ch)
                    ch = next_ch()
                    continue
                state = quoted_state
                continue
            return None
    if state in (quoted, quoted_second):
        return None
    if state == dot:
        u.pop()
    elif state == dot_dot and not go_up():
        return None
    return bytes(u)

"""The random host names Tor puts in its TLS handshakes, and a test for "random-looking".

tor's ``tortls.c`` gives every client connection the SNI ``www.<4-25 base32 chars>.com``
(``crypto_random_hostname(4, 25, "www.", ".com")``), and relays' link certificates name
random ``www.<8-20 chars>.net`` / ``.com`` hosts for subject and issuer alike.
"""

from __future__ import annotations

import re

TOR_SNI = re.compile(r"www\.([a-z2-7]{4,25})\.com")
TOR_CERT_NAME = re.compile(r"www\.([a-z2-7]{8,20})\.(net|com)")
VOWELS = set("aeiou")


def random_label(label: str) -> bool:
    """Does a host label look like base32 noise rather than a word a person chose?"""
    if any(c.isdigit() for c in label):
        return True
    longest = run = 0
    for c in label:
        run = 0 if c in VOWELS else run + 1
        longest = max(longest, run)
    vowel_share = sum(c in VOWELS for c in label) / len(label)
    return longest >= 5 or (len(label) >= 6 and vowel_share < 0.2)


def tor_certificate_names(subject_cn: str | None, issuer_cn: str | None) -> list[str]:
    """Evidence that a certificate is a Tor link certificate (used with any visible cert)."""
    if not subject_cn or not issuer_cn or subject_cn == issuer_cn:
        return []
    s, i = TOR_CERT_NAME.fullmatch(subject_cn), TOR_CERT_NAME.fullmatch(issuer_cn)
    if s and i and random_label(s.group(1)) and random_label(i.group(1)):
        return [f"tor: certificate {subject_cn!r} issued by {issuer_cn!r}, both random "
                "www.<base32>.net|com names"]
    return []

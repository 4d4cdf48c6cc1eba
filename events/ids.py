"""Identifiers: time-ordered, URL- and subject-safe, 26 characters (ULID layout).

Time-ordered ids keep Postgres indexes append-mostly and make logs readable.
Only the shells call `new_id`; the pure cores receive it as an argument.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


def _base32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def new_id() -> str:
    millis = time.time_ns() // 1_000_000
    return _base32(millis, 10) + _base32(int.from_bytes(os.urandom(10), "big"), 16)

"""Identifiers: time-ordered, URL- and subject-safe, 26 characters (ULID layout).

Time-ordered ids keep Postgres indexes append-mostly and make logs readable.
Only the shells call `new_id`; the pure cores receive it as an argument.

An id is 48 bits of milliseconds and 80 random bits, written as 26 Crockford
base32 digits (130 bits, the first two always zero). Every chunk of a stream
takes one, so it is written ten bits (two digits) at a time from a table:
py-spy put the digit-at-a-time loop at 3% of a worker's time under
`parley bench capacity`.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_PAIRS = [first + second for first in _ALPHABET for second in _ALPHABET]
_SHIFTS = tuple(range(120, -1, -10))  # 13 pairs of digits, most significant first


def encode_id(millis: int, randomness: int) -> str:
    """The id of `millis` (48 bits) and `randomness` (80 bits)."""
    value = (millis << 80) | randomness
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def new_id() -> str:
    return encode_id(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10), "big"))

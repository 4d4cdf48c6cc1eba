"""Identifiers: time-ordered, URL- and subject-safe, 26 characters (ULID layout).

Time-ordered ids keep Postgres indexes append-mostly and make logs readable.
Only the shells call `new_id`; the pure cores receive it as an argument.

An id is 48 bits of milliseconds and 80 random bits, written as 26 Crockford
base32 digits (130 bits, the first two always zero). Every chunk of a stream
takes one, so it is written ten bits (two digits) at a time from a table:
py-spy put the digit-at-a-time loop at 3% of a worker's time under
`parley bench capacity`. Its random bits come from the kernel 4 KiB at a
time: one `os.urandom(10)` per id was a getrandom() system call per chunk,
2.6% of a loaded worker's time (py-spy with native frames).
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_PAIRS = [first + second for first in _ALPHABET for second in _ALPHABET]
_SHIFTS = tuple(range(120, -1, -10))  # 13 pairs of digits, most significant first


def encode_id(millis: int, randomness: int) -> str:
    """The id of `millis` (48 bits) and `randomness` (80 bits)."""
    value = (millis << 80) | randomness
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


_RANDOM_BYTES = 4096  # 409 ids per read from the kernel


class _Randomness(threading.local):
    """Each thread's own supply of kernel randomness, so that no two ids take the
    same bytes; emptied in a forked child, which must not reuse its parent's."""

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0

    def take(self) -> int:
        at = self.at
        if at + 10 > len(self.pool):
            self.pool, at = os.urandom(_RANDOM_BYTES), 0
        self.at = at + 10
        return int.from_bytes(self.pool[at : at + 10], "big")


_randomness = _Randomness()


def _forget_randomness() -> None:
    _randomness.pool, _randomness.at = b"", 0


os.register_at_fork(after_in_child=_forget_randomness)


def new_id() -> str:
    return encode_id(time.time_ns() // 1_000_000, _randomness.take())

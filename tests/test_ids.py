"""Ids: the ULID layout, written digit by digit here to check the table-driven encoder."""

from __future__ import annotations

import os
import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from events.ids import encode_id, new_id

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def reference(value: int, length: int) -> str:
    digits = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


@given(st.integers(0, 2**48 - 1), st.integers(0, 2**80 - 1))
def test_an_id_is_ten_digits_of_time_then_sixteen_of_randomness(millis: int, rand: int) -> None:
    assert encode_id(millis, rand) == reference(millis, 10) + reference(rand, 16)


def test_new_ids_carry_the_time_sort_by_it_and_do_not_repeat() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert all(len(i) == 26 and set(i) <= set(ALPHABET) for i in ids)
    decoded = [_millis(i) for i in ids]
    assert all(before <= m <= after for m in decoded)
    assert decoded == sorted(decoded)
    assert len(set(ids)) == len(ids)


def test_threads_making_ids_at_once_never_share_random_bits() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(new_id() for _ in range(3000))  # several reads from the kernel each

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    random_parts = [i[10:] for ids in made for i in ids]
    assert len(set(random_parts)) == len(random_parts) == 12_000


def test_a_forked_child_does_not_reuse_its_parents_random_bits() -> None:
    new_id()  # the parent holds randomness not yet used
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.write(write_end, new_id().encode())
        finally:
            os._exit(0)  # never back into pytest
    os.close(write_end)
    in_parent = new_id()
    in_child = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(child, 0)
    assert len(in_child) == 26
    assert in_child[10:] != in_parent[10:]


def _millis(identifier: str) -> int:
    value = 0
    for char in identifier[:10]:
        value = value * 32 + ALPHABET.index(char)
    return value

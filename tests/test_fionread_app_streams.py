"""The byte checks of helpers/fionread_app.py can fail: a reader checking the
self-naming stream ("offsets", used by tests/test_big_transfer_e2e.py) counts
swapped, lost and displaced blocks, including a displacement the plain
pattern cannot see (a multiple of its period)."""

from __future__ import annotations

import socket
import threading

import pytest

from helpers import fionread_app as app

N = 1 << 20


def offsets(offset: int, n: int) -> bytes:
    return app.offset_stream(offset, n)


def read_back(data: bytes, n: int, stream) -> dict:
    """`data` sent through a socket pair, read by the app's CheckedReader expecting `n` bytes of `stream`."""
    left, right = socket.socketpair()
    sender = threading.Thread(target=lambda: (left.sendall(data), left.close()))
    sender.start()
    try:
        reader = app.CheckedReader(right, stream)
        reader.payload(n)
        return reader.counts()
    finally:
        sender.join()
        right.close()


@pytest.mark.parametrize("offset,n", [(0, 1), (5, 100), (4090, 20), (12345, 70000), (3 * 4096, 4096),
                                      (app._BLOCK_LEN - 3, 9000)])
def test_any_slice_is_the_same_stream(offset, n):
    whole = offsets(0, 2 * app._BLOCK_LEN)
    assert offsets(offset, n) == whole[offset:offset + n]


def test_every_block_names_its_offset():
    whole = offsets(0, N)
    starts = [int.from_bytes(whole[b:b + 8], "big") for b in range(0, N, app.OFFSET_BLOCK)]
    assert starts == list(range(0, N, app.OFFSET_BLOCK))


def test_the_intact_stream_reads_clean():
    counts = read_back(offsets(0, N), N, offsets)
    assert counts["bytes"] == N and counts["corrupt_chunks"] == 0 and counts["first_corrupt_offset"] is None


def test_two_swapped_blocks_are_caught_where_they_are():
    block = app.OFFSET_BLOCK
    at = 100 * block
    data = offsets(0, N)
    swapped = data[:at] + data[at + block:at + 2 * block] + data[at:at + block] + data[at + 2 * block:]
    counts = read_back(swapped, N, offsets)
    assert counts["bytes"] == N and counts["corrupt_chunks"] >= 1
    assert counts["first_corrupt_offset"] <= at < counts["first_corrupt_offset"] + app.CHUNK


def test_a_lost_block_is_caught():
    block = app.OFFSET_BLOCK
    data = offsets(0, N + block)
    counts = read_back(data[:block] + data[2 * block:], N, offsets)
    assert counts["corrupt_chunks"] >= 1 and counts["first_corrupt_offset"] == 0


def test_a_displacement_by_the_patterns_period_is_caught_only_by_the_offsets():
    shift = app._BLOCK_LEN * app.OFFSET_BLOCK    # a whole number of pattern periods and of blocks
    # the plain pattern repeats itself: this displacement is invisible to it
    assert read_back(app.pattern(app._BLOCK_LEN, N), N, app.pattern)["corrupt_chunks"] == 0
    counts = read_back(offsets(shift, N), N, offsets)
    # every chunk holding a block's first bytes differs: at least one per CHUNK bytes (how many chunks
    # there are depends on how recv() split the bytes)
    assert counts["corrupt_chunks"] >= N // app.CHUNK and counts["first_corrupt_offset"] == 0, counts

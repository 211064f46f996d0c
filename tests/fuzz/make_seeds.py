#!/usr/bin/env python3
"""Writes the seed inputs of fuzz_frame.c into tests/fuzz/corpus/.

Each seed is a script for the in-process root (op codes in fuzz_frame.c);
the whole input is also fed to the pure decoders.
"""
import os
import struct

OPEN, RAW, HELLO, DATA, CLOSE, FLUSH, TICK, SWEEP = range(8)


def header(ftype, rank, length, magic=0x42585045, version=2):
    return struct.pack("<IHHII", magic, version, ftype, rank, length)


def raw(idx, payload):
    assert len(payload) < 256
    return bytes([RAW, idx, len(payload)]) + payload


def hello(idx, rank, nranks, timeout_units):
    return bytes([HELLO, idx, rank, nranks, timeout_units])


# op 3's mode byte: the fuzzer seals the DATA frame with the connection's
# session key and next sequence number, then spoils it on request
VALID, FLIPPED, REPLAYED, REFLECTED = range(4)


def data(idx, payload, mode=VALID):
    return bytes([DATA, idx, mode, len(payload)]) + payload


SEEDS = {
    # two ranks meet, gather twice (once empty), then leave
    "two_ranks_round": bytes([OPEN, OPEN]) + hello(0, 0, 2, 50) + hello(1, 1, 2, 50)
    + bytes([FLUSH, 0, FLUSH, 1]) + data(0, b"abcd") + data(1, b"efgh") + data(0, b"")
    + data(1, b"") + bytes([CLOSE, 0, CLOSE, 1, SWEEP]),
    # a HELLO header announcing 2 GB
    "huge_length": bytes([OPEN]) + raw(0, header(2, 0, 0x80000000)) + bytes([TICK, 1, SWEEP]),
    # an HTTP request instead of a frame
    "http_get": bytes([OPEN]) + raw(0, b"GET / HTTP/1.1\r\nHost: epx\r\n\r\n") + bytes([SWEEP]),
    # one of three ranks arrives; its deadline passes
    "rank_timeout": bytes([OPEN, OPEN]) + hello(0, 0, 3, 5) + bytes([TICK, 200, FLUSH, 0, SWEEP]),
    # duplicate rank, wrong rank count, rank out of range, then data before READY
    "refusals": bytes([OPEN, OPEN, OPEN, OPEN]) + hello(0, 1, 3, 100) + hello(1, 1, 3, 100)
    + hello(2, 0, 4, 100) + hello(3, 5, 3, 100) + data(0, b"x") + bytes([SWEEP]),
    # sizes differ within a round; a rank leaves mid-round
    "mismatch_and_leave": bytes([OPEN, OPEN, OPEN]) + hello(0, 0, 3, 100) + hello(1, 1, 3, 100)
    + hello(2, 2, 3, 100) + data(0, b"aa") + data(1, b"bbb") + bytes([CLOSE, 2, TICK, 30, SWEEP]),
    # an altered DATA frame after a good round (authentication fails the rendezvous)
    "flipped_data": bytes([OPEN, OPEN]) + hello(0, 0, 2, 50) + hello(1, 1, 2, 50)
    + data(0, b"ab") + data(1, b"cd") + data(0, b"xy", FLIPPED) + bytes([FLUSH, 1, SWEEP]),
    # a DATA frame replayed (its sequence number already used), one sealed for the other direction
    "replayed_data": bytes([OPEN, OPEN, OPEN]) + hello(0, 0, 2, 50) + hello(1, 1, 2, 50)
    + data(0, b"ab") + data(1, b"cd") + data(0, b"ab", REPLAYED) + hello(2, 0, 2, 50)
    + data(1, b"", REFLECTED) + bytes([TICK, 30, SWEEP]),
    # a frame of protocol version 1 (no MAC trailers) where a HELLO is expected
    "version_1_hello": bytes([OPEN]) + raw(0, header(2, 0, 56, version=1)) + bytes([SWEEP]),
    # a header split over two reads, wrong version
    "split_bad_version": bytes([OPEN]) + raw(0, header(2, 0, 56, version=9)[:7])
    + raw(0, header(2, 0, 56, version=9)[7:]) + bytes([SWEEP]),
}


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out, exist_ok=True)
    for name, blob in SEEDS.items():
        with open(os.path.join(out, name + ".bin"), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    main()

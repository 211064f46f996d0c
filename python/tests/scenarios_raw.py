"""Scenarios for a world without torch (mpworld "raw" mode): epx._comm over
ctypes arrays, checked against the C reference."""

import ctypes
import os
import random
import struct

import epx._lib as L
from epx._comm import Communicator, get_unique_id
from epx_ref import Reference

TIMEOUT_MS = 30000


def bf16_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0] >> 16


def draw(seed, r, T, H, K, E):
    rnd = random.Random(seed * 7919 + r)
    topk = (ctypes.c_int64 * max(1, T * K))()
    for t in range(T):
        ids = rnd.sample(range(E), K)
        for k in range(K):
            topk[t * K + k] = -1 if rnd.random() < 0.1 else ids[k]
    w = (ctypes.c_float * max(1, T * K))(*[rnd.random() for _ in range(T * K)])
    x = (ctypes.c_uint16 * max(8, T * H))(*[bf16_bits(rnd.uniform(-4, 4)) for _ in range(T * H)])
    return {"T": T, "topk": topk, "w": w, "x": x}


def addr(a):
    return ctypes.addressof(a)


def make_comm(ctx, E, H, K, use_unique_id=False):
    cfg = L.default_config(backend=L.BACKEND_HOST, num_experts=E, hidden=H, max_topk=K,
                           max_tokens_per_rank=64, ll_max_tokens_per_rank=0,
                           timeout_ms=TIMEOUT_MS)
    if use_unique_id:
        uid = get_unique_id() if ctx.rank == 0 else b"\0" * L.UNIQUE_ID_BYTES
        uid = ctx.allgather(uid)[0]  # hand rank 0's id to everyone
        return Communicator.init_with_unique_id(ctx.rank, ctx.nranks, uid, cfg)
    return Communicator.init_with_allgather(ctx.rank, ctx.nranks, ctx.allgather, cfg)


def dispatch_combine(ctx, seed=1, H=64, K=2, use_unique_id=False):
    R, me = ctx.nranks, ctx.rank
    E = 2 * R
    Ts = [(seed * 13 + r * 7) % 24 + 1 for r in range(R)]
    ins = [draw(seed, r, Ts[r], H, K, E) for r in range(R)]
    rf = Reference(os.environ["EPX_TEST_REFERENCE"])
    w = Reference.world(R, 0, E, H, K, True,
                        [(d["T"], addr(d["topk"]), addr(d["w"]), addr(d["x"]), None) for d in ins])
    comm = make_comm(ctx, E, H, K, use_unique_id)
    try:
        assert comm.info.nranks == R and comm.info.backend == L.BACKEND_HOST
        mine = ins[me]
        T = mine["T"]
        args = L.DispatchArgs(addr(mine["x"]), L.BFLOAT16, None, L.SCALES_NONE, addr(mine["topk"]),
                              L.INT64, addr(mine["w"]), T, H, K, 1, 0)
        h = comm.new_handle()
        per_expert = (ctypes.c_int * (E // R))()
        n = comm.dispatch_notify(args, h, addr(per_expert))
        rows = max(n, 1)
        recv_x = (ctypes.c_uint16 * (rows * H))()
        recv_w = (ctypes.c_float * (rows * K))()
        outs = L.DispatchOutputs(addr(recv_x), None, None, addr(recv_w), None, None, None, None, n)
        comm.dispatch(args, h, outs)
        rds = [rf.dispatch(w, r, L.BFLOAT16, L.SCALES_NONE, 1, 0) for r in range(R)]
        try:
            assert n == rds[me].num_recv
            assert bytes(recv_x)[:n * H * 2] == ctypes.string_at(rds[me].recv_x, n * H * 2)
            assert list(per_expert) == list((ctypes.c_int * (E // R)).from_address(
                rds[me].num_recv_tokens_per_expert))
            info = h.info()
            assert info.state == L.HANDLE_NORMAL and info.num_recv_tokens == n
            out = (ctypes.c_uint16 * max(8, T * H))()
            comm.combine(L.CombineArgs(addr(recv_x), None, (ctypes.c_void_p * 2)(), H, K), h,
                         L.CombineOutputs(addr(out), None))
            ref_out = (ctypes.c_uint16 * max(8, T * H))()
            rf.combine(w, me, [r.recv_x for r in rds], None, None, None, addr(ref_out), None)
            assert bytes(out) == bytes(ref_out)
        finally:
            for r in rds:
                rf.dispatch_free(r)
        # A bad argument on the last rank: it gets epxInvalidArgument with the
        # library's message, every other rank epxRemoteError.
        bad = L.DispatchArgs(addr(mine["x"]), L.BFLOAT16, None, L.SCALES_NONE,
                             addr(mine["topk"]), L.INT64, None, T, H,
                             K + 100 if me == R - 1 else K, 1, 0)
        try:
            comm.dispatch_notify(bad, comm.new_handle())
            raise AssertionError("invalid top-k accepted")
        except L.EpxError as e:
            expect = L.INVALID_ARGUMENT if me == R - 1 else L.REMOTE_ERROR
            assert e.code == expect and e.message, e
    finally:
        comm.destroy()
    try:
        comm.new_handle()
        raise AssertionError("use after destroy accepted")
    except L.EpxError as e:
        assert e.code == L.INVALID_USAGE

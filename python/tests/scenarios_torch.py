"""Scenarios run by every rank of a torch world (see mpworld.py).

Every rank draws the inputs of EVERY rank from the same seeds, runs epx on
its own, and checks each output against the C reference computed from all
ranks' inputs, bit for bit.
"""

import ctypes
import os

import torch

import epx
import epx._lib as L
from epx_ref import Reference
from mpworld import Skip

FP8 = torch.float8_e4m3fn
TIMEOUT_MS = 30000
_ref = None


def ref():
    global _ref
    if _ref is None:
        _ref = Reference(os.environ["EPX_TEST_REFERENCE"])
    return _ref


# ------------------------------------------------------------------ inputs


def draw_rank(seed, r, T, H, K, E, fp8=None, idx_dtype=torch.int64, weights=True):
    """Rank r's inputs on the CPU. fp8: None, 'f32' or 'ue8m0'."""
    g = torch.Generator().manual_seed(seed * 7919 + r)
    scores = torch.rand((T, E), generator=g)
    topk = scores.topk(K, dim=1).indices
    drop = torch.rand((T, K), generator=g) < 0.1
    topk = torch.where(drop, torch.full_like(topk, -1), topk).to(idx_dtype).contiguous()
    d = {"T": T, "topk_idx": topk}
    d["topk_weights"] = torch.rand((T, K), generator=g) if weights else None
    if fp8 is None:
        d["x"] = torch.randn((T, H), generator=g).to(torch.bfloat16)
        d["x_scales"] = None
    else:
        d["x"] = (torch.randn((T, H), generator=g) * 8).to(FP8)
        if fp8 == "f32":
            d["x_scales"] = torch.rand((T, H // 128), generator=g) + 0.5
        else:
            cols = (H // 128 + 3) // 4
            d["x_scales"] = torch.randint(0, 2 ** 31 - 1, (T, cols), generator=g,
                                          dtype=torch.int32)
    d["bias"] = [torch.randn((T, H), generator=g).to(torch.bfloat16) for _ in range(2)]
    return d


def draw_world(seed, R, Ts, H, K, E, **kw):
    return [draw_rank(seed, r, Ts[r], H, K, E, **kw) for r in range(R)]


def addr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def ref_world(inputs, R, rpn, E, H, K):
    return Reference.world(R, rpn, E, H, K, inputs[0]["topk_idx"].dtype == torch.int64,
                           [(d["T"], addr(d["topk_idx"]), addr(d["topk_weights"]), addr(d["x"]),
                             addr(d["x_scales"])) for d in inputs])


def from_addr(address, shape, dtype):
    """A CPU copy of `shape` elements of `dtype` at a C address."""
    n = 1
    for s in shape:
        n *= s
    if n == 0 or not address:
        return torch.empty(shape, dtype=dtype)
        # (zero rows)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = (ctypes.c_char * nbytes).from_address(address)
    return torch.frombuffer(bytearray(buf), dtype=dtype).view(shape).clone()


def same(a, b, what):
    """Bitwise equality (NaN-safe), with a short diff on failure."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != reference {b.dtype}"
    if a.numel() == 0:
        return
    ia = a.contiguous().view(torch.uint8) if a.element_size() == 1 else \
        a.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
    ib = b.contiguous().view(ia.dtype)
    if not torch.equal(ia, ib):
        bad = (ia != ib).nonzero()
        raise AssertionError(f"{what}: {bad.size(0)} elements differ, first at "
                             f"{bad[0].tolist()}: {a[tuple(bad[0])]} vs {b[tuple(bad[0])]}")


def dev(ctx):
    return torch.device("cuda", torch.cuda.current_device()) if ctx.device == "cuda" \
        else torch.device("cpu")


def to(d, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else
                [b.to(device) for b in v] if isinstance(v, list) else v) for k, v in d.items()}


# --------------------------------------------------------------- scenarios


def token_counts(R, T, seed):
    g = torch.Generator().manual_seed(seed)
    Ts = [int(v) for v in torch.randint(T // 2, T + 1, (R,), generator=g)]
    if R > 1:
        Ts[1] = 0  # one rank sends nothing
    return Ts


def normal_roundtrip(ctx, seed=1, T=64, H=256, K=4, E_per_rank=4, fp8=None,
                     idx_dtype="int64", alignment=1, worst=False, ranks_per_node=None,
                     async_finish=False, weights=True):
    """layout -> dispatch -> cached dispatch -> combine, all checked against the reference."""
    R, me, device = ctx.nranks, ctx.rank, dev(ctx)
    E = E_per_rank * R
    idx_dtype = getattr(torch, idx_dtype)
    Ts = token_counts(R, T, seed)
    inputs = draw_world(seed, R, Ts, H, K, E, fp8=fp8, idx_dtype=idx_dtype, weights=weights)
    mine = to(inputs[me], device)
    rpn_ref = ranks_per_node or R
    buf = epx.Buffer(ctx.group, int(1e9), 0, explicitly_destroy=True,
                     ranks_per_node=ranks_per_node, timeout_ms=TIMEOUT_MS)
    rf = ref()
    w = ref_world(inputs, R, rpn_ref if ranks_per_node else 0, E, H, K)
    try:
        # ---- layout
        per_rank, per_node, per_expert, in_rank, ev = buf.get_dispatch_layout(
            mine["topk_idx"], E, async_finish=async_finish)
        if async_finish:
            ev.current_stream_wait()
        nodes = R // rpn_ref
        r_rank = torch.empty(R, dtype=torch.int32)
        r_node = torch.empty(nodes, dtype=torch.int32)
        r_exp = torch.empty(E, dtype=torch.int32)
        r_in = torch.empty((Ts[me], R), dtype=torch.bool)
        rf.layout(w, me, addr(r_rank), addr(r_node), addr(r_exp), addr(r_in))
        same(per_rank, r_rank, "num_tokens_per_rank")
        same(per_expert, r_exp, "num_tokens_per_expert")
        same(in_rank, r_in, "is_token_in_rank")
        if nodes > 1:
            same(per_node, r_node, "num_tokens_per_rdma_rank")
        else:
            assert per_node is None

        # ---- dispatch
        x = (mine["x"], mine["x_scales"]) if fp8 else mine["x"]
        num_worst = R * T if worst else 0
        recv, r_idx, r_w, counts, handle, ev = buf.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=mine["topk_idx"], topk_weights=mine["topk_weights"],
            expert_alignment=alignment, num_worst_tokens=num_worst, async_finish=async_finish)
        if async_finish:
            ev.current_stream_wait()
        x_type = L.FLOAT8_E4M3 if fp8 else L.BFLOAT16
        fmt = {None: L.SCALES_NONE, "f32": L.SCALES_FLOAT32, "ue8m0": L.SCALES_UE8M0}[fp8]
        rd = [rf.dispatch(w, r, x_type, fmt, alignment, num_worst) for r in range(R)]
        try:
            mr = rd[me]
            N, rows = mr.num_recv, mr.rows
            recv_x, recv_s = recv if fp8 else (recv, None)
            assert recv_x.shape == (rows, H) and recv_x.dtype == mine["x"].dtype
            # recv_x is only defined in the first N rows (padding rows untouched).
            same(recv_x[:N], from_addr(mr.recv_x, (rows, H), recv_x.dtype)[:N], "recv_x")
            if fp8:
                cols = mine["x_scales"].size(1)
                same(recv_s[:N], from_addr(mr.recv_x_scales, (rows, cols), recv_s.dtype)[:N],
                     "recv_x_scales")
            same(r_idx, from_addr(mr.recv_topk_idx, (rows, K), idx_dtype), "recv_topk_idx")
            if weights:
                same(r_w, from_addr(mr.recv_topk_weights, (rows, K), torch.float32),
                     "recv_topk_weights")
            else:
                assert r_w is None
            same(handle[3], from_addr(mr.recv_src_idx, (rows,), torch.int32), "recv_src_idx")
            same(handle.recv_rank_prefix, from_addr(mr.recv_rank_prefix, (R,), torch.int32),
                 "recv_rank_prefix")
            E_local = E // R
            ref_counts = from_addr(mr.num_recv_tokens_per_expert, (E_local,), torch.int32)
            if worst:
                assert counts == [], "num_worst_tokens > 0 gives an empty count list"
                same(handle.num_recv_tokens_per_expert_tensor, ref_counts, "per-expert counts")
                assert int(handle.num_recv_tokens_tensor.item()) == N
            else:
                assert counts == ref_counts.tolist(), f"counts {counts} != {ref_counts.tolist()}"
                assert handle.num_recv_tokens == N

            # ---- cached re-dispatch with the handle
            recv2, i2, w2, c2, h2, ev = buf.dispatch(x, handle=handle, async_finish=async_finish)
            if async_finish:
                ev.current_stream_wait()
            assert i2 is None and w2 is None and c2 is None and h2 is None
            rx2 = recv2[0] if fp8 else recv2
            same(rx2[:N], recv_x[:N], "cached recv_x")

            # ---- combine: every rank sends back its received rows (as BF16)
            comb_in = []
            for r in range(R):
                rr = rd[r]
                if fp8:  # combine is BF16: draw per-rank BF16 rows of the right count
                    g = torch.Generator().manual_seed(seed * 31 + r)
                    comb_in.append(torch.randn((rr.rows, H), generator=g).to(torch.bfloat16))
                else:
                    comb_in.append(from_addr(rr.recv_x, (rr.rows, H), torch.bfloat16))
            comb_w = [from_addr(rr.recv_topk_weights, (rr.rows, K), torch.float32)
                      for rr in rd] if weights else None
            my_x = comb_in[me].to(device)
            my_w = comb_w[me].to(device) if weights else None
            bias = (mine["bias"][0], mine["bias"][1])
            out, out_w, ev = buf.combine(my_x, handle, topk_weights=my_w, bias=bias,
                                         async_finish=async_finish)
            if async_finish:
                ev.current_stream_wait()
            ref_out = torch.empty((Ts[me], H), dtype=torch.bfloat16)
            ref_w = torch.empty((Ts[me], K), dtype=torch.float32)
            rf.combine(w, me, [addr(t) for t in comb_in],
                       [addr(t) for t in comb_w] if weights else None,
                       addr(inputs[me]["bias"][0]), addr(inputs[me]["bias"][1]),
                       addr(ref_out), addr(ref_w) if weights else None)
            same(out, ref_out, "combined_x")
            if weights:
                same(out_w, ref_w, "combined_topk_weights")
            else:
                assert out_w is None
            # one bias as a bare tensor, none at all
            out1, _, _ = buf.combine(my_x, handle, bias=mine["bias"][0])
            ref1 = torch.empty((Ts[me], H), dtype=torch.bfloat16)
            rf.combine(w, me, [addr(t) for t in comb_in], None, addr(inputs[me]["bias"][0]), None,
                       addr(ref1), None)
            same(out1, ref1, "combined_x (one bias)")
        finally:
            for r in rd:
                rf.dispatch_free(r)
    finally:
        buf.destroy()


def low_latency_roundtrip(ctx, seed=3, maxT=16, H=256, K=4, E_per_rank=2, use_fp8=True,
                          round_scale=False, use_ue8m0=False, hook=False, zero_copy=False,
                          use_out=False, idx_dtype="int64", sized_in_constructor=False):
    R, me, device = ctx.nranks, ctx.rank, dev(ctx)
    E, E_local = E_per_rank * R, E_per_rank
    idx_dtype = getattr(torch, idx_dtype)
    Ts = token_counts(R, maxT, seed)
    inputs = draw_world(seed, R, Ts, H, K, E, idx_dtype=idx_dtype)
    mine = to(inputs[me], device)
    kw = dict(num_experts=E, hidden=H, num_topk=K, num_max_dispatch_tokens_per_rank=maxT,
              device=device) if sized_in_constructor else {}
    buf = epx.Buffer(ctx.group, 0, int(1e9), low_latency_mode=True, explicitly_destroy=True,
                     timeout_ms=TIMEOUT_MS, **kw)
    rf = ref()
    w = ref_world(inputs, R, 0, E, H, K)
    rl = rf.ll_dispatch(w, me, maxT, use_fp8, round_scale, use_ue8m0)
    try:
        buf.clean_low_latency_buffer(maxT, H, E)
        stats = torch.zeros(E_local, dtype=torch.int32, device=device) + 5
        try:
            recv, count, handle, ev, hk = buf.low_latency_dispatch(
                mine["x"], mine["topk_idx"], maxT, E, cumulative_local_expert_recv_stats=stats,
                use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                return_recv_hook=hook)
        except epx.EpxNotSupportedError as e:
            raise Skip(f"this build cannot serve it: {e}")
        if hook:
            assert callable(hk)
            hk()
        else:
            assert hk is None
        rows = R * maxT
        ref_count = from_addr(rl.recv_count, (E_local,), torch.int32)
        same(count, ref_count, "recv_count")
        same(stats, ref_count + 5, "cumulative_local_expert_recv_stats")
        recv_x, recv_s = recv if use_fp8 else (recv, None)
        assert recv_x.shape == (E_local, rows, H)
        assert recv_x.dtype == (FP8 if use_fp8 else torch.bfloat16)
        rx = from_addr(rl.recv_x, (E_local, rows, H), recv_x.dtype)
        src_info, layout_range, maxT_h, H_h, E_h = handle
        assert (maxT_h, H_h, E_h) == (maxT, H, E)
        rsi = from_addr(rl.recv_src_info, (E_local, rows), torch.int32)
        same(layout_range, from_addr(rl.recv_layout_range, (E_local, R), torch.int64),
             "recv_layout_range")
        if use_fp8:
            cols = (H // 128 + 3) // 4 if use_ue8m0 else H // 128
            sd = torch.int32 if use_ue8m0 else torch.float32
            assert recv_s.shape == (E_local, rows, cols) and recv_s.dtype == sd
            rs = from_addr(rl.recv_x_scales, (E_local, rows, cols), sd)
        for e in range(E_local):
            n = int(ref_count[e])
            same(recv_x[e, :n], rx[e, :n], f"recv_x[{e}]")
            same(src_info[e, :n], rsi[e, :n], f"recv_src_info[{e}]")
            if use_fp8:
                same(recv_s[e, :n], rs[e, :n], f"recv_x_scales[{e}]")

        # ---- combine: rank r's expert outputs are drawn from seed and r
        outs = []
        for r in range(R):
            g = torch.Generator().manual_seed(seed * 131 + r)
            outs.append(torch.randn((E_local, rows, H), generator=g).to(torch.bfloat16))
        ref_out = torch.empty((Ts[me], H), dtype=torch.bfloat16)
        rf.ll_combine(w, me, maxT, [addr(o) for o in outs], addr(inputs[me]["topk_weights"]),
                      addr(ref_out))
        x_in = outs[me].to(device)
        if zero_copy:
            zbuf = buf.get_next_low_latency_combine_buffer(handle)
            assert zbuf.shape == (E_local, rows, H) and zbuf.dtype == torch.bfloat16
            zbuf.copy_(x_in)
        out_t = torch.full((Ts[me], H), 7.0, dtype=torch.bfloat16, device=device) \
            if use_out else None
        combined, ev, hk = buf.low_latency_combine(
            x_in, mine["topk_idx"], mine["topk_weights"], handle, zero_copy=zero_copy,
            return_recv_hook=hook, out=out_t)
        if hook:
            hk()
        if use_out:
            assert combined.data_ptr() == out_t.data_ptr() or combined.numel() == 0
        same(combined, ref_out, "low-latency combined_x")
    finally:
        rf.ll_free(rl)
        buf.destroy()


def errors_become_exceptions(ctx, seed=5, T=16, H=128, K=2):
    """A bad argument on one rank: that rank raises the library's
    epxInvalidArgument message, the others epxRemoteError; the next call works."""
    R, me, device = ctx.nranks, ctx.rank, dev(ctx)
    E = 2 * R
    inputs = draw_world(seed, R, [T] * R, H, K, E)
    mine = to(inputs[me], device)
    buf = epx.Buffer(ctx.group, explicitly_destroy=True, num_experts=E, hidden=H, num_topk=K,
                     device=device, timeout_ms=TIMEOUT_MS)
    try:
        # 1. expert id out of range on the last rank: the library's own check.
        bad = mine["topk_idx"].clone()
        if me == R - 1:
            bad[0, 0] = E + 3
        try:
            buf.dispatch(mine["x"], topk_idx=bad, topk_weights=mine["topk_weights"])
            raise AssertionError("dispatch with a bad expert id did not fail")
        except epx.EpxError as e:
            if me == R - 1:
                assert e.code == L.INVALID_ARGUMENT, e
                assert isinstance(e, ValueError)
                assert e.message and e.message in str(e), e
            else:
                assert e.code == L.REMOTE_ERROR, e
        # 2. a Python-level check (wrong dtype) on rank 0: the others still fail cleanly.
        try:
            x = mine["x"].float() if me == 0 else mine["x"]
            buf.dispatch(x, topk_idx=mine["topk_idx"], topk_weights=mine["topk_weights"])
            raise AssertionError("dispatch with float32 x did not fail")
        except TypeError:
            assert me == 0
        except epx.EpxError as e:
            assert me != 0 and e.code == L.REMOTE_ERROR, e
        # 3. the communicator still works, exactly.
        recv, _, _, counts, handle, _ = buf.dispatch(mine["x"], topk_idx=mine["topk_idx"],
                                                     topk_weights=mine["topk_weights"])
        assert recv.size(0) == handle.num_recv_tokens
        # 4. combine with the wrong row count: Python check, peers fail cleanly.
        # (Host backend only: a CUDA combine is stream-ordered, so the peers
        # learn of the rejection on the device, after their call returned.)
        if ctx.device == "cuda":
            return
        try:
            xs = recv[:-1] if (me == 0 and recv.size(0) > 0) else recv
            if me == 0 and recv.size(0) == 0:
                xs = torch.empty((1, H), dtype=torch.bfloat16, device=device)
            buf.combine(xs, handle)
            raise AssertionError("combine with a wrong row count did not fail")
        except ValueError:
            assert me == 0
        except epx.EpxError as e:
            assert me != 0 and e.code == L.REMOTE_ERROR, e
        out, _, _ = buf.combine(recv, handle)
        assert out.shape == (T, H)
    finally:
        buf.destroy()
    # 5. use after destroy
    try:
        buf.dispatch(mine["x"], topk_idx=mine["topk_idx"])
        raise AssertionError("dispatch after destroy did not fail")
    except epx.EpxError as e:
        assert e.code == L.INVALID_USAGE


def resize_and_stale_handles(ctx, seed=7, T=8, K=2):
    """The lazily sized communicator grows for a larger hidden size; handles
    from before raise epxInvalidUsage; results stay exact."""
    R, me, device = ctx.nranks, ctx.rank, dev(ctx)
    E = 2 * R
    buf = epx.Buffer(ctx.group, explicitly_destroy=True, timeout_ms=TIMEOUT_MS)
    try:
        small = to(draw_rank(seed, me, T, 128, K, E), device)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(small["topk_idx"], E)
        _, _, _, _, h_small, _ = buf.dispatch(small["x"], topk_idx=small["topk_idx"],
                                              num_tokens_per_expert=per_expert)
        info1 = buf.epx_communicator.info
        assert info1.hidden >= 128 and info1.num_experts == E
        big = to(draw_rank(seed, me, T, 512, K, E), device)
        recv, _, _, _, h_big, _ = buf.dispatch(big["x"], topk_idx=big["topk_idx"],
                                               num_tokens_per_expert=per_expert)
        assert buf.epx_communicator.info.hidden >= 512
        try:
            buf.combine(torch.zeros((h_small.rows, 128), dtype=torch.bfloat16, device=device),
                        h_small)
            raise AssertionError("a stale handle was accepted")
        except epx.EpxError as e:
            assert e.code == L.INVALID_USAGE, e
        out, _, _ = buf.combine(recv, h_big)
        assert out.shape == (T, 512)
    finally:
        buf.destroy()


def deep_ep_standin(ctx, seed=9, T=32, H=256, K=4):
    """DeepEP's own usage pattern through `import epx.deep_ep as deep_ep`."""
    import epx.deep_ep as deep_ep
    R, me, device = ctx.nranks, ctx.rank, dev(ctx)
    E = 4 * R
    assert deep_ep.topk_idx_t == torch.int64
    cfgs = (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R))
    assert all(isinstance(c, deep_ep.Config) for c in cfgs)
    nvl = max(c.get_nvl_buffer_size_hint(H * 2, R) for c in cfgs)
    rdma = max(c.get_rdma_buffer_size_hint(H * 2, R) for c in cfgs)
    assert nvl > 0 and rdma >= 0
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, H, R, E) >= 0
    buffer = deep_ep.Buffer(ctx.group, nvl, rdma)
    d = to(draw_rank(seed, me, T, H, K, E), device)
    previous = deep_ep.Buffer.capture()
    assert isinstance(previous, deep_ep.EventOverlap)
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
     event) = buffer.get_dispatch_layout(d["topk_idx"], E, previous_event=previous,
                                         async_finish=True, allocate_on_comm_stream=True)
    assert num_tokens_per_rank.dtype == torch.int32 and num_tokens_per_rank.shape == (R,)
    assert num_tokens_per_expert.shape == (E,) and is_token_in_rank.dtype == torch.bool
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \
        buffer.dispatch(d["x"], topk_idx=d["topk_idx"], topk_weights=d["topk_weights"],
                        num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                        is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert,
                        previous_event=event, async_finish=True,
                        allocate_on_comm_stream=True, config=cfgs[0])
    event.current_stream_wait()
    assert isinstance(num_recv_tokens_per_expert_list, list)
    assert len(num_recv_tokens_per_expert_list) == E // R
    assert recv_topk_idx.dtype == deep_ep.topk_idx_t and recv_topk_weights.dtype == torch.float32
    # every received row names at least one local expert
    assert bool(((recv_topk_idx >= 0).sum(1) > 0).all())
    combined_x, _, event = buffer.combine(recv_x, handle, async_finish=True, config=cfgs[1],
                                          previous_event=deep_ep.Buffer.capture())
    with event:
        pass
    assert combined_x.shape == (T, H) and combined_x.dtype == torch.bfloat16
    del buffer  # released by the collector (explicitly_destroy=False)

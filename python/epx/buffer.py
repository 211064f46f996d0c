"""epx.Buffer: DeepEP V1's `deep_ep.Buffer` API on top of libepx.

Same method names, argument names, defaults, return tuples, shapes and dtypes
as DeepEP V1 (1.2.x). What epx does differently is said where it happens and
collected in the class docstring.
"""

import ctypes
import pickle
import socket
import struct
import threading
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _lib as L
from ._comm import Communicator
from .utils import Config, EventHandle, EventOverlap

__all__ = ["Buffer", "DispatchHandle", "LowLatencyHandle", "topk_idx_t"]

#: dtype of expert indices (DeepEP's `topk_idx_t`). epx also accepts torch.int32.
topk_idx_t = torch.int64

_FP8 = getattr(torch, "float8_e4m3fn", None)
_IDX_TYPES = {torch.int64: L.INT64, torch.int32: L.INT32}
_FP8_GROUP = 128
_UE8M0_PER_WORD = 4
# Normal-mode token limit when neither the constructor nor the first call says more.
_DEFAULT_MAX_TOKENS = 4096
_DEFAULT_MAX_TOPK = 8


def _completed_event() -> EventHandle:
    e = EventHandle.__new__(EventHandle)
    e.event = None
    return e


# Address handed to the library for an input with no elements: the C API
# tells "absent" (NULL) from "empty", so an empty input must not be NULL.
_EMPTY_HOST = (ctypes.c_uint8 * 128)()
_EMPTY_HOST_ADDR = (ctypes.addressof(_EMPTY_HOST) + 63) // 64 * 64
_EMPTY_DEVICE = {}  # torch.device -> a small device tensor


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    """Address of an output (None when absent or empty: nothing is written)."""
    if t is None or t.numel() == 0:
        return None
    return t.data_ptr()


def _in(t: Optional[torch.Tensor]) -> Optional[int]:
    """Address of an input: None when absent, a valid dummy when empty."""
    if t is None:
        return None
    if t.numel() == 0:
        if t.device.type == "cpu":
            return _EMPTY_HOST_ADDR
        dummy = _EMPTY_DEVICE.get(t.device)
        if dummy is None:
            dummy = _EMPTY_DEVICE[t.device] = torch.zeros(64, dtype=torch.uint8, device=t.device)
        return dummy.data_ptr()
    return t.data_ptr()


def _scale_cols(hidden: int, ue8m0: bool) -> int:
    groups = hidden // _FP8_GROUP
    return (groups + _UE8M0_PER_WORD - 1) // _UE8M0_PER_WORD if ue8m0 else groups


def _prepare(t: torch.Tensor, name: str, align: int = 16) -> torch.Tensor:
    """Contiguous, and aligned as the library requires (copies only when not)."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() and t.data_ptr() % align:
        t = t.clone()
    return t


class _DeviceMemory:
    """Exposes a CUDA device pointer through __cuda_array_interface__ so that
    torch.as_tensor can wrap it without a copy."""

    def __init__(self, ptr: int, shape: Tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (ptr, False), "version": 2, "strides": None}


class DispatchHandle(tuple):
    """The handle of a normal-mode dispatch: pass it to `combine`, or back to
    `dispatch` for a cached re-dispatch with the same routing.

    It is a 6-tuple in the positions of DeepEP's intranode handle
    ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
    recv_src_idx, is_token_in_rank, send_head)``; epx fills
    ``recv_src_idx`` (`[rows]` int32, -1 in worst-case padding rows) and
    ``is_token_in_rank`` (the tensor given to `dispatch`, or None) and leaves the
    others None: the routing itself lives in the library (an epxHandle_t).

    Attributes:
        recv_rank_prefix: `[num_ranks]` int32, rows from source ranks <= s end
            at recv_rank_prefix[s] (column `rank` of DeepEP's rank_prefix_matrix).
        num_tokens, num_topk, hidden: of the dispatch that made it.
        num_recv_tokens: rows received (None in worst-case mode, where the count
            stays on the device: see `num_recv_tokens_tensor`).
        num_recv_tokens_tensor: `[1]` int32 on the dispatch's device.
        num_worst_tokens: the dispatch's `num_worst_tokens`.
    """

    def __new__(cls, items, epx_handle, **meta):
        self = super().__new__(cls, items)
        self._epx = epx_handle
        for k, v in meta.items():
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        return (f"epx.DispatchHandle(num_tokens={self.num_tokens}, "
                f"num_recv_tokens={self.num_recv_tokens}, hidden={self.hidden}, "
                f"num_topk={self.num_topk})")


class LowLatencyHandle(tuple):
    """The handle of a low-latency dispatch, for `low_latency_combine` and
    `get_next_low_latency_combine_buffer`.

    The same 5-tuple as DeepEP: ``(recv_src_info, recv_layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)`` with
    recv_src_info `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank]`
    int32 (source token index of every valid row) and recv_layout_range
    `[num_local_experts, num_ranks]` int64, each ``(first_row << 32) | count``.
    """

    def __new__(cls, items, epx_handle, **meta):
        self = super().__new__(cls, items)
        self._epx = epx_handle
        for k, v in meta.items():
            setattr(self, k, v)
        return self


class Buffer:
    """Expert-parallel dispatch and combine for MoE, with DeepEP V1's API.

    Normal mode (`get_dispatch_layout`, `dispatch`, `combine`) serves training
    and prefill; low-latency mode (`low_latency_dispatch`,
    `low_latency_combine`) serves decoding. CUDA tensors run on epx's GPU
    backend, CPU tensors on its host backend (processes + shared memory, e.g.
    with a gloo group), with bit-identical results.

    Differences from DeepEP (all else is the same):
      * Sizing. epx's communicator is sized by the number of experts, hidden
        size, top-k and token limits, not by byte counts. `num_nvl_bytes` and
        `num_rdma_bytes` are recorded but not used. Give the sizes to the
        constructor (keyword-only `num_experts`, `hidden`, `num_topk`,
        `num_max_tokens_per_rank`, `num_max_dispatch_tokens_per_rank`) to create
        the communicator there, as DeepEP does; otherwise it is created at the
        first call from that call's shapes (hidden, top-k, experts; token limit
        = max(4096, the largest T of any rank in that call)). That first call
        must then be made by every rank, as it is collective: a
        `get_dispatch_layout` that comes first is collective too (it knows no
        hidden size, so the first dispatch then re-creates the communicator
        once; pass `hidden=` to avoid that). A later
        collective call with a larger hidden size or top-k, another expert
        count, or another `num_max_dispatch_tokens_per_rank` re-creates the
        communicator (collectively); handles from before then raise
        epxInvalidUsage. `Config` chunk sizes are accepted and ignored.
      * A normal-mode T larger than the token limit fails on every rank with
        the library's message (pass `num_max_tokens_per_rank`).
      * The handle of `dispatch` is a `DispatchHandle` (a 6-tuple with only
        `recv_src_idx` and `is_token_in_rank` filled; the routing lives in the
        library). The low-latency handle is DeepEP's 5-tuple.
      * `dispatch` routes by `topk_idx`: it is required when no handle is
        given; `num_tokens_per_rank`, `num_tokens_per_rdma_rank`,
        `is_token_in_rank` and `num_tokens_per_expert` are accepted and not
        needed (`num_tokens_per_expert` supplies the expert count when the
        communicator does not exist yet). FP8 scales may be float32
        `[T, H/128]` or UE8M0-packed int32 `[T, ceil(H/512)]`.
      * Low-latency FP8 scales are returned row-major
        (`[E_local, R*maxT, cols]` contiguous), not as DeepEP's column-major
        view; call `.transpose(1, 2).contiguous().transpose(1, 2)` for TMA.
        Outputs are fresh tensors, not views into two library buffers, so any
        number of results may be held at once.
      * `use_logfmt` is accepted and ignored (epx combines in BF16, exactly);
        `dispatch_wait_recv_cost_stats` / `combine_wait_recv_cost_stats` are
        accepted and left untouched; `low_latency_mode` need not be set for
        the low-latency calls. `clean_low_latency_buffer` only makes sure
        the communicator is sized for those arguments (epx needs no cleaning).
      * Any number of ranks is supported: `get_dispatch_config` /
        `get_combine_config` accept every rank count.
      * Every failure of the library raises `epx.EpxError` (or a subclass that
        is also a ValueError, TimeoutError, NotImplementedError or
        MemoryError) carrying the library's message.

    Attributes:
        num_sms: SMs for normal-mode kernels (class-wide, see `set_num_sms`).
        rank, group_size, group: this process's rank, the group size and group.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy: as given.
    """

    num_sms: int = 20
    _num_sms_set: bool = False

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *,
                 num_experts: Optional[int] = None, hidden: Optional[int] = None,
                 num_topk: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 num_max_dispatch_tokens_per_rank: Optional[int] = None,
                 ranks_per_node: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 timeout_ms: int = 0) -> None:
        """Initialise the buffer (collective over the group when the sizes are given).

        Arguments:
            group: the torch.distributed group (gloo for CPU tensors, nccl for CUDA).
            num_nvl_bytes, num_rdma_bytes: recorded; epx sizes its memory itself.
            low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode,
                allow_mnnvl: accepted for compatibility (no effect).
            explicitly_destroy: if set, `destroy()` must be called to release the
                resources; otherwise they are released when the object is collected.
            enable_shrink: rank masking is not supported (True raises).
            comm: an mpi4py communicator, used when `group` is None.
            num_experts, hidden, num_topk, num_max_tokens_per_rank,
                num_max_dispatch_tokens_per_rank (keyword-only, epx): size the
                communicator now instead of at the first call. `hidden` is the
                largest hidden size, `num_topk` the largest top-k,
                `num_max_tokens_per_rank` the largest normal-mode T,
                `num_max_dispatch_tokens_per_rank` the low-latency token limit
                (the value later passed to `low_latency_dispatch`).
            ranks_per_node: ranks per NVLink domain (default: ranks on this host;
                the host backend treats all ranks as one node unless given).
            device: 'cpu' (host backend) or 'cuda' (GPU backend) for a
                communicator created here; default from the group's backend.
            timeout_ms: hard timeout of every wait on a peer (0 = library default).
        """
        if enable_shrink:
            raise L.error_for(L.NOT_SUPPORTED, "enable_shrink (rank masking) is not supported "
                              "by epx", "Buffer")
        self._mpi = None
        if group is not None:
            self.rank = group.rank()
            self.group_size = group.size()
            self.group = group
        elif comm is not None:
            self.rank = comm.Get_rank()
            self.group_size = comm.Get_size()
            self.group = comm
            self._mpi = comm
        else:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self._hint_hidden = hidden
        self._hint_topk = num_topk
        self._hint_max_tokens = num_max_tokens_per_rank
        self._hint_ll_tokens = num_max_dispatch_tokens_per_rank
        self._ranks_per_node = ranks_per_node
        self._device = torch.device(device) if device is not None else None
        self._timeout_ms = int(timeout_ms)
        self._comm: Optional[Communicator] = None
        self._comm_device: Optional[torch.device] = None
        self._comm_stream = None
        self._lock = threading.RLock()
        self._destroyed = False
        if num_experts is not None:
            if hidden is None:
                raise ValueError("epx: sizing the communicator in the constructor needs both "
                                 "num_experts and hidden")
            self._ensure_comm(self._default_device(), int(num_experts), int(hidden),
                              int(num_topk or _DEFAULT_MAX_TOPK), 0,
                              num_max_dispatch_tokens_per_rank)

    # ================================================================ set-up

    def _default_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if self._comm_device is not None:
            return self._comm_device
        if self._collective_is_cuda():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _collective_is_cuda(self) -> bool:
        if self._mpi is not None:
            return False
        try:
            backend = str(dist.get_backend(self.group)).lower()
        except Exception:
            return False
        return "nccl" in backend and "gloo" not in backend

    def _allgather_bytes(self, data: bytes) -> List[bytes]:
        """All-gather of equal-sized byte strings over the group (the epx
        bootstrap callback; runs in the thread that calls init)."""
        if self._mpi is not None:
            return list(self._mpi.allgather(bytes(data)))
        n = len(data)
        if n == 0:
            return [b""] * self.group_size
        dev = torch.device("cuda", torch.cuda.current_device()) if self._collective_is_cuda() \
            else torch.device("cpu")
        src = torch.empty(n, dtype=torch.uint8)
        ctypes.memmove(src.data_ptr(), data, n)
        src = src.to(dev)
        parts = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(self.group_size)]
        dist.all_gather(parts, src, group=self.group)
        out = []
        for p in parts:
            p = p.cpu().contiguous()
            out.append(ctypes.string_at(p.data_ptr(), n))
        return out

    def _allgather_object(self, obj) -> list:
        """All-gather of picklable objects through `_allgather_bytes` (torch's
        all_gather_object needs numpy in recent releases; this needs nothing)."""
        if self._mpi is not None:
            return list(self._mpi.allgather(obj))
        data = pickle.dumps(obj)
        sizes = [struct.unpack("<Q", b)[0]
                 for b in self._allgather_bytes(struct.pack("<Q", len(data)))]
        width = max(sizes)
        parts = self._allgather_bytes(data + b"\0" * (width - len(data)))
        return [pickle.loads(p[:n]) for p, n in zip(parts, sizes)]

    def _fits(self, device, num_experts, hidden, num_topk, ll_tokens) -> bool:
        c = self._comm
        if c is None or not c.alive:
            return False
        i = c.info
        want_backend = L.BACKEND_HOST if device.type == "cpu" else L.BACKEND_CUDA
        if i.backend != want_backend:
            return False
        if device.type == "cuda" and self._comm_device != device:
            return False
        if i.num_experts != num_experts or hidden > i.hidden or num_topk > i.max_topk:
            return False
        if ll_tokens is not None and ll_tokens != i.ll_max_tokens_per_rank:
            return False
        return True

    def _ensure_comm(self, device: torch.device, num_experts: int, hidden: int, num_topk: int,
                     num_tokens: int, ll_tokens: Optional[int] = None) -> Communicator:
        """The communicator sized for a call; creates or re-creates it when it
        does not fit. Creation is collective; every rank reaches the same
        decision because experts, hidden, top-k and ll_tokens are equal on all
        ranks of a valid collective call."""
        if self._destroyed:
            raise L.error_for(L.INVALID_USAGE, "the Buffer was destroyed", "Buffer")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._fits(device, num_experts, hidden, num_topk, ll_tokens):
            return self._comm
        old = self._comm
        if old is not None and old.alive:
            i = old.info
            hidden = max(hidden, i.hidden)
            num_topk = max(num_topk, i.max_topk)
            if ll_tokens is None:
                ll_tokens = i.ll_max_tokens_per_rank
            prev_max_tokens = i.max_tokens_per_rank
        else:
            prev_max_tokens = 0
        if ll_tokens is None:
            ll_tokens = self._hint_ll_tokens or 0
        hidden = max(hidden, self._hint_hidden or 0)
        num_topk = min(max(num_topk, self._hint_topk or _DEFAULT_MAX_TOPK), 32)

        # One group-wide exchange settles the token limit and the node shape.
        meta = self._allgather_object((socket.gethostname(), int(num_tokens)))
        if self._hint_max_tokens:
            max_tokens = int(self._hint_max_tokens)
        else:
            max_tokens = max(_DEFAULT_MAX_TOKENS, prev_max_tokens, *(m[1] for m in meta))
        if self._ranks_per_node is not None:
            rpn = int(self._ranks_per_node)
        elif device.type == "cpu":
            rpn = 0
        else:
            host = meta[self.rank][0]
            rpn = sum(1 for m in meta if m[0] == host)
            rpn = 0 if rpn == self.group_size else rpn

        if old is not None:
            self._sync_comm_stream()
            old.destroy()
            self._comm = None
        backend = L.BACKEND_HOST if device.type == "cpu" else L.BACKEND_CUDA
        cfg = L.default_config(
            backend=backend, ranks_per_node=rpn, num_experts=num_experts, hidden=hidden,
            max_topk=num_topk, max_tokens_per_rank=max_tokens, ll_max_tokens_per_rank=ll_tokens,
            num_sms=Buffer.num_sms if Buffer._num_sms_set else 0,
            cuda_device=device.index if device.type == "cuda" else -1,
            timeout_ms=self._timeout_ms)
        self._comm = Communicator.init_with_allgather(self.rank, self.group_size,
                                                      self._allgather_bytes, cfg)
        self._comm_device = device
        if device.type == "cuda" and (self._comm_stream is None or
                                      self._comm_stream.device != device):
            self._comm_stream = torch.cuda.Stream(device=device)
        return self._comm

    def _check_alive(self) -> None:
        if self._destroyed:
            raise L.error_for(L.INVALID_USAGE, "the Buffer was destroyed", "Buffer")

    def _require_comm(self) -> Communicator:
        self._check_alive()
        if self._comm is None or not self._comm.alive:
            raise L.error_for(L.INVALID_USAGE, "no communicator yet: make a dispatch first",
                              "Buffer")
        return self._comm

    def _sync_comm_stream(self) -> None:
        if self._comm_stream is not None:
            self._comm_stream.synchronize()

    @property
    def epx_communicator(self) -> Optional[Communicator]:
        """The underlying `epx._comm.Communicator` (None until created)."""
        return self._comm

    def destroy(self) -> None:
        """Release the communicator and its memory (needs `explicitly_destroy=True`).
        Local: it never waits for the other ranks."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self._release()

    def _release(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        comm, self._comm = self._comm, None
        if comm is not None:
            try:
                self._sync_comm_stream()
            finally:
                comm.destroy()

    def __del__(self) -> None:
        if getattr(self, "explicitly_destroy", True):
            return
        try:
            self._release()
        except Exception:
            pass

    # ================================================================ streams

    def _begin(self, device: torch.device, previous_event: Optional[EventOverlap]):
        """Stream the library call runs on (None on the host backend); the comm
        stream first waits for previous_event or else the current stream."""
        if device.type != "cuda":
            return None
        stream = self._comm_stream
        if previous_event is not None and previous_event.event is not None and \
                previous_event.event.event is not None:
            stream.wait_event(previous_event.event.event)
        else:
            stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def _alloc_ctx(self, stream, allocate_on_comm_stream: bool):
        if stream is not None and allocate_on_comm_stream:
            return torch.cuda.stream(stream)
        return _nullctx

    def _finish(self, stream, async_finish: bool, allocate_on_comm_stream: bool,
                tensors) -> EventOverlap:
        if stream is None:
            return EventOverlap(_completed_event() if async_finish else None)
        compute = torch.cuda.current_stream(stream.device)
        if async_finish:
            event = EventHandle(stream)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(stream)
                    if allocate_on_comm_stream:
                        t.record_stream(compute)
            return EventOverlap(event)
        compute.wait_stream(stream)
        if allocate_on_comm_stream:
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(compute)
        return EventOverlap(None)

    @staticmethod
    def _stream_ptr(stream) -> Optional[int]:
        return None if stream is None else stream.cuda_stream

    # ======================================================== static helpers

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True (epx builds its GPU backend for sm_90 when it builds it at all)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the number of SMs used by normal-mode kernels (even, as DeepEP).
        Takes effect for communicators created afterwards."""
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms
        Buffer._num_sms_set = True

    @staticmethod
    def capture() -> EventOverlap:
        """An event captured on the current CUDA stream (complete at once when CUDA
        is not in use)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Bytes of epx's low-latency buffers per rank (epxGetSizeHints'
        ll_buffer_bytes) for these limits.

        Arguments:
            num_max_dispatch_tokens_per_rank: low-latency token limit (same on every rank).
            hidden: hidden size.
            num_ranks: ranks in the group.
            num_experts: experts in total.
        """
        cfg = L.default_config(num_experts=int(num_experts), hidden=int(hidden),
                               ll_max_tokens_per_rank=int(num_max_dispatch_tokens_per_rank),
                               max_tokens_per_rank=max(1, int(num_max_dispatch_tokens_per_rank)))
        return int(L.size_hints(cfg, int(num_ranks)).ll_buffer_bytes)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A dispatch `Config` for `num_ranks` ranks (any count; chunk sizes unused by epx)."""
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A combine `Config` for `num_ranks` ranks (any count; chunk sizes unused by epx)."""
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    def get_comm_stream(self):
        """The CUDA stream epx calls run on (None before the first CUDA call)."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise L.error_for(L.NOT_SUPPORTED, "epx keeps no raw communication buffer for callers; "
                          "outputs are ordinary tensors", "Buffer.get_local_buffer_tensor")

    # ============================================================ validation

    def _poison(self, comm: Communicator, op: str, stream) -> None:
        """Takes part in a collective with arguments the library rejects, so the
        peers fail the same call (epxRemoteError) instead of waiting for us."""
        h = comm.new_handle()
        try:
            if op in ("notify", "dispatch"):
                args = L.DispatchArgs(x_type=L.BFLOAT16, topk_idx_type=L.INT64, num_topk=0)
                if op == "notify":
                    comm.dispatch_notify(args, h, None, stream)
                else:
                    comm.dispatch(args, h, L.DispatchOutputs(), stream)
            elif op == "combine":
                comm.combine(L.CombineArgs(), h, L.CombineOutputs(), stream)
            elif op == "ll_dispatch":
                comm.low_latency_dispatch(L.LowLatencyDispatchArgs(num_topk=0), h,
                                          L.LowLatencyDispatchOutputs(), stream)
            elif op == "ll_combine":
                comm.low_latency_combine(L.LowLatencyCombineArgs(), h, None, stream)
        except L.EpxError:
            pass

    def _reject(self, err: Exception, op: str, device: Optional[torch.device]):
        """Raise `err` after letting the peers know (see `_poison`)."""
        comm = self._comm
        if comm is not None and comm.alive:
            stream = self._comm_stream if (device is not None and device.type == "cuda") else None
            self._poison(comm, op, self._stream_ptr(stream))
        raise err

    @staticmethod
    def _check_topk(topk_idx: torch.Tensor, device, name="topk_idx") -> None:
        if topk_idx.dim() != 2:
            raise ValueError(f"{name} must be [num_tokens, num_topk], got {tuple(topk_idx.shape)}")
        if topk_idx.dtype not in _IDX_TYPES:
            raise TypeError(f"{name} must be torch.int64 (epx.topk_idx_t) or torch.int32, "
                            f"got {topk_idx.dtype}")
        if topk_idx.device != device:
            raise ValueError(f"{name} is on {topk_idx.device}, x on {device}")

    # ================================================================ layout

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Routing counts of this rank's tokens (not collective once the
        communicator exists; see the class docstring for the first call).

        Arguments:
            topk_idx: `[num_tokens, num_topk]` `epx.topk_idx_t` (or int32), expert
                ids, -1 for none.
            num_experts: the number of experts.
            previous_event, async_finish, allocate_on_comm_stream: as DeepEP.

        Returns:
            num_tokens_per_rank: `[num_ranks]` torch.int, tokens sent to each rank.
            num_tokens_per_rdma_rank: `[num_nodes]` torch.int (a token counts once per
                node), or None within one node.
            num_tokens_per_expert: `[num_experts]` torch.int.
            is_token_in_rank: `[num_tokens, num_ranks]` torch.bool.
            event: the event after the call (valid only with `async_finish`).
        """
        self._check_alive()
        device = topk_idx.device
        self._check_topk(topk_idx, device)
        topk_idx = _prepare(topk_idx, "topk_idx", topk_idx.element_size())
        T, K = topk_idx.shape
        comm = self._ensure_comm(device, int(num_experts), self._comm.info.hidden
                                 if self._comm is not None and self._comm.alive
                                 else (self._hint_hidden or 8), K, T)
        R, nodes = comm.info.nranks, comm.info.num_nodes
        stream = self._begin(device, previous_event)
        with self._alloc_ctx(stream, allocate_on_comm_stream):
            per_rank = torch.empty(R, dtype=torch.int32, device=device)
            per_node = torch.empty(nodes, dtype=torch.int32, device=device) if nodes > 1 else None
            per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
            in_rank = torch.empty((T, R), dtype=torch.bool, device=device)
        layout = L.Layout(_ptr(per_rank), _ptr(per_node), _ptr(per_expert), _ptr(in_rank))
        comm.get_dispatch_layout(_in(topk_idx), _IDX_TYPES[topk_idx.dtype], T, K, layout,
                                 self._stream_ptr(stream))
        event = self._finish(stream, async_finish, allocate_on_comm_stream,
                             (topk_idx, per_rank, per_node, per_expert, in_rank))
        return per_rank, per_node, per_expert, in_rank, event

    # ================================================================ normal

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], Optional[torch.Tensor],
                  Optional[torch.Tensor], List[int], DispatchHandle, EventOverlap]:
        """Send every token to the ranks holding its experts (collective).

        Arguments:
            x: `[num_tokens, hidden]` torch.bfloat16, or a tuple of
                `[num_tokens, hidden]` torch.float8_e4m3fn and its scales
                (`[num_tokens, hidden // 128]` torch.float, or UE8M0-packed
                `[num_tokens, ceil(hidden / 512)]` torch.int).
            handle: from an earlier dispatch: cached re-dispatch with the same
                routing (no count exchange); topk_idx/topk_weights must be None.
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert: `get_dispatch_layout`'s outputs (accepted;
                epx routes from topk_idx).
            topk_idx: `[num_tokens, num_topk]` `epx.topk_idx_t` (or int32); required
                without a handle.
            topk_weights: `[num_tokens, num_topk]` torch.float, or None.
            expert_alignment: per-expert receive counts are rounded up to this.
            num_worst_tokens: > 0: no host synchronisation (CUDA-graph safe); outputs
                have this many rows, rows past the real count have recv_topk_idx -1.
            config: accepted (see `Config`).
            previous_event, async_finish, allocate_on_comm_stream: as DeepEP.

        Returns:
            recv_x: `[num_recv_tokens, hidden]`, same dtype (and tuple with scales
                `[num_recv_tokens, cols]`) as x; rows ordered by source rank, then
                source token index.
            recv_topk_idx: `[num_recv_tokens, num_topk]`, topk_idx's dtype: local
                expert ids, -1 where the expert lives elsewhere (None when cached).
            recv_topk_weights: `[num_recv_tokens, num_topk]` torch.float, 0 where the id
                is -1 (None when cached or without topk_weights).
            num_recv_tokens_per_expert_list: Python list `[num_local_experts]`,
                aligned to expert_alignment (empty with num_worst_tokens; None when cached).
            handle: a `DispatchHandle` for `combine` and cached re-dispatch.
            event: the event after the call (valid only with `async_finish`).
        """
        self._check_alive()
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        device = x.device
        op = "notify" if handle is None and num_worst_tokens == 0 else "dispatch"
        try:
            x_type, scale_format = self._check_payload(x, x_scales)
            if handle is not None:
                if not isinstance(handle, DispatchHandle):
                    raise TypeError("handle must be the DispatchHandle returned by epx dispatch")
                if topk_idx is not None or topk_weights is not None:
                    raise ValueError("a cached dispatch (handle given) takes no topk_idx or "
                                     "topk_weights")
                if x.size(0) != handle.num_tokens:
                    raise ValueError(f"cached dispatch of {x.size(0)} tokens with a handle of "
                                     f"{handle.num_tokens}")
            else:
                if topk_idx is None:
                    raise ValueError("epx routes by topk_idx: pass topk_idx (or a handle)")
                self._check_topk(topk_idx, device)
                if topk_idx.size(0) != x.size(0):
                    raise ValueError(f"topk_idx has {topk_idx.size(0)} rows, x {x.size(0)}")
                if topk_weights is not None:
                    if topk_weights.dtype != torch.float32 or \
                            tuple(topk_weights.shape) != tuple(topk_idx.shape) or \
                            topk_weights.device != device:
                        raise ValueError("topk_weights must be torch.float shaped like topk_idx, "
                                         "on x's device")
                if num_tokens_per_expert is None and (self._comm is None or
                                                      not self._comm.alive):
                    raise ValueError("epx needs the expert count for the first dispatch: pass "
                                     "num_tokens_per_expert (from get_dispatch_layout) or size "
                                     "the Buffer with num_experts=")
            if num_worst_tokens < 0:
                raise ValueError("num_worst_tokens must be >= 0")
            if config is not None and not isinstance(config, Config):
                raise TypeError("config must be an epx.Config")
        except (TypeError, ValueError) as e:
            self._reject(e, op, device)

        with self._lock:
            if handle is not None:
                return self._cached_dispatch(x, x_scales, x_type, scale_format, handle,
                                             expert_alignment, previous_event, async_finish,
                                             allocate_on_comm_stream)
            return self._fresh_dispatch(x, x_scales, x_type, scale_format, topk_idx,
                                        topk_weights, num_tokens_per_expert, is_token_in_rank,
                                        expert_alignment, num_worst_tokens, previous_event,
                                        async_finish, allocate_on_comm_stream)

    @staticmethod
    def _check_payload(x, x_scales):
        if x.dim() != 2:
            raise ValueError(f"x must be [num_tokens, hidden], got {tuple(x.shape)}")
        if x_scales is None:
            if x.dtype != torch.bfloat16:
                raise TypeError(f"x must be torch.bfloat16 (or an FP8 (x, scales) tuple), "
                                f"got {x.dtype}")
            return L.BFLOAT16, L.SCALES_NONE
        if _FP8 is None or x.dtype != _FP8:
            raise TypeError(f"FP8 x must be torch.float8_e4m3fn, got {x.dtype}")
        if x_scales.dim() != 2 or x_scales.size(0) != x.size(0) or x_scales.device != x.device:
            raise ValueError(f"x scales must be [num_tokens, cols] on x's device, got "
                             f"{tuple(x_scales.shape)}")
        H = x.size(1)
        if x_scales.dtype == torch.float32:
            fmt, cols = L.SCALES_FLOAT32, _scale_cols(H, False)
        elif x_scales.dtype == torch.int32:
            fmt, cols = L.SCALES_UE8M0, _scale_cols(H, True)
        else:
            raise TypeError(f"x scales must be torch.float (or UE8M0-packed torch.int), "
                            f"got {x_scales.dtype}")
        if x_scales.size(1) != cols:
            raise ValueError(f"x scales have {x_scales.size(1)} columns, expected {cols} for "
                             f"hidden {H}")
        return L.FLOAT8_E4M3, fmt

    def _fresh_dispatch(self, x, x_scales, x_type, scale_format, topk_idx, topk_weights,
                        num_tokens_per_expert, is_token_in_rank, expert_alignment,
                        num_worst_tokens, previous_event, async_finish, allocate_on_comm_stream):
        device = x.device
        T, H = x.shape
        K = topk_idx.size(1)
        if num_tokens_per_expert is not None:
            E = num_tokens_per_expert.numel()
        else:
            E = self._comm.info.num_experts
        comm = self._ensure_comm(device, E, H, K, T)
        R, E_local = comm.info.nranks, comm.info.num_local_experts
        x = _prepare(x, "x")
        x_scales = _prepare(x_scales, "x_scales", 4) if x_scales is not None else None
        topk_idx = _prepare(topk_idx, "topk_idx", topk_idx.element_size())
        topk_weights = _prepare(topk_weights, "topk_weights", 4) \
            if topk_weights is not None else None
        args = L.DispatchArgs(_in(x), x_type, _in(x_scales), scale_format, _in(topk_idx),
                              _IDX_TYPES[topk_idx.dtype], _in(topk_weights), T, H, K,
                              int(expert_alignment), int(num_worst_tokens))
        stream = self._begin(device, previous_event)
        sptr = self._stream_ptr(stream)
        h = comm.new_handle()
        if num_worst_tokens == 0:
            per_expert_host = (ctypes.c_int * max(E_local, 1))()
            n = comm.dispatch_notify(args, h, ctypes.addressof(per_expert_host), sptr)
            rows, counts = int(n), [int(v) for v in per_expert_host[:E_local]]
        else:
            rows, counts = int(num_worst_tokens), []
        with self._alloc_ctx(stream, allocate_on_comm_stream):
            recv_x = torch.empty((rows, H), dtype=x.dtype, device=device)
            recv_scales = None if x_scales is None else \
                torch.empty((rows, x_scales.size(1)), dtype=x_scales.dtype, device=device)
            recv_topk_idx = torch.empty((rows, K), dtype=topk_idx.dtype, device=device)
            recv_topk_weights = None if topk_weights is None else \
                torch.empty((rows, K), dtype=torch.float32, device=device)
            recv_src_idx = torch.empty(rows, dtype=torch.int32, device=device)
            recv_rank_prefix = torch.empty(R, dtype=torch.int32, device=device)
            per_expert = torch.empty(E_local, dtype=torch.int32, device=device)
            num_recv = torch.empty(1, dtype=torch.int32, device=device)
        outs = L.DispatchOutputs(_ptr(recv_x), _ptr(recv_scales), _ptr(recv_topk_idx),
                                 _ptr(recv_topk_weights), _ptr(recv_src_idx),
                                 _ptr(recv_rank_prefix), _ptr(per_expert), _ptr(num_recv), rows)
        comm.dispatch(args, h, outs, sptr)
        event = self._finish(stream, async_finish, allocate_on_comm_stream,
                             (x, x_scales, topk_idx, topk_weights, recv_x, recv_scales,
                              recv_topk_idx, recv_topk_weights, recv_src_idx, recv_rank_prefix,
                              per_expert, num_recv))
        handle = DispatchHandle(
            (None, None, None, recv_src_idx, is_token_in_rank, None), h,
            recv_rank_prefix=recv_rank_prefix, num_tokens=T, num_topk=K, hidden=H,
            rows=rows, num_recv_tokens=rows if num_worst_tokens == 0 else None,
            num_recv_tokens_tensor=num_recv, num_recv_tokens_per_expert_tensor=per_expert,
            num_worst_tokens=int(num_worst_tokens), expert_alignment=int(expert_alignment),
            device=device)
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, recv_topk_idx, recv_topk_weights, counts, handle, event

    def _cached_dispatch(self, x, x_scales, x_type, scale_format, handle, expert_alignment,
                         previous_event, async_finish, allocate_on_comm_stream):
        device = x.device
        comm = self._require_comm()
        T, H = x.shape
        x = _prepare(x, "x")
        x_scales = _prepare(x_scales, "x_scales", 4) if x_scales is not None else None
        rows = handle.rows
        args = L.DispatchArgs(_in(x), x_type, _in(x_scales), scale_format, None, L.INT64, None,
                              T, H, handle.num_topk, handle.expert_alignment,
                              handle.num_worst_tokens)
        stream = self._begin(device, previous_event)
        with self._alloc_ctx(stream, allocate_on_comm_stream):
            recv_x = torch.empty((rows, H), dtype=x.dtype, device=device)
            recv_scales = None if x_scales is None else \
                torch.empty((rows, x_scales.size(1)), dtype=x_scales.dtype, device=device)
        outs = L.DispatchOutputs(_ptr(recv_x), _ptr(recv_scales), None, None, None, None, None,
                                 None, rows)
        comm.dispatch(args, handle._epx, outs, self._stream_ptr(stream))
        event = self._finish(stream, async_finish, allocate_on_comm_stream,
                             (x, x_scales, recv_x, recv_scales))
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, None, None, None, None, event

    def combine(self, x: torch.Tensor, handle: DispatchHandle,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Send every received row back to its source rank and sum it there
        (no weights), in FP32, rounded to BF16 once (collective).

        Arguments:
            x: `[num_recv_tokens, hidden]` torch.bfloat16, in the dispatch's receive order.
            handle: the `DispatchHandle` of that dispatch.
            topk_weights: `[num_recv_tokens, num_topk]` torch.float, summed the same way.
            bias: one `[num_tokens, hidden]` torch.bfloat16 tensor or a tuple of two,
                added to the sum (tokens sent nowhere get the biases alone).
            config, previous_event, async_finish, allocate_on_comm_stream: as DeepEP.

        Returns:
            combined_x: `[num_tokens, hidden]` torch.bfloat16.
            combined_topk_weights: `[num_tokens, num_topk]` torch.float, or None.
            event: the event after the call (valid only with `async_finish`).
        """
        self._check_alive()
        device = x.device
        bias0, bias1 = (bias if isinstance(bias, tuple) else (bias, None))
        try:
            if not isinstance(handle, DispatchHandle):
                raise TypeError("handle must be the DispatchHandle returned by epx dispatch")
            if x.dim() != 2 or x.dtype != torch.bfloat16:
                raise TypeError(f"x must be [num_recv_tokens, hidden] torch.bfloat16, got "
                                f"{tuple(x.shape)} {x.dtype}")
            if x.size(0) != handle.rows:
                raise ValueError(f"x has {x.size(0)} rows, the dispatch received {handle.rows}")
            H = x.size(1)
            for name, b in (("bias[0]", bias0), ("bias[1]", bias1)):
                if b is not None and (b.dtype != torch.bfloat16 or
                                      tuple(b.shape) != (handle.num_tokens, H) or
                                      b.device != device):
                    raise ValueError(f"{name} must be [{handle.num_tokens}, {H}] torch.bfloat16 "
                                     f"on x's device")
            if topk_weights is not None and (topk_weights.dtype != torch.float32 or
                                             topk_weights.dim() != 2 or
                                             topk_weights.size(0) != handle.rows):
                raise ValueError(f"topk_weights must be [{handle.rows}, num_topk] torch.float")
        except (TypeError, ValueError) as e:
            self._reject(e, "combine", device)
        with self._lock:
            comm = self._require_comm()
            T = handle.num_tokens
            x = _prepare(x, "x")
            topk_weights = _prepare(topk_weights, "topk_weights", 4) \
                if topk_weights is not None else None
            bias0 = _prepare(bias0, "bias") if bias0 is not None else None
            bias1 = _prepare(bias1, "bias") if bias1 is not None else None
            K = topk_weights.size(1) if topk_weights is not None else handle.num_topk
            args = L.CombineArgs(_in(x), _in(topk_weights), (ctypes.c_void_p * 2)(
                _in(bias0), _in(bias1)), H, K)
            stream = self._begin(device, previous_event)
            with self._alloc_ctx(stream, allocate_on_comm_stream):
                combined_x = torch.empty((T, H), dtype=torch.bfloat16, device=device)
                combined_w = None if topk_weights is None else \
                    torch.empty((T, K), dtype=torch.float32, device=device)
            comm.combine(args, handle._epx, L.CombineOutputs(_ptr(combined_x), _ptr(combined_w)),
                         self._stream_ptr(stream))
            event = self._finish(stream, async_finish, allocate_on_comm_stream,
                                 (x, topk_weights, bias0, bias1, combined_x, combined_w))
            return combined_x, combined_w, event

    # =========================================================== low latency

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """epx needs no buffer cleaning; this sizes the communicator for these
        low-latency limits (collective when it has to create it, as in DeepEP).

        Arguments:
            num_max_dispatch_tokens_per_rank: low-latency token limit (same on all ranks).
            hidden: hidden size.
            num_experts: experts in total.
        """
        with self._lock:
            topk = self._comm.info.max_topk if self._comm is not None and self._comm.alive \
                else (self._hint_topk or _DEFAULT_MAX_TOPK)
            self._ensure_comm(self._default_device(), int(num_experts), int(hidden), topk, 0,
                              int(num_max_dispatch_tokens_per_rank))

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor,
                  LowLatencyHandle, EventOverlap, Optional[Callable]]:
        """Low-latency dispatch (collective; no host synchronisation).

        Arguments:
            x: `[num_tokens, hidden]` torch.bfloat16, num_tokens <=
                num_max_dispatch_tokens_per_rank.
            topk_idx: `[num_tokens, num_topk]` `epx.topk_idx_t` (or int32), -1 for none.
            num_max_dispatch_tokens_per_rank: token limit, the same on every rank.
            num_experts: experts in total.
            cumulative_local_expert_recv_stats: `[num_local_experts]` torch.int, added to.
            dispatch_wait_recv_cost_stats: accepted, left untouched.
            use_fp8: cast to FP8 E4M3 with one scale per 128 channels.
            round_scale: scales rounded up to powers of two.
            use_ue8m0: scales packed as UE8M0 (needs round_scale).
            async_finish: return without the current stream waiting.
            return_recv_hook: only send now; call the returned hook to receive.

        Returns:
            recv_x: `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank,
                hidden]` torch.bfloat16; with use_fp8 a tuple of that shape in
                torch.float8_e4m3fn and the scales, row-major:
                `[..., hidden // 128]` torch.float, or with use_ue8m0
                `[..., ceil(hidden / 512)]` torch.int. Rows
                [0, recv_count[e]) of expert e are valid, sources ascending.
            recv_count: `[num_local_experts]` torch.int.
            handle: a `LowLatencyHandle` for `low_latency_combine`.
            event: the event after the call (valid only with `async_finish`).
            hook: with return_recv_hook, a callable that receives; else None.
        """
        self._check_alive()
        device = x.device
        try:
            if x.dim() != 2 or x.dtype != torch.bfloat16:
                raise TypeError(f"x must be [num_tokens, hidden] torch.bfloat16, got "
                                f"{tuple(x.shape)} {x.dtype}")
            self._check_topk(topk_idx, device)
            if topk_idx.size(0) != x.size(0):
                raise ValueError(f"topk_idx has {topk_idx.size(0)} rows, x {x.size(0)}")
            if num_experts % self.group_size:
                raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group "
                                 f"size ({self.group_size})")
            s = cumulative_local_expert_recv_stats
            if s is not None and (s.dtype != torch.int32 or s.device != device or
                                  s.numel() != num_experts // self.group_size or
                                  not s.is_contiguous()):
                raise ValueError("cumulative_local_expert_recv_stats must be a contiguous "
                                 "[num_local_experts] torch.int tensor on x's device")
        except (TypeError, ValueError) as e:
            self._reject(e, "ll_dispatch", device)
        with self._lock:
            T, H = x.shape
            K = topk_idx.size(1)
            maxT = int(num_max_dispatch_tokens_per_rank)
            comm = self._ensure_comm(device, int(num_experts), H, K, 0, maxT)
            R, E_local = comm.info.nranks, comm.info.num_local_experts
            rows = R * maxT
            x = _prepare(x, "x")
            topk_idx = _prepare(topk_idx, "topk_idx", topk_idx.element_size())
            stream = self._begin(device, None)
            if use_fp8:
                recv_x = torch.empty((E_local, rows, H), dtype=_FP8, device=device)
                recv_scales = torch.empty((E_local, rows, _scale_cols(H, use_ue8m0)),
                                          dtype=torch.int32 if use_ue8m0 else torch.float32,
                                          device=device)
            else:
                recv_x = torch.empty((E_local, rows, H), dtype=torch.bfloat16, device=device)
                recv_scales = None
            recv_count = torch.empty(E_local, dtype=torch.int32, device=device)
            src_info = torch.empty((E_local, rows), dtype=torch.int32, device=device)
            layout_range = torch.empty((E_local, R), dtype=torch.int64, device=device)
            args = L.LowLatencyDispatchArgs(
                _in(x), _in(topk_idx), _IDX_TYPES[topk_idx.dtype], T, H, K, int(use_fp8),
                int(round_scale), int(use_ue8m0), _in(cumulative_local_expert_recv_stats),
                int(return_recv_hook))
            outs = L.LowLatencyDispatchOutputs(_ptr(recv_x), _ptr(recv_scales), _ptr(recv_count),
                                               _ptr(src_info), _ptr(layout_range))
            h = comm.new_handle()
            comm.low_latency_dispatch(args, h, outs, self._stream_ptr(stream))
            tensors = (x, topk_idx, recv_x, recv_scales, recv_count, src_info, layout_range,
                       cumulative_local_expert_recv_stats)
            event = self._finish(stream, async_finish, False, tensors)
            handle = LowLatencyHandle((src_info, layout_range, maxT, H, int(num_experts)), h,
                                      num_tokens=T, num_topk=K, device=device)
            hook = self._recv_hook(comm, h, device, tensors) if return_recv_hook else None
            recv = (recv_x, recv_scales) if use_fp8 else recv_x
            return recv, recv_count, handle, event, hook

    def _recv_hook(self, comm, h, device, tensors) -> Callable[[], None]:
        def hook() -> None:
            with self._lock:
                stream = self._begin(device, None)
                comm.low_latency_recv(h, self._stream_ptr(stream))
                self._finish(stream, False, False, tensors)
        return hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor, handle: LowLatencyHandle,
                            use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> \
            Tuple[torch.Tensor, EventOverlap, Optional[Callable]]:
        """Low-latency combine, weighted (collective):
        combined_x[t] = sum_k topk_weights[t, k] * x[expert k's row of t], FP32, BF16 once.

        Arguments:
            x: `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`
                torch.bfloat16 expert outputs, in the dispatch's layout (ignored with zero_copy).
            topk_idx: `[num_tokens, num_topk]`, the dispatch's.
            topk_weights: `[num_tokens, num_topk]` torch.float.
            handle: the `LowLatencyHandle` of the dispatch.
            use_logfmt: accepted and ignored (epx sends BF16).
            zero_copy: x is already in `get_next_low_latency_combine_buffer(handle)`.
            async_finish, return_recv_hook: as `low_latency_dispatch`.
            out: `[num_tokens, hidden]` torch.bfloat16 to write into, or None.
            combine_wait_recv_cost_stats: accepted, left untouched.

        Returns:
            combined_x: `[num_tokens, hidden]` torch.bfloat16 (`out` when given).
            event: the event after the call (valid only with `async_finish`).
            hook: with return_recv_hook, a callable that receives; else None.
        """
        self._check_alive()
        device = topk_idx.device
        try:
            if not isinstance(handle, LowLatencyHandle):
                raise TypeError("handle must be the LowLatencyHandle of low_latency_dispatch")
            self._check_topk(topk_idx, device)
            T, K = topk_idx.shape
            H = handle[3]
            if not zero_copy and (x is None or x.dtype != torch.bfloat16 or x.dim() != 3 or
                                  x.size(2) != H or x.device != device):
                raise ValueError(f"x must be [num_local_experts, rows, {H}] torch.bfloat16 on "
                                 f"topk_idx's device")
            if topk_weights.dtype != torch.float32 or tuple(topk_weights.shape) != (T, K):
                raise ValueError(f"topk_weights must be [{T}, {K}] torch.float")
            if out is not None and (out.dtype != torch.bfloat16 or tuple(out.shape) != (T, H) or
                                    not out.is_contiguous() or out.device != device):
                raise ValueError(f"out must be a contiguous [{T}, {H}] torch.bfloat16 tensor")
        except (TypeError, ValueError) as e:
            self._reject(e, "ll_combine", device)
        with self._lock:
            comm = self._require_comm()
            x = None if zero_copy else _prepare(x, "x")
            topk_idx = _prepare(topk_idx, "topk_idx", topk_idx.element_size())
            topk_weights = _prepare(topk_weights, "topk_weights", 4)
            stream = self._begin(device, None)
            combined = out if out is not None else \
                torch.empty((T, H), dtype=torch.bfloat16, device=device)
            args = L.LowLatencyCombineArgs(_in(x), _in(topk_idx), _IDX_TYPES[topk_idx.dtype],
                                           _in(topk_weights), T, H, K, int(zero_copy),
                                           int(return_recv_hook))
            comm.low_latency_combine(args, handle._epx, _ptr(combined), self._stream_ptr(stream))
            tensors = (x, topk_idx, topk_weights, combined)
            event = self._finish(stream, async_finish, False, tensors)
            hook = self._recv_hook(comm, handle._epx, device, tensors) \
                if return_recv_hook else None
            return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The library's zero-copy combine buffer, as a tensor to write expert
        outputs into before `low_latency_combine(..., zero_copy=True)`.

        Returns:
            buffer: `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank,
                hidden]` torch.bfloat16, a view of library memory (valid until the
                Buffer is destroyed or re-sized).
        """
        _, _, maxT, hidden, num_experts = handle
        comm = self._require_comm()
        ptr = comm.low_latency_combine_buffer()
        shape = (num_experts // comm.info.nranks, comm.info.nranks * maxT, hidden)
        n = shape[0] * shape[1] * shape[2]
        device = handle.device
        if device.type == "cuda":
            t = torch.as_tensor(_DeviceMemory(ptr, shape, "<i2"), device=device)
            return t.view(torch.bfloat16)
        mem = (ctypes.c_char * (2 * n)).from_address(ptr)
        return torch.frombuffer(mem, dtype=torch.bfloat16, count=n).view(shape)


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_nullctx = _NullCtx()

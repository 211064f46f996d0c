"""A thin object layer over epxComm_t / epxHandle_t, with no dependency on torch.

`Communicator` owns one epxComm_t and the epxHandle_t objects made from it.
Its data-path methods take raw addresses (ints) and return what the C call
returns; the torch-facing `epx.Buffer` is built on it, and the tests drive it
directly with ctypes arrays where torch is not installed.
"""

import ctypes
import threading
import weakref

from . import _lib as L

__all__ = ["Communicator", "Handle", "get_unique_id"]

# Free handles kept for reuse per communicator: creating one allocates, so
# the hot path takes them from this pool instead.
_MAX_POOLED_HANDLES = 64


def get_unique_id():
    """epxGetUniqueId(): 128 bytes for epxCommInitRank, made on one rank and
    handed to the others out of band. Starts the rendezvous service here."""
    uid = L.UniqueId()
    L.check(L.lib.epxGetUniqueId(ctypes.byref(uid)), None, "epxGetUniqueId")
    # (the c_char array attribute would stop at the first zero byte)
    return ctypes.string_at(ctypes.addressof(uid), L.UNIQUE_ID_BYTES)


class Handle:
    """One epxHandle_t, owned by a Communicator.

    Dropping the last reference returns the C handle to its communicator's
    pool (reset), so steady-state dispatches never allocate. Using a handle
    after its communicator was destroyed raises epxInvalidUsage's EpxError.
    """

    __slots__ = ("_comm_ref", "_ptr", "_generation", "__weakref__", "meta")

    def __init__(self, comm, ptr):
        self._comm_ref = weakref.ref(comm)
        self._ptr = ptr
        self._generation = comm._generation
        self.meta = {}  # what the Python layer keeps beside the C routing state

    @property
    def ptr(self):
        comm = self._comm_ref()
        if self._ptr is None or comm is None or not comm.alive or \
                comm._generation != self._generation:
            raise L.error_for(L.INVALID_USAGE,
                              "this handle belongs to a communicator that was destroyed or "
                              "re-created (for a larger hidden size, top-k, expert count or "
                              "low-latency token limit); dispatch again", "epx handle")
        return self._ptr

    def info(self):
        """epxHandleGetInfo as a HandleInfo struct."""
        info = L.HandleInfo()
        L.check(L.lib.epxHandleGetInfo(self.ptr, ctypes.byref(info)), None, "epxHandleGetInfo")
        return info

    def reset(self):
        L.check(L.lib.epxHandleReset(self.ptr), None, "epxHandleReset")

    def _release(self):
        ptr, self._ptr = self._ptr, None
        if ptr is None:
            return
        comm = self._comm_ref()
        if comm is not None and comm.alive and comm._generation == self._generation:
            comm._recycle(ptr)
        else:
            # Safe after the communicator is gone: the library checks its registry.
            L.lib.epxHandleDestroy(ptr)

    def __del__(self):
        try:
            self._release()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass


class Communicator:
    """One epx communicator (epxComm_t).

    Create it with `Communicator.init_with_allgather` (the caller supplies an
    all-gather of bytes, e.g. over torch.distributed) or
    `Communicator.init_with_unique_id`. Every data-path method is the C call of
    the same name with raw addresses; see include/epx.h for the semantics.
    One thread at a time (like the C communicator); `abort` from any thread.
    """

    _generations = 0

    def __init__(self, ptr, config):
        self._ptr = ptr
        self.config = config
        Communicator._generations += 1
        self._generation = Communicator._generations
        self._pool = []
        self._lock = threading.Lock()
        info = L.CommInfo()
        L.check(L.lib.epxCommGetInfo(ptr, ctypes.byref(info)), ptr, "epxCommGetInfo")
        self.info = info

    # ---------------------------------------------------------- creation

    @classmethod
    def init_with_allgather(cls, rank, nranks, allgather, config):
        """Collective over the nranks processes.

        allgather(data: bytes) -> sequence of nranks bytes objects (rank order),
        called by this thread during init, possibly several times. An exception
        inside it fails the init; the exception is chained to the EpxError.
        """
        failure = []

        def trampoline(user, sendbuf, recvbuf, nbytes):
            try:
                data = ctypes.string_at(sendbuf, nbytes) if nbytes else b""
                parts = allgather(data)
                if len(parts) != nranks:
                    raise RuntimeError(f"all-gather returned {len(parts)} parts, expected {nranks}")
                for r, part in enumerate(parts):
                    part = bytes(part)
                    if len(part) != nbytes:
                        raise RuntimeError(f"all-gather part {r} has {len(part)} bytes, "
                                           f"expected {nbytes}")
                    ctypes.memmove(recvbuf + r * nbytes, part, nbytes)
                return 0
            except BaseException as e:  # noqa: B036 - must not unwind through C
                failure.append(e)
                return 1

        cb = L.ALLGATHER_FN(trampoline)
        ptr = ctypes.c_void_p()
        res = L.lib.epxCommInitRankWithAllGather(ctypes.byref(ptr), int(nranks), int(rank), cb,
                                                 None, ctypes.byref(config))
        if res != L.SUCCESS:
            err = L.error_for(res, L.last_error(None), "epxCommInitRankWithAllGather")
            raise err from (failure[0] if failure else None)
        return cls(ptr.value, config)

    @classmethod
    def init_with_unique_id(cls, rank, nranks, unique_id, config):
        """epxCommInitRank with the 128 bytes from get_unique_id() on one rank."""
        if len(unique_id) != L.UNIQUE_ID_BYTES:
            raise ValueError(f"unique_id must be {L.UNIQUE_ID_BYTES} bytes")
        uid = L.UniqueId()
        ctypes.memmove(ctypes.addressof(uid), bytes(unique_id), L.UNIQUE_ID_BYTES)
        ptr = ctypes.c_void_p()
        L.check(L.lib.epxCommInitRank(ctypes.byref(ptr), int(nranks), uid, int(rank),
                                      ctypes.byref(config)), None, "epxCommInitRank")
        return cls(ptr.value, config)

    # ---------------------------------------------------------- lifecycle

    @property
    def alive(self):
        return self._ptr is not None

    @property
    def ptr(self):
        if self._ptr is None:
            raise L.error_for(L.INVALID_USAGE, "the communicator was destroyed", "epx")
        return self._ptr

    def destroy(self):
        """epxCommDestroy (local, never blocks on peers). Handles made from this
        communicator become unusable. Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is None:
            return
        with self._lock:
            pool, self._pool = self._pool, []
        for h in pool:
            L.lib.epxHandleDestroy(h)
        L.check(L.lib.epxCommDestroy(ptr), None, "epxCommDestroy")

    def abort(self):
        """epxCommAbort: in-flight and future waits return epxAborted. Any thread."""
        if self._ptr is not None:
            L.check(L.lib.epxCommAbort(self._ptr), self._ptr, "epxCommAbort")

    def async_error(self):
        """epxCommGetAsyncError as an int (0 = none)."""
        v = ctypes.c_int(0)
        L.check(L.lib.epxCommGetAsyncError(self.ptr, ctypes.byref(v)), self._ptr,
                "epxCommGetAsyncError")
        return v.value

    def peer_wait_stats(self, peer):
        """epxCommGetPeerWaitStats as a dict: waits on `peer` past the soft
        timeout (slow_waits), the longest (longest_wait_ns), the last call's number."""
        st = L.PeerWaitStats()
        L.check(L.lib.epxCommGetPeerWaitStats(self.ptr, peer, ctypes.byref(st)), self._ptr,
                "epxCommGetPeerWaitStats")
        return {"slow_waits": st.slow_waits, "longest_wait_ns": st.longest_wait_ns,
                "last_slow_seq": st.last_slow_seq}

    def last_error(self):
        return L.last_error(self._ptr)

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass

    # ---------------------------------------------------------- handles

    def new_handle(self):
        """An Empty Handle (from the pool when one is free)."""
        with self._lock:
            ptr = self._pool.pop() if self._pool else None
        if ptr is None:
            out = ctypes.c_void_p()
            L.check(L.lib.epxHandleCreate(self.ptr, ctypes.byref(out)), self._ptr,
                    "epxHandleCreate")
            ptr = out.value
        return Handle(self, ptr)

    def _recycle(self, ptr):
        # A handle whose send-only phase was never received cannot be reset:
        # destroy it rather than hand out a busy one.
        if L.lib.epxHandleReset(ptr) != L.SUCCESS:
            L.lib.epxHandleDestroy(ptr)
            return
        with self._lock:
            if self._ptr is not None and len(self._pool) < _MAX_POOLED_HANDLES:
                self._pool.append(ptr)
                return
        L.lib.epxHandleDestroy(ptr)

    # ---------------------------------------------------------- data path

    def _check(self, res, fn):
        L.check(res, self._ptr, fn)

    def get_dispatch_layout(self, topk_idx, idx_type, num_tokens, num_topk, layout, stream=None):
        """layout: a Layout struct with the output addresses."""
        self._check(L.lib.epxGetDispatchLayout(self.ptr, topk_idx, idx_type, num_tokens, num_topk,
                                               ctypes.byref(layout), stream),
                    "epxGetDispatchLayout")

    def dispatch_notify(self, args, handle, num_recv_tokens_per_expert=None, stream=None):
        """Returns N_recv; fills the host int array num_recv_tokens_per_expert
        (address or None)."""
        n = ctypes.c_int64(-1)
        self._check(L.lib.epxDispatchNotify(self.ptr, ctypes.byref(args), handle.ptr,
                                            ctypes.byref(n), num_recv_tokens_per_expert, stream),
                    "epxDispatchNotify")
        return n.value

    def dispatch(self, args, handle, outputs, stream=None):
        self._check(L.lib.epxDispatch(self.ptr, ctypes.byref(args), handle.ptr,
                                      ctypes.byref(outputs), stream), "epxDispatch")

    def combine(self, args, handle, outputs, stream=None):
        self._check(L.lib.epxCombine(self.ptr, ctypes.byref(args), handle.ptr,
                                     ctypes.byref(outputs), stream), "epxCombine")

    def low_latency_dispatch(self, args, handle, outputs, stream=None):
        self._check(L.lib.epxLowLatencyDispatch(self.ptr, ctypes.byref(args), handle.ptr,
                                                ctypes.byref(outputs), stream),
                    "epxLowLatencyDispatch")

    def low_latency_combine(self, args, handle, combined_x, stream=None):
        self._check(L.lib.epxLowLatencyCombine(self.ptr, ctypes.byref(args), handle.ptr,
                                               combined_x, stream), "epxLowLatencyCombine")

    def low_latency_recv(self, handle, stream=None):
        self._check(L.lib.epxLowLatencyRecv(self.ptr, handle.ptr, stream), "epxLowLatencyRecv")

    def low_latency_combine_buffer(self):
        """Address of the zero-copy combine buffer [E_local, R * llT, H] BF16."""
        out = ctypes.c_void_p()
        self._check(L.lib.epxLowLatencyGetCombineBuffer(self.ptr, ctypes.byref(out)),
                    "epxLowLatencyGetCombineBuffer")
        return out.value

"""Events and tuning configs with DeepEP V1's names (EventOverlap, Config)."""

from typing import Any, Optional, Tuple

import torch

from . import _lib as L

__all__ = ["EventHandle", "EventOverlap", "Config"]


class EventHandle:
    """A CUDA event recorded on a stream at construction (the current stream by
    default), or, for CPU work (the host backend, which finishes every call
    before returning), an event that is already complete.

    Arguments:
        stream: the `torch.cuda.Stream` to record on; None = the current stream
            when CUDA is initialised, otherwise a completed host event.
    """

    __slots__ = ("event",)

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.event = None
        if stream is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.current_stream()
        if stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def current_stream_wait(self) -> None:
        """Makes `torch.cuda.current_stream()` wait for the event (no-op for host work)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Blocks the host until the event completes (no-op for host work)."""
        if self.event is not None:
            self.event.synchronize()

    def query(self) -> bool:
        return True if self.event is None else self.event.query()


class EventOverlap:
    """Wrapper of an `EventHandle`, as in DeepEP, for overlapping communication
    with computation.

    Attributes:
        event: the captured `EventHandle`, or None when the call was not asynchronous.
        extra_tensors: tensors kept alive until the event is waited for (a
            CUDA-graph-friendly substitute for `Tensor.record_stream`).

    Use ``event.current_stream_wait()``, or ``with event: ...`` to run code on
    the current stream that overlaps the communication and then wait for it.
    """

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current stream waits for the event (the event must exist)."""
        assert self.event is not None, "EventOverlap holds no event (the call was not async)"
        self.event.current_stream_wait()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


class Config:
    """DeepEP's performance-tuning config for normal-mode dispatch and combine.

    epx accepts it everywhere DeepEP does and keeps the values, but its kernels
    size their own chunks: only `num_sms` has a meaning (see
    `Buffer.set_num_sms`). The two size hints return the bytes epx itself
    would allocate (from epxGetSizeHints), so engine code that compares them
    with `Buffer.num_nvl_bytes` keeps working.

    Arguments:
        num_sms: SMs for normal-mode kernels.
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens:
            DeepEP's chunk sizes (recorded, unused by epx).
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256,
                 num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        self.num_sms = int(num_sms)
        self.num_max_nvl_chunked_send_tokens = int(num_max_nvl_chunked_send_tokens)
        self.num_max_nvl_chunked_recv_tokens = int(num_max_nvl_chunked_recv_tokens)
        self.num_max_rdma_chunked_send_tokens = int(num_max_rdma_chunked_send_tokens)
        self.num_max_rdma_chunked_recv_tokens = int(num_max_rdma_chunked_recv_tokens)

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, "
                f"num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
                f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
                f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
                f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})")

    @staticmethod
    def _hints(hidden_bytes: int, num_ranks: int) -> L.SizeHints:
        hidden = max(8, (int(hidden_bytes) // 2 + 7) // 8 * 8)
        cfg = L.default_config(num_experts=max(1, int(num_ranks)), hidden=hidden,
                               ll_max_tokens_per_rank=0)
        return L.size_hints(cfg, int(num_ranks))

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of epx's normal-mode buffers per rank for rows of `hidden_bytes`
        (BF16 hidden = hidden_bytes / 2) and the default max_tokens_per_rank (4096)."""
        return int(self._hints(hidden_bytes, num_ranks).comm_buffer_bytes)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0 within one NVLink domain (up to 8 ranks, as DeepEP), otherwise the
        same figure as `get_nvl_buffer_size_hint` (epx allocates one set)."""
        if int(num_ranks) <= 8:
            return 0
        return self.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)

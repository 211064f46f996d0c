"""ctypes bindings for libepx.so (include/epx.h), with no dependency on torch.

Everything here mirrors the public C header one to one: the structs have the
same fields in the same order, the functions the same arguments. Nothing else
in the package calls the C library directly.

The library is found, in this order:
  1. the path in the environment variable EPX_LIBRARY;
  2. ``libepx.so`` shipped inside this package (what ``pip install .`` builds);
  3. ``build/libepx.so`` of the source tree this file sits in (a checkout used
     with ``PYTHONPATH=python``).
"""

import ctypes
import os
import threading

__all__ = [
    "lib", "load_library", "library_path", "EpxError", "check",
    "ConfigStruct", "SizeHints", "CommInfo", "HandleInfo", "Layout",
    "DispatchArgs", "DispatchOutputs", "CombineArgs", "CombineOutputs",
    "LowLatencyDispatchArgs", "LowLatencyDispatchOutputs", "LowLatencyCombineArgs",
    "UniqueId", "ALLGATHER_FN", "default_config",
]

# ------------------------------------------------------------------ constants

VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH = 0, 1, 0
VERSION_CODE = VERSION_MAJOR * 10000 + VERSION_MINOR * 100 + VERSION_PATCH
CONFIG_MAGIC = 0x45505843
UNIQUE_ID_BYTES = 128

# epxResult_t (values pinned by the header)
SUCCESS = 0
INVALID_ARGUMENT = 1
INVALID_USAGE = 2
SYSTEM_ERROR = 3
CUDA_ERROR = 4
OUT_OF_MEMORY = 5
TIMEOUT = 6
PEER_FAILED = 7
ABORTED = 8
MISMATCH = 9
NOT_SUPPORTED = 10
INTERNAL_ERROR = 11
BOOTSTRAP_ERROR = 12
REMOTE_ERROR = 13

RESULT_NAMES = {
    0: "epxSuccess", 1: "epxInvalidArgument", 2: "epxInvalidUsage", 3: "epxSystemError",
    4: "epxCudaError", 5: "epxOutOfMemory", 6: "epxTimeout", 7: "epxPeerFailed",
    8: "epxAborted", 9: "epxMismatch", 10: "epxNotSupported", 11: "epxInternalError",
    12: "epxBootstrapError", 13: "epxRemoteError",
}

# epxDataType_t
BFLOAT16, FLOAT8_E4M3, FLOAT32, INT32, INT64 = 0, 1, 2, 3, 4
# epxScaleFormat_t
SCALES_NONE, SCALES_FLOAT32, SCALES_UE8M0 = 0, 1, 2
# epxBackend_t
BACKEND_AUTO, BACKEND_HOST, BACKEND_CUDA = 0, 1, 2
BACKEND_NAMES = {0: "auto", 1: "host", 2: "cuda"}
# epxHandleState_t
HANDLE_EMPTY, HANDLE_NORMAL, HANDLE_LOW_LATENCY = 0, 1, 2

# ----------------------------------------------------------------- structs

c_int, c_int64, c_size_t, c_void_p = ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p


class ConfigStruct(ctypes.Structure):
    """epxConfig_t."""
    _fields_ = [
        ("size", c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
        ("backend", c_int), ("ranks_per_node", c_int), ("num_experts", c_int),
        ("hidden", c_int), ("max_topk", c_int), ("max_tokens_per_rank", c_int),
        ("ll_max_tokens_per_rank", c_int), ("num_sms", c_int), ("cuda_device", c_int),
        ("timeout_ms", c_int), ("soft_timeout_ms", c_int), ("bootstrap_timeout_ms", c_int),
    ]


def default_config(**fields):
    """An epxConfig_t equal to EPX_CONFIG_INITIALIZER, with `fields` overridden."""
    c = ConfigStruct(ctypes.sizeof(ConfigStruct), CONFIG_MAGIC, VERSION_CODE, BACKEND_AUTO,
                     0, 0, 0, 8, 4096, 128, 0, -1, 0, 0, 0)
    for k, v in fields.items():
        if not hasattr(c, k):
            raise AttributeError(f"epxConfig_t has no field {k!r}")
        setattr(c, k, v)
    return c


class SizeHints(ctypes.Structure):
    """epxSizeHints_t."""
    _fields_ = [
        ("size", c_size_t), ("comm_buffer_bytes", c_size_t), ("ll_buffer_bytes", c_size_t),
        ("handle_bytes", c_size_t), ("max_recv_tokens", c_int64),
        ("recv_x_bytes_per_row_bf16", c_size_t), ("recv_x_bytes_per_row_fp8", c_size_t),
        ("recv_scales_bytes_per_row_f32", c_size_t), ("recv_scales_bytes_per_row_ue8m0", c_size_t),
        ("ll_recv_rows", c_int64), ("ll_recv_x_bytes_bf16", c_size_t),
        ("ll_recv_x_bytes_fp8", c_size_t), ("ll_recv_scales_bytes_f32", c_size_t),
        ("ll_recv_scales_bytes_ue8m0", c_size_t),
    ]


class UniqueId(ctypes.Structure):
    """epxUniqueId: 128 opaque bytes (a credential: hand it only to the peers)."""
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


class CommInfo(ctypes.Structure):
    """epxCommInfo_t."""
    _fields_ = [
        ("rank", c_int), ("nranks", c_int), ("ranks_per_node", c_int), ("num_nodes", c_int),
        ("num_experts", c_int), ("num_local_experts", c_int), ("hidden", c_int),
        ("max_topk", c_int), ("max_tokens_per_rank", c_int), ("ll_max_tokens_per_rank", c_int),
        ("backend", c_int), ("normal_sms", c_int), ("ll_sms", c_int),
    ]


class PeerWaitStats(ctypes.Structure):
    """epxPeerWaitStats_t."""
    _fields_ = [
        ("slow_waits", ctypes.c_uint64), ("longest_wait_ns", c_int64), ("last_slow_seq", ctypes.c_uint64),
    ]


class HandleInfo(ctypes.Structure):
    """epxHandleInfo_t."""
    _fields_ = [("state", c_int), ("num_tokens", c_int), ("num_topk", c_int),
                ("num_recv_tokens", c_int64), ("recv_pending", c_int)]


class Layout(ctypes.Structure):
    """epxLayout_t."""
    _fields_ = [("num_tokens_per_rank", c_void_p), ("num_tokens_per_node", c_void_p),
                ("num_tokens_per_expert", c_void_p), ("is_token_in_rank", c_void_p)]


class DispatchArgs(ctypes.Structure):
    """epxDispatchArgs_t."""
    _fields_ = [
        ("x", c_void_p), ("x_type", c_int), ("x_scales", c_void_p), ("scale_format", c_int),
        ("topk_idx", c_void_p), ("topk_idx_type", c_int), ("topk_weights", c_void_p),
        ("num_tokens", c_int), ("hidden", c_int), ("num_topk", c_int),
        ("expert_alignment", c_int), ("num_worst_tokens", c_int64),
    ]


class DispatchOutputs(ctypes.Structure):
    """epxDispatchOutputs_t."""
    _fields_ = [
        ("recv_x", c_void_p), ("recv_x_scales", c_void_p), ("recv_topk_idx", c_void_p),
        ("recv_topk_weights", c_void_p), ("recv_src_idx", c_void_p),
        ("recv_rank_prefix", c_void_p), ("num_recv_tokens_per_expert", c_void_p),
        ("num_recv_tokens", c_void_p), ("capacity_rows", c_int64),
    ]


class CombineArgs(ctypes.Structure):
    """epxCombineArgs_t."""
    _fields_ = [("x", c_void_p), ("topk_weights", c_void_p), ("bias", c_void_p * 2),
                ("hidden", c_int), ("num_topk", c_int)]


class CombineOutputs(ctypes.Structure):
    """epxCombineOutputs_t."""
    _fields_ = [("combined_x", c_void_p), ("combined_topk_weights", c_void_p)]


class LowLatencyDispatchArgs(ctypes.Structure):
    """epxLowLatencyDispatchArgs_t."""
    _fields_ = [
        ("x", c_void_p), ("topk_idx", c_void_p), ("topk_idx_type", c_int),
        ("num_tokens", c_int), ("hidden", c_int), ("num_topk", c_int), ("use_fp8", c_int),
        ("round_scale", c_int), ("use_ue8m0", c_int),
        ("cumulative_local_expert_recv_stats", c_void_p), ("return_recv_hook", c_int),
    ]


class LowLatencyDispatchOutputs(ctypes.Structure):
    """epxLowLatencyDispatchOutputs_t."""
    _fields_ = [("recv_x", c_void_p), ("recv_x_scales", c_void_p), ("recv_count", c_void_p),
                ("recv_src_info", c_void_p), ("recv_layout_range", c_void_p)]


class LowLatencyCombineArgs(ctypes.Structure):
    """epxLowLatencyCombineArgs_t."""
    _fields_ = [
        ("x", c_void_p), ("topk_idx", c_void_p), ("topk_idx_type", c_int),
        ("topk_weights", c_void_p), ("num_tokens", c_int), ("hidden", c_int),
        ("num_topk", c_int), ("zero_copy", c_int), ("return_recv_hook", c_int),
    ]


# int (*epxAllGatherFn)(void *user, const void *sendbuf, void *recvbuf, size_t bytes)
ALLGATHER_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p, c_size_t)

# ---------------------------------------------------------------- errors


class EpxError(RuntimeError):
    """An epx call failed. `code` is the epxResult_t value, `result` its name,
    `message` the library's own message (epxCommGetLastError)."""

    def __init__(self, code, message, function=""):
        self.code = int(code)
        self.result = RESULT_NAMES.get(self.code, f"epxResult({self.code})")
        self.message = message
        self.function = function
        where = f"{function}: " if function else ""
        super().__init__(f"{where}{self.result}: {message}" if message else f"{where}{self.result}")


class EpxInvalidArgumentError(EpxError, ValueError):
    """epxInvalidArgument (also a ValueError)."""


class EpxTimeoutError(EpxError, TimeoutError):
    """epxTimeout (also a TimeoutError): the communicator is now unusable."""


class EpxNotSupportedError(EpxError, NotImplementedError):
    """epxNotSupported (also a NotImplementedError)."""


class EpxOutOfMemoryError(EpxError, MemoryError):
    """epxOutOfMemory (also a MemoryError)."""


_ERROR_CLASSES = {
    INVALID_ARGUMENT: EpxInvalidArgumentError,
    TIMEOUT: EpxTimeoutError,
    NOT_SUPPORTED: EpxNotSupportedError,
    OUT_OF_MEMORY: EpxOutOfMemoryError,
}


def error_for(code, message, function=""):
    """The exception object for a failed call (not raised)."""
    return _ERROR_CLASSES.get(int(code), EpxError)(code, message, function)


# -------------------------------------------------------------- loading

_lock = threading.Lock()
_lib = None
_lib_path = None


def _candidates():
    env = os.environ.get("EPX_LIBRARY")
    if env:
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    return [
        os.path.join(here, "libepx.so"),
        os.path.join(os.path.dirname(os.path.dirname(here)), "build", "libepx.so"),
    ]


def _declare(lib):
    P = ctypes.POINTER
    sig = {
        "epxGetErrorString": (ctypes.c_char_p, [c_int]),
        "epxGetVersion": (c_int, [P(c_int)]),
        "epxGetUniqueId": (c_int, [P(UniqueId)]),
        "epxGetSizeHints": (c_int, [P(ConfigStruct), c_int, P(SizeHints)]),
        "epxCommInitRank": (c_int, [P(c_void_p), c_int, UniqueId, c_int, P(ConfigStruct)]),
        "epxCommInitRankWithAllGather": (
            c_int, [P(c_void_p), c_int, c_int, ALLGATHER_FN, c_void_p, P(ConfigStruct)]),
        "epxCommDestroy": (c_int, [c_void_p]),
        "epxCommAbort": (c_int, [c_void_p]),
        "epxCommGetAsyncError": (c_int, [c_void_p, P(c_int)]),
        "epxCommGetLastError": (ctypes.c_char_p, [c_void_p]),
        "epxCommGetInfo": (c_int, [c_void_p, P(CommInfo)]),
        "epxCommGetPeerWaitStats": (c_int, [c_void_p, c_int, P(PeerWaitStats)]),
        "epxHandleCreate": (c_int, [c_void_p, P(c_void_p)]),
        "epxHandleDestroy": (c_int, [c_void_p]),
        "epxHandleGetInfo": (c_int, [c_void_p, P(HandleInfo)]),
        "epxHandleReset": (c_int, [c_void_p]),
        "epxGetDispatchLayout": (c_int, [c_void_p, c_void_p, c_int, c_int, c_int, P(Layout),
                                         c_void_p]),
        "epxDispatchNotify": (c_int, [c_void_p, P(DispatchArgs), c_void_p, P(c_int64),
                                      c_void_p, c_void_p]),
        "epxDispatch": (c_int, [c_void_p, P(DispatchArgs), c_void_p, P(DispatchOutputs),
                                c_void_p]),
        "epxCombine": (c_int, [c_void_p, P(CombineArgs), c_void_p, P(CombineOutputs), c_void_p]),
        "epxLowLatencyDispatch": (c_int, [c_void_p, P(LowLatencyDispatchArgs), c_void_p,
                                          P(LowLatencyDispatchOutputs), c_void_p]),
        "epxLowLatencyCombine": (c_int, [c_void_p, P(LowLatencyCombineArgs), c_void_p, c_void_p,
                                         c_void_p]),
        "epxLowLatencyRecv": (c_int, [c_void_p, c_void_p, c_void_p]),
        "epxLowLatencyGetCombineBuffer": (c_int, [c_void_p, P(c_void_p)]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load_library():
    """Loads libepx.so once and returns the ctypes.CDLL (raises OSError with
    every path tried when none loads)."""
    global _lib, _lib_path
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in _candidates():
            if not os.path.exists(path):
                tried.append(f"{path} (missing)")
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            _declare(lib)
            _lib, _lib_path = lib, path
            return lib
        raise OSError("epx: cannot load libepx.so; tried " + "; ".join(tried) +
                      ". Build it with `make lib` or set EPX_LIBRARY to its path.")


def library_path():
    """Path of the loaded libepx.so."""
    load_library()
    return _lib_path


class _LazyLib:
    def __getattr__(self, name):
        return getattr(load_library(), name)


lib = _LazyLib()


def last_error(comm):
    """epxCommGetLastError(comm) as str (comm may be None)."""
    msg = lib.epxCommGetLastError(comm)
    return msg.decode("utf-8", "replace") if msg else ""


def check(result, comm, function):
    """Raises the matching EpxError when `result` is not epxSuccess. The
    message comes from epxCommGetLastError(comm), read right after the call."""
    if result != SUCCESS:
        raise error_for(result, last_error(comm), function)


def error_string(code):
    s = lib.epxGetErrorString(int(code))
    return s.decode() if s else ""


def version():
    """EPX_VERSION_CODE of the loaded library."""
    v = c_int(0)
    check(lib.epxGetVersion(ctypes.byref(v)), None, "epxGetVersion")
    return v.value


def size_hints(config, nranks):
    """epxGetSizeHints for a ConfigStruct; returns SizeHints."""
    h = SizeHints()
    h.size = ctypes.sizeof(SizeHints)
    check(lib.epxGetSizeHints(ctypes.byref(config), int(nranks), ctypes.byref(h)), None,
          "epxGetSizeHints")
    return h

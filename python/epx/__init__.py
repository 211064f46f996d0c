"""epx: expert-parallel dispatch and combine for Mixture-of-Experts.

`epx.Buffer` follows DeepEP V1's `deep_ep.Buffer` (see `epx.buffer`), and
`import epx.deep_ep as deep_ep` stands in for DeepEP in engine code. The
torch-facing names load torch on first use, so `epx._lib` (the ctypes
bindings) and `epx._comm` (communicators over raw pointers) work without it.
"""

from ._lib import (EpxError, EpxInvalidArgumentError, EpxNotSupportedError,  # noqa: F401
                   EpxOutOfMemoryError, EpxTimeoutError, load_library, library_path)

__version__ = "0.1.0"

_TORCH_NAMES = {
    "Buffer": "buffer", "DispatchHandle": "buffer", "LowLatencyHandle": "buffer",
    "topk_idx_t": "buffer", "EventOverlap": "utils", "EventHandle": "utils", "Config": "utils",
}

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "DispatchHandle",
           "LowLatencyHandle", "EpxError", "EpxInvalidArgumentError", "EpxNotSupportedError",
           "EpxOutOfMemoryError", "EpxTimeoutError", "load_library", "library_path",
           "__version__"]


def __getattr__(name):
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'epx' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_TORCH_NAMES))

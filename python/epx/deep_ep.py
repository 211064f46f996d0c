"""Stand-in for the `deep_ep` module: ``import epx.deep_ep as deep_ep``.

Exposes DeepEP V1's public names (Buffer, Config, EventOverlap, topk_idx_t)
backed by epx; see `epx.Buffer` for what differs.
"""

from .buffer import Buffer, topk_idx_t  # noqa: F401
from .utils import Config, EventHandle, EventOverlap  # noqa: F401

__version__ = "1.2.1+epx"
__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t"]

"""Shared fixtures: the C reference, and pools of rank processes (mpworld)."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
try:  # the installed package (pip install .), else the source tree
    import epx  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(REPO, "python"))

import epx_ref  # noqa: E402
from mpworld import World  # noqa: E402

_worlds = {}


@pytest.fixture(scope="session")
def libepx():
    """The loaded C library (fails, not skips, when it is missing)."""
    import epx
    epx.load_library()
    return epx.library_path()


@pytest.fixture(scope="session")
def reference_path(tmp_path_factory):
    path = epx_ref.build_reference(str(tmp_path_factory.mktemp("ref")))
    if path is None:
        pytest.skip("no C compiler or source tree: the C reference cannot be built")
    return path


@pytest.fixture(scope="session")
def world_factory(libepx, reference_path):
    """get(nranks, mode, device) -> a running World (reused across tests)."""
    env = {"EPX_TEST_REFERENCE": reference_path,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}

    def get(nranks, mode="torch", device="cpu"):
        key = (nranks, mode, device)
        w = _worlds.get(key)
        if w is not None and w.broken:
            w.close()
            w = None
        if w is None:
            w = World(nranks, mode, device, env=env)
            _worlds[key] = w
        return w

    yield get
    for w in _worlds.values():
        w.close()
    _worlds.clear()

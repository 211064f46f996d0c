"""The ctypes layer end to end without torch: one process per rank, the
bootstrap all-gather relayed by the test process (or the unique-id TCP
rendezvous), host backend, checked against the C reference."""

import pytest


@pytest.mark.parametrize("nranks", [2, 3])
def test_dispatch_combine_over_callback_allgather(world_factory, nranks):
    world_factory(nranks, "raw").run("dispatch_combine", seed=nranks)


def test_dispatch_combine_over_unique_id(world_factory):
    world_factory(2, "raw").run("dispatch_combine", seed=5, use_unique_id=True)

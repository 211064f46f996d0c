"""epx.Buffer end to end: one process per rank with torch.distributed (gloo
on CPU -> host backend; nccl on GPUs -> CUDA backend), every output checked
bit for bit against the C reference. Needs torch; skipped without it."""

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the Buffer tests need it "
                            "(the ctypes-layer tests in test_raw.py and test_abi.py still run)")


def _cuda_ranks():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [r for r in (2, 4, 8) if r <= n]


WORLDS = [("cpu", 2), ("cpu", 4)] + [("cuda", r) for r in _cuda_ranks()]
IDS = [f"{d}{r}" for d, r in WORLDS]


@pytest.fixture(params=WORLDS, ids=IDS)
def world(request, world_factory):
    device, nranks = request.param
    return world_factory(nranks, "torch", device)


def test_normal_bf16(world):
    world.run("normal_roundtrip", seed=11)


def test_normal_bf16_int32_topk_no_weights(world):
    world.run("normal_roundtrip", seed=12, idx_dtype="int32", weights=False)


def test_normal_fp8_float_scales(world):
    world.run("normal_roundtrip", seed=13, fp8="f32", H=512)


def test_normal_fp8_ue8m0_scales(world):
    world.run("normal_roundtrip", seed=14, fp8="ue8m0", H=640)


def test_normal_expert_alignment(world):
    world.run("normal_roundtrip", seed=15, alignment=8)


def test_normal_worst_case_rows(world):
    world.run("normal_roundtrip", seed=16, worst=True)


def test_normal_async_finish(world):
    world.run("normal_roundtrip", seed=17, async_finish=True)


def test_normal_two_virtual_nodes(world):
    if world.nranks < 4:
        pytest.skip("two nodes of two ranks need 4 ranks")
    world.run("normal_roundtrip", seed=18, ranks_per_node=2)


def test_low_latency_bf16(world):
    world.run("low_latency_roundtrip", seed=21, use_fp8=False)


def test_low_latency_fp8(world):
    world.run("low_latency_roundtrip", seed=22, use_fp8=True)


def test_low_latency_fp8_round_scale_ue8m0(world):
    world.run("low_latency_roundtrip", seed=23, use_fp8=True, round_scale=True, use_ue8m0=True,
              H=640)


def test_low_latency_hooks_and_out(world):
    world.run("low_latency_roundtrip", seed=24, hook=True, use_out=True, idx_dtype="int32")


def test_low_latency_zero_copy_sized_in_constructor(world):
    world.run("low_latency_roundtrip", seed=25, zero_copy=True, sized_in_constructor=True)


def test_errors_become_exceptions(world):
    world.run("errors_become_exceptions")


def test_resize_and_stale_handles(world):
    world.run("resize_and_stale_handles")


def test_deep_ep_standin(world):
    world.run("deep_ep_standin")

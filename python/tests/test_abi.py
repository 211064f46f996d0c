"""The ctypes mirror of include/epx.h matches the C compiler's layout, and the
library answers the calls that need no peers. No torch needed."""

import ctypes
import os
import shutil
import subprocess

import pytest

import epx
import epx._lib as L

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STRUCTS = {
    "epxConfig_t": L.ConfigStruct, "epxSizeHints_t": L.SizeHints, "epxCommInfo_t": L.CommInfo,
    "epxPeerWaitStats_t": L.PeerWaitStats,
    "epxHandleInfo_t": L.HandleInfo, "epxLayout_t": L.Layout,
    "epxDispatchArgs_t": L.DispatchArgs, "epxDispatchOutputs_t": L.DispatchOutputs,
    "epxCombineArgs_t": L.CombineArgs, "epxCombineOutputs_t": L.CombineOutputs,
    "epxLowLatencyDispatchArgs_t": L.LowLatencyDispatchArgs,
    "epxLowLatencyDispatchOutputs_t": L.LowLatencyDispatchOutputs,
    "epxLowLatencyCombineArgs_t": L.LowLatencyCombineArgs, "epxUniqueId": L.UniqueId,
}


def test_struct_layouts_match_the_header(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    header = os.path.join(REPO, "include", "epx.h")
    if not cc or not os.path.exists(header):
        pytest.skip("no C compiler or no source tree")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "epx.h"', "int main(void) {"]
    for cname, py in STRUCTS.items():
        lines.append(f'printf("sizeof {cname} %zu\\n", sizeof({cname}));')
        for field, _ in py._fields_:
            lines.append(f'printf("offsetof {cname} {field} %zu\\n", offsetof({cname}, {field}));')
    lines.append('printf("EPX_VERSION_CODE %d\\n", EPX_VERSION_CODE);')
    lines.append('epxConfig_t c = EPX_CONFIG_INITIALIZER; const int *p = (const int *)&c.backend;')
    lines.append('for (int i = 0; i < 12; ++i) printf("init %d %d\\n", i, p[i]);')
    lines += ["return 0;", "}"]
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "abi"
    subprocess.check_call([cc, "-std=c11", "-I" + os.path.join(REPO, "include"), str(src),
                           "-o", str(exe)])
    out = subprocess.check_output([str(exe)], text=True).split("\n")
    init = L.default_config()
    init_fields = [f for f, _ in L.ConfigStruct._fields_][3:]
    for line in filter(None, out):
        parts = line.split()
        if parts[0] == "EPX_VERSION_CODE":
            assert int(parts[1]) == L.VERSION_CODE
        elif parts[0] == "init":
            i, v = int(parts[1]), int(parts[2])
            assert getattr(init, init_fields[i]) == v, f"EPX_CONFIG_INITIALIZER {init_fields[i]}"
        elif parts[0] == "sizeof":
            assert ctypes.sizeof(STRUCTS[parts[1]]) == int(parts[2]), f"sizeof({parts[1]})"
        else:
            got = getattr(STRUCTS[parts[1]], parts[2]).offset
            assert got == int(parts[3]), f"offsetof({parts[1]}, {parts[2]})"


def test_version_and_error_strings(libepx):
    assert L.version() == L.VERSION_CODE
    for code in range(L.REMOTE_ERROR + 1):
        assert L.error_string(code)


def test_size_hints(libepx):
    cfg = L.default_config(backend=L.BACKEND_HOST, num_experts=16, hidden=1024,
                           ll_max_tokens_per_rank=32)
    h = L.size_hints(cfg, 4)
    assert h.max_recv_tokens == 4 * 4096
    assert h.recv_x_bytes_per_row_bf16 == 2048 and h.recv_x_bytes_per_row_fp8 == 1024
    assert h.recv_scales_bytes_per_row_f32 == 32 and h.recv_scales_bytes_per_row_ue8m0 == 8
    assert h.ll_recv_rows == 4 * 4 * 32


def test_errors_carry_the_library_message(libepx):
    cfg = L.default_config(num_experts=3, hidden=1024)  # 3 experts on 2 ranks: invalid
    with pytest.raises(epx.EpxInvalidArgumentError) as info:
        L.size_hints(cfg, 2)
    e = info.value
    assert e.code == L.INVALID_ARGUMENT and e.result == "epxInvalidArgument"
    assert "num_experts" in e.message and e.message in str(e)
    assert isinstance(e, ValueError) and isinstance(e, epx.EpxError)


def test_peer_wait_stats(libepx):
    from epx._comm import Communicator
    cfg = L.default_config(backend=L.BACKEND_HOST, num_experts=16, hidden=256, max_tokens_per_rank=64,
                           ll_max_tokens_per_rank=0)
    comm = Communicator.init_with_allgather(0, 1, lambda data: [data], cfg)
    try:
        assert comm.peer_wait_stats(0) == {"slow_waits": 0, "longest_wait_ns": 0, "last_slow_seq": 0}
        with pytest.raises(epx.EpxInvalidArgumentError) as info:
            comm.peer_wait_stats(1)
        assert "peer is 1, not in [0, 1)" in info.value.message
        assert comm.peer_wait_stats(0)["slow_waits"] == 0  # still usable
    finally:
        comm.destroy()

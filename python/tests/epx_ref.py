"""ctypes bindings to the C reference (src/reference/reference.c), for tests.

The reference is built into libepx_ref.a for the C tests with hidden
visibility, so the Python tests compile reference.c once more as a small
shared library of their own (`build_reference`). It computes, from the inputs
of every rank, exactly what one rank must receive: the same bytes the library
must produce.

Addresses are plain ints, so this module needs no torch.
"""

import ctypes
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
c_int, c_int64, c_void_p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p


class RankInput(ctypes.Structure):
    _fields_ = [("num_tokens", c_int), ("topk_idx", c_void_p), ("topk_weights", c_void_p),
                ("x", c_void_p), ("x_scales", c_void_p)]


class World(ctypes.Structure):
    _fields_ = [("nranks", c_int), ("ranks_per_node", c_int), ("num_experts", c_int),
                ("hidden", c_int), ("num_topk", c_int), ("topk_is_int64", c_int),
                ("inputs", ctypes.POINTER(RankInput))]


class DispatchOpts(ctypes.Structure):
    _fields_ = [("x_type", c_int), ("scale_format", c_int), ("expert_alignment", c_int),
                ("num_worst_tokens", c_int64)]


class DispatchResult(ctypes.Structure):
    _fields_ = [("num_recv", c_int64), ("rows", c_int64), ("recv_x", c_void_p),
                ("recv_x_scales", c_void_p), ("recv_topk_idx", c_void_p),
                ("recv_topk_weights", c_void_p), ("recv_src_idx", c_void_p),
                ("recv_src_rank", c_void_p), ("recv_rank_prefix", c_void_p),
                ("rank_prefix_matrix", c_void_p), ("num_recv_tokens_per_expert", c_void_p),
                ("num_recv_tokens_per_expert_raw", c_void_p)]


class CombineInputs(ctypes.Structure):
    _fields_ = [("x", ctypes.POINTER(c_void_p)), ("weights", ctypes.POINTER(c_void_p)),
                ("bias", c_void_p * 2)]


class LLOpts(ctypes.Structure):
    _fields_ = [("max_tokens_per_rank", c_int), ("use_fp8", c_int), ("round_scale", c_int),
                ("use_ue8m0", c_int)]


class LLResult(ctypes.Structure):
    _fields_ = [("rows_per_expert", c_int64), ("recv_x", c_void_p), ("recv_x_scales", c_void_p),
                ("recv_src_info", c_void_p), ("recv_src_rank", c_void_p),
                ("recv_layout_range", c_void_p), ("recv_count", c_void_p)]


def build_reference(out_dir):
    """Compiles reference.c into out_dir/libepx_pyref.so; returns the path, or
    None when there is no compiler or no source tree (tests then skip)."""
    src = os.path.join(REPO, "src", "reference", "reference.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not os.path.exists(src):
        return None
    out = os.path.join(out_dir, "libepx_pyref.so")
    subprocess.check_call([cc, "-shared", "-fPIC", "-O2", "-std=c11", "-D_GNU_SOURCE",
                           "-ffp-contract=off", "-I" + os.path.join(REPO, "include"),
                           "-I" + os.path.join(REPO, "src"), src, "-o", out])
    return out


class Reference:
    """The reference library, loaded from `path`."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        P = ctypes.POINTER
        for name, args in {
            "epx_ref_layout": [P(World), c_int, c_void_p, c_void_p, c_void_p, c_void_p],
            "epx_ref_dispatch": [P(World), c_int, P(DispatchOpts), P(DispatchResult)],
            "epx_ref_combine": [P(World), c_int, P(CombineInputs), c_void_p, c_void_p],
            "epx_ref_ll_dispatch": [P(World), c_int, P(LLOpts), P(LLResult)],
            "epx_ref_ll_combine": [P(World), c_int, c_int, P(c_void_p), c_void_p, c_void_p],
        }.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = c_int, args
        lib.epx_ref_dispatch_free.restype = None
        lib.epx_ref_dispatch_free.argtypes = [P(DispatchResult)]
        lib.epx_ref_ll_free.restype = None
        lib.epx_ref_ll_free.argtypes = [P(LLResult)]
        self.lib = lib

    @staticmethod
    def world(nranks, ranks_per_node, num_experts, hidden, num_topk, topk_is_int64, inputs):
        """inputs: list of (num_tokens, topk_idx, topk_weights, x, x_scales) addresses."""
        arr = (RankInput * nranks)(*[RankInput(*i) for i in inputs])
        w = World(nranks, ranks_per_node, num_experts, hidden, num_topk, int(topk_is_int64),
                  ctypes.cast(arr, ctypes.POINTER(RankInput)))
        w._keep = arr
        return w

    def _ok(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"reference {what} failed")

    def layout(self, w, rank, per_rank, per_node, per_expert, in_rank):
        self._ok(self.lib.epx_ref_layout(ctypes.byref(w), rank, per_rank, per_node, per_expert,
                                         in_rank), "layout")

    def dispatch(self, w, me, x_type, scale_format, expert_alignment, num_worst_tokens):
        """A DispatchResult; free it with dispatch_free."""
        r = DispatchResult()
        self._ok(self.lib.epx_ref_dispatch(ctypes.byref(w), me, ctypes.byref(DispatchOpts(
            x_type, scale_format, expert_alignment, num_worst_tokens)), ctypes.byref(r)),
            "dispatch")
        return r

    def dispatch_free(self, r):
        self.lib.epx_ref_dispatch_free(ctypes.byref(r))

    def combine(self, w, me, xs, weights, bias0, bias1, combined_x, combined_w):
        """xs, weights: per-rank addresses (weights may be None)."""
        n = w.nranks
        xa = (c_void_p * n)(*xs)
        wa = (c_void_p * n)(*weights) if weights is not None else None
        ci = CombineInputs(ctypes.cast(xa, ctypes.POINTER(c_void_p)),
                           ctypes.cast(wa, ctypes.POINTER(c_void_p)) if wa is not None else None,
                           (c_void_p * 2)(bias0, bias1))
        self._ok(self.lib.epx_ref_combine(ctypes.byref(w), me, ctypes.byref(ci), combined_x,
                                          combined_w), "combine")

    def ll_dispatch(self, w, me, max_tokens, use_fp8, round_scale, use_ue8m0):
        r = LLResult()
        self._ok(self.lib.epx_ref_ll_dispatch(ctypes.byref(w), me, ctypes.byref(LLOpts(
            max_tokens, int(use_fp8), int(round_scale), int(use_ue8m0))), ctypes.byref(r)),
            "ll_dispatch")
        return r

    def ll_free(self, r):
        self.lib.epx_ref_ll_free(ctypes.byref(r))

    def ll_combine(self, w, me, max_tokens, expert_outs, topk_weights, combined_x):
        arr = (c_void_p * w.nranks)(*expert_outs)
        self._ok(self.lib.epx_ref_ll_combine(ctypes.byref(w), me, max_tokens, arr, topk_weights,
                                             combined_x), "ll_combine")

"""Compile the Triton kernels for NVIDIA GPUs ahead of time, without a GPU (tests/test_triton.py).

The interpreter checks what the kernels compute; this checks that they compile for real targets
(sm_90 by default, every dtype incl. bf16, every autotune config): Triton lowers them to PTX and runs
the ptxas bundled with its wheel. Needs triton imported in compiled (not interpreter) mode.
`python tests/triton_compile.py [--all] [--arch 80]` compiles the full matrix (takes a while: fp32 dots
in IEEE precision compile slowly); the test compiles a bf16 subset.
"""

from __future__ import annotations

import sys
import time

PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def _compile(kernel, types: dict, consts: dict, config=None, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel.fn if hasattr(kernel, "configs") else kernel
    consts = dict(consts)
    opts = {}
    if config is not None:
        consts.update(config.kwargs)
        opts = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    names = jit.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    src = ASTSource(fn=jit, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def kernels(full: bool, dtypes: tuple = ("bfloat16", "float16", "float32")):
    """(label, kernel, types, constexprs, configs) for every kernel; full=False: one config, fewer variants."""
    from sparsecc.ops.block_sparse_attention import triton as A
    from sparsecc.ops.sparse_ffn import triton as F
    from sparsecc.ops.token_flow import triton as W

    for dt in dtypes:
        p = PTR[dt]
        prec = "ieee" if dt == "float32" else "tf32"
        types = {n: p for n in "Q K V O DO DQ DK DV".split()}
        types.update(LSE="*fp32", DELTA="*fp32", KPM="*u8", IDX="*i32", CNT="*i32", CIDX="*i32", CCNT="*i32",
                     BIAS=p, scale_log2="fp32", scale="fp32")
        flags = [(False, False, False), (True, True, False), (True, False, True)] if full else [(True, True, True)]
        for causal, kpm, bias in flags:
            for bs, bd in ((64, 64), (128, 128), (16, 32)) if full else ((64, 64),):
                consts = dict(BS=bs, BLOCK_D=bd, CAUSAL=causal, HAS_KPM=kpm, HAS_BIAS=bias, PREC=prec)
                for k in (A.tuned("_fwd_kernel"), A.tuned("_bwd_dq_kernel"), A.tuned("_bwd_dkdv_kernel")):
                    cfgs = A._prune(k.configs, {"BS": bs})
                    yield f"attention {k.fn.__name__} {dt} BS={bs} D={bd} causal={causal} kpm={kpm} bias={bias}", \
                        k, types, consts, cfgs if full else cfgs[:1]
        yield f"attention _bwd_delta_kernel {dt}", A._bwd_delta_kernel, dict(O=p, DO=p, DELTA="*fp32"), \
            dict(BLOCK_M=64, BLOCK_D=128), [None]
        ftypes = dict(X=p, LOGITS=p, IDX_IN="*i32", W=p, BIAS=p, WG=p, BG=p, H="*fp32", IDX="*i32", A="*fp32",
                      AG="*fp32", H2="*fp32", W2=p, PART="*fp32", OUT=p, G="*fp32", DW=p)
        for act, gated in ((1, False), (2, True), (3, False), (4, True), (5, True), (6, False)) if full else ((4, True),):
            up = dict(ACT=act, GATED=gated, HAS_BIAS=True, HAS_BGATE=gated, FROM_IDX=False, STORE_PRE=True,
                      BLOCK_NN=32)
            for k, consts in ((F.tuned("_up_gather_kernel"), up), (F.tuned("_up_block_kernel"), dict(up, PREC=prec))):
                yield f"ffn {k.fn.__name__} {dt} act={act} gated={gated}", k, ftypes, consts, \
                    k.configs if full else k.configs[:1]
        for k, consts in ((F.tuned("_down_gather_kernel"), dict(HAS2=True)),
                          (F.tuned("_down_block_kernel"), dict(HAS2=True, HAS_BIAS=True, PREC=prec, BLOCK_NN=32)),
                          (F.tuned("_wgrad_kernel"), dict(PREC=prec, BLOCK_NN=32))):
            yield f"ffn {k.fn.__name__} {dt}", k, ftypes, consts, k.configs if full else k.configs[:1]
        wtypes = dict(X=p, ROWS=p, OUT=p, INDEX="*i64", COUNTS="*i64", MAP="*i32", KEEP="*u8")
        gather, scatter = W.tuned("_gather_kernel"), W.tuned("_scatter_kernel")
        yield f"flow _gather_kernel {dt}", gather, wtypes, {}, gather.configs[:None if full else 1]
        yield f"flow _scatter_kernel {dt}", scatter, wtypes, dict(ACCUMULATE=True), \
            scatter.configs[:None if full else 1]
    yield "flow _route_kernel", W._route_kernel, dict(KEEP="*u8", INDEX="*i64"), dict(BLOCK_L=1024), [None]
    yield "flow _slot_map_kernel", W._slot_map_kernel, dict(INDEX="*i64", COUNTS="*i64", MAP="*i32"), \
        dict(BLOCK_R=256), [None]


def compile_all(full: bool, arch: int = 90, verbose: bool = False,
                dtypes: tuple = ("bfloat16", "float16", "float32")) -> list[str]:
    """Compile every (kernel, variant, config); returns the failures as text (empty: all compiled)."""
    failures = []
    for label, k, types, consts, cfgs in kernels(full, dtypes):
        for cfg in cfgs:
            start = time.perf_counter()
            try:
                _compile(k, types, consts, cfg, arch)
                if verbose:
                    print(f"ok   {label} {cfg} {time.perf_counter() - start:.1f}s", flush=True)
            except Exception as e:  # collected and reported
                failures.append(f"{label} {cfg}: {type(e).__name__}: {str(e)[-2000:]}")
                if verbose:
                    print(f"FAIL {label} {cfg}: {e}", flush=True)
    return failures


if __name__ == "__main__":
    full = "--all" in sys.argv
    arch = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
    bad = compile_all(full, arch, verbose=True)
    print(f"{len(bad)} failures")
    sys.exit(1 if bad else 0)

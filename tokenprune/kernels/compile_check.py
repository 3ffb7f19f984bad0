"""Compile every Triton kernel for a CUDA target without a GPU and report its resource use.

    python -m tokenprune.kernels.compile_check [--arch 90]

Catches what the CPU interpreter lets through (loop-carried types, layouts, shared
memory over the limit) and reports registers / spills per kernel and block size,
read off the cubin with the ``cuobjdump`` that ships with Triton. Needs Triton's
NVIDIA backend (``ptxas``) but no driver. Must run without ``TRITON_INTERPRET``.

Pointers, the row / batch / head strides of the token tensors, the head dim D, the channels C and the
linear-attention chunk are compiled as multiples of 16 (true for real models, where D, C are 64, 768, ...), as
Triton specializes them when it launches on contiguous tensors. Without that hint Triton cannot prove
the loads aligned and compiles no asynchronous copies, so it neither pipelines the loops nor holds the
registers and shared memory those need (sessions 1-6 read their register counts off such builds).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

ALIGNED = re.compile(r"^(s[qkvoxym][bhn]|ox[bn]|D|C|chunk)$")  # token-tensor strides, head dim, channels, chunk


def _configs():
    from . import apet as AP, attention as AT, keep as KP, match as MT, merge as M, pitome as PT, scores as S
    from . import select as SL

    f16, f32 = "*fp16", "*fp32"
    ea_ctx = {"k_ptr": f16, "v_ptr": f16, "bias_ptr": f16, "ctx_ptr": f16, "part_ptr": f32, "m_ptr": f32,
              "l_ptr": f32}
    out, sweep = [], []  # sweep: variants only scripts/gpu_profile.py tries (they may spill)
    ea = AT.EA_CONFIG
    for dp in (64, 128):
        bn1, w1 = ea["pass1"][dp]
        bn2, w2 = ea["pass2"][dp]
        ones_l = bool(AT._cfg(ea["ones_l"], dp))
        for split in (False, True):
            out.append((AT._ea_context, ea_ctx, dict(HAS_BIAS=True, SPLIT=split, IS_F32=False, DP=dp, BLOCK_N=bn1,
                                                     ONES_L=ones_l), w1))
        # other pass-1 tiles and row sums (gpu_profile --ea-fixed sweeps them)
        for bn, ol, w in (((128, False, 4), (64, False, 4), (64, True, 4), (128, True, 8)) if dp == 64 else
                          ((64, True, 8), (64, False, 8), (32, True, 8), (32, False, 8))):
            sweep.append((AT._ea_context, ea_ctx, dict(HAS_BIAS=True, SPLIT=True, IS_F32=False, DP=dp,
                                                       BLOCK_N=bn, ONES_L=ol), w))
        out.append((AT._ea_combine, {"part_ptr": f32, "m_ptr": f32, "l_ptr": f32, "ctx_ptr": f16},
                    dict(DP=dp, SP=32, RB=ea["combine_rows"],
                         SC=ea["combine_tile"] // (ea["combine_rows"] * dp)), 4))
        out.append((AT._ea_apply, {"q_ptr": f16, "ctx_ptr": f16, "o_ptr": f16}, dict(IS_F32=False, DP=dp, BLOCK_N=bn2),
                    w2))
    out.append((AT._ea_context, {**ea_ctx, "k_ptr": f32, "v_ptr": f32, "bias_ptr": f32, "ctx_ptr": f32},
                dict(HAS_BIAS=False, SPLIT=False, IS_F32=True, DP=64, BLOCK_N=32, ONES_L=False), 8))
    for short in ("short", "long"):
        bm, bn, w = AT.BA_CONFIG[short]
        for dp in ((64, 128) if short == "short" else (64,)):  # d = 128 always runs the short tiles
            out.append((AT._ba_fwd, {"q_ptr": f16, "k_ptr": f16, "v_ptr": f16, "bias_ptr": f16, "o_ptr": f16,
                                     "km_ptr": f16, "qk_scale": "fp32"},
                        dict(HAS_BIAS=True, IS_F32=False, DP=dp, BLOCK_M=bm, BLOCK_N=bn), w))
    # with the key mean of ViT-B's 12 heads (the merge's metric) from more programs of the same launch (bs 1; the
    # first merging block has no bias yet)
    bm, bn, w = AT.BA_CONFIG["wide"]
    for has_bias in (True, False):
        out.append((AT._ba_fwd, {"q_ptr": f16, "k_ptr": f16, "v_ptr": f16, "bias_ptr": f16, "o_ptr": f16,
                                 "km_ptr": f16, "qk_scale": "fp32"},
                    dict(HAS_BIAS=has_bias, IS_F32=False, DP=64, BLOCK_M=bm, BLOCK_N=bn, KM_H=12), w))
    out.append((AT._ea_apply, {"q_ptr": f32, "ctx_ptr": f32, "o_ptr": f32}, dict(IS_F32=True, DP=64, BLOCK_N=32), 8))
    for bn in (S.QS_CONFIG["short"], S.QS_CONFIG["long"]):
        out.append((S._qs_logits, {"q_ptr": f16, "k_ptr": f16, "bias_ptr": f16, "lg_ptr": f32, "pm_ptr": f32,
                                   "ps_ptr": f32, "scale": "fp32"}, dict(HAS_BIAS=True, DP=64, BLOCK_N=bn), 4))
    for has_w, has_o in ((True, False), (False, True)):  # given weights; the head norms of o (threshold)
        out.append((S._qs_reduce, {"lg_ptr": f32, "pm_ptr": f32, "ps_ptr": f32, "w_ptr": f32, "out_ptr": f32,
                                   "o_ptr": f16}, dict(H=12, HAS_W=has_w, HAS_O=has_o, DVP=64, NBP=2, BLOCK_N=128), 4))
    bm, bn, w = S.RS_TILES
    for dp in (64, 128):  # Whisper / ViT heads; SigLIP-so400m's 72 pads to 128
        rs = {"q_ptr": f16, "k_ptr": f16, "bias_ptr": f16, "lse_ptr": f32, "scale": "fp32"}
        out.append((S._rs_lse, rs, dict(HAS_BIAS=True, IS_F32=False, DP=dp, BM=bm, BN=bn), w))
        out.append((S._rs_cols, {**rs, "valid_ptr": "*u8", "out_ptr": f32},
                    dict(HAS_BIAS=True, HAS_VALID=True, IS_F32=False, DP=dp, BM=bm, BN=bn), w))
    for is32 in (False, True):
        out.append((MT._bm_best, {"m_ptr": f32 if is32 else f16, "vb_ptr": "*u8", "best_ptr": f32, "idx_ptr": "*i64"},
                    dict(H=1, HAS_VALID=True, IS_F32=is32, DP=64, BM=32 if is32 else 64, BN=32 if is32 else 64), 4))
    # merge_step's four-launch matching: padding read off the sizes, partners into its int32 scratch; with the keys
    # of Whisper-large's 20 heads (eager batch 1 reads them per head: the head mean's division by H)
    for h in (1, 20):
        out.append((MT._bm_best, {"m_ptr": f16, "vb_ptr": f32, "best_ptr": f32, "idx_ptr": "*i32"},
                    dict(H=h, HAS_VALID=True, IS_F32=False, DP=64, BM=64, BN=64), 4))
    for hs in (True, False):
        out.append((M._merge_rows, {"x_ptr": f16, "s_ptr": f32, "prim_ptr": "*i32", "start_ptr": "*i32",
                                    "cnt_ptr": "*i32", "mem_ptr": "*i32", "o_ptr": f16},
                    dict(HAS_SIZES=hs, HAS_MEMBERS=hs, PRIM_IN_SUM=True, BC=1024), 4))
    keep_ptrs = {"x_ptr": f16, "sc_ptr": f32, "s_ptr": f32, "src_ptr": "*i64", "ox_ptr": f16, "os_ptr": f32,
                 "osrc_ptr": "*i64", "idx_ptr": "*i64", "scr_ptr": "*i32", "th_ptr": f32, "cnt_ptr": f32,
                 "rk_ptr": "*i8", "TH": "fp32"}
    for np_, w in ((256, 4), (1024, 8), (2048, 8), (4096, 16)):
        for thresh in ((0, 2) if np_ in (256, 2048) else (0,)):  # 2: threshold's batch-1 stage (theta on the device)
            for ranked in ((False, True) if np_ >= 2048 and not thresh else (False,)):  # ranked: _keep_rank's set
                out.append((KP._keep_step, keep_ptrs, dict(WRITE_X=True, HAS_SIZES=True, HAS_SOURCE=True,
                                                           THRESH=thresh, RANKED=ranked, NP=np_, PP=1, RT=64,
                                                           BC=KP.KEEP_STEP_BC, BS=256), w))
    out.append((KP._keep_step, dict(keep_ptrs, sc_ptr="*i1"),  # diverse's stage: its own bool selection, ranked
                dict(WRITE_X=True, HAS_SIZES=False, HAS_SOURCE=False, THRESH=0, RANKED=True, NP=256, PP=1, RT=64,
                     BC=KP.KEEP_STEP_BC, BS=256), 4))
    out.append((KP._keep_rank, {"sc_ptr": f32, "rk_ptr": "*i8"}, dict(BR=KP.KEEP_RANK_BR, BT=KP.KEEP_RANK_BT), 4))
    for lowp in (True, False):
        out.append((AP._apet_merge, {"x_ptr": f16, "s_ptr": f32, "t_ptr": "*i64", "keep_ptr": "*i64", "src_ptr": "*i64",
                                     "ox_ptr": f16, "os_ptr": f32, "osrc_ptr": "*i64"},
                    dict(HAS_SIZES=True, HAS_SOURCE=True, LOWP=lowp, PP=1, BK=128, BI=64, BC=AP.APET_MERGE_BC,
                         BS=256), 8))
    ms_types = {"x_ptr": f16, "y_ptr": f16, "m_ptr": f16, "s_ptr": f32, "src_ptr": "*i64", "ox_ptr": f16,
                "os_ptr": f32, "osrc_ptr": "*i64", "scr_ptr": "*i32", "bst_ptr": f32, "mt_ptr": "*i32", "ob_ptr": f16,
                "rows_ptr": "*i32", "perm_ptr": "*i64"}
    def bt(mode, nbp, lowp=True):  # the one launch's (MODE 0) matching tile, as merge_step picks it
        return dict(BT=M._match_tile(nbp, lowp) if mode == 0 else 32)

    for lowp in (True, False):
        for mode, bc, warps, has_y in ((0, 32, M.MERGE_STEP_WARPS, False), (0, 32, M.MERGE_STEP_WARPS, True),
                                       (2, 32, M.MERGE_STEP_SPLIT["mwarps"], False)):
            if lowp is False and mode != 0:
                continue
            out.append((M._merge_step, ms_types,
                        dict(HAS_SIZES=True, HAS_Y=has_y, PADDED=True, HAS_SOURCE=True, IS_F32=False, LOWP=lowp,
                             NAP=128, NBP=128,
                             DP=64, BC=bc, BS=256, PP=1, MODE=mode, LOG_SIZES=True, H=12, **bt(mode, 128, lowp)),
                        warps))
    # compiled calls: the key mean as an op first (H 1: the B tiles prefetched)
    out.append((M._merge_step, ms_types, dict(HAS_SIZES=True, HAS_Y=True, PADDED=False, HAS_SOURCE=True, IS_F32=False,
                                              LOWP=True, NAP=128, NBP=128, DP=64, BC=32, BS=256, PP=1, MODE=0,
                                              LOG_SIZES=True, H=1, **bt(0, 128)), M.MERGE_STEP_WARPS))
    # large batches above the SM count: MODE 2 under merge_step's register cap ("maxnreg" is a compiler option, not a
    # constant; it spills: 46 local ld/st before session 8, 72-78 with the head loop unrolled, 50 / 54 now)
    capped = [(M._merge_step, ms_types, dict(HAS_SIZES=True, HAS_Y=False, PADDED=True, HAS_SOURCE=True, IS_F32=False,
                                             LOWP=True, NAP=128, NBP=128, DP=64, BC=32, BS=256, PP=1, BT=32, MODE=2,
                                             LOG_SIZES=True, H=h, maxnreg=M.MERGE_STEP_SPLIT["mmaxnreg"]),
               M.MERGE_STEP_SPLIT["mwarps"]) for h in (12, 1)]
    # pitome's steps (the rows read through its order; ViT-B at budget 0.25: 12-24 candidates, ~180 kept rows)
    for mode, nap, warps in ((0, 16, M.MERGE_STEP_WARPS), (2, 16, M.MERGE_STEP_SPLIT["mwarps"]),
                             (0, 64, M.MERGE_STEP_WARPS)):
        out.append((M._merge_step, ms_types,
                    dict(HAS_SIZES=True, HAS_Y=True, PADDED=False, HAS_SOURCE=True, IS_F32=False, LOWP=True, NAP=nap,
                         NBP=nap, DP=64, BC=32, BS=256, PP=256, MODE=mode, LOG_SIZES=True, PERM=True, H=12,
                         **bt(mode, nap)),
                    warps))  # pitome's metric: the keys per head, as merge's
    for perm in (False, True):
        out.append((M._merge_plan, {"rk_ptr": "*i32", "s_ptr": f32, "src_ptr": "*i64", "os_ptr": f32,
                                    "osrc_ptr": "*i64", "scr_ptr": "*i32", "mt_ptr": "*i32", "ob_ptr": f16,
                                    "rows_ptr": "*i32", "perm_ptr": "*i64"},
                    dict(HAS_SIZES=True, HAS_SOURCE=True, LOG_SIZES=True, NAP=1024, BA=M.MERGE_PLAN_TILES[0], BS=256,
                         PP=1, PERM=perm), M.MERGE_PLAN_TILES[1]))
        br, bt, rw = M.MERGE_RANK_TILES
        out.append((MT._merge_rank, {"bp_ptr": f32, "ip_ptr": "*i32", "s_ptr": f32, "perm_ptr": "*i64",
                                    "rk_ptr": "*i32", "mt_ptr": "*i32"},
                    dict(S=M.MERGE_BEST_SPLIT, HAS_SIZES=True, PADDED=True, PERM=perm, NAP=1024, BR=br, BT=bt), rw))
    # (ONE False: above 128 merged tokens, the fix-up in tiles of MERGE_GATHER_TILE)
    for (lowp, rp, fbc, one), has_y, perm in itertools.product(
            ((True, 16, 64, True), (True, 64, 128, True), (True, 128, 128, True), (False, 16, 32, True),
             (True, M.MERGE_GATHER_TILE, 128, False), (False, M.MERGE_GATHER_TILE, 32, False)),
            (False, True), (False, True)):
        if perm and not (lowp and has_y):
            continue
        out.append((M._merge_gather, {"x_ptr": f16, "y_ptr": f16, "s_ptr": f32, "mt_ptr": "*i32", "rows_ptr": "*i32",
                                      "ox_ptr": f16, "perm_ptr": "*i64"},
                    dict(HAS_SIZES=True, HAS_Y=has_y, LOWP=lowp, NAP=1024 if not one else 128, RP=rp,
                         RB=M.MERGE_STEP_SPLIT["rb"], BC=M.MERGE_STEP_SPLIT["gbc"], BCF=fbc, PERM=perm, ONE=one),
                    M.MERGE_STEP_SPLIT["gwarps"] if rp <= 64 and one else 8))
    # the long step in one launch at batch 1 (Whisper-large: the key mean given, up to 64 merged tokens; PERM: pitome)
    for perm, valid in ((False, False), (True, True)):
        br, bt, _ = M.MERGE_RANK_TILES
        out.append((M._merge_long, {"x_ptr": f16, "y_ptr": f16, "s_ptr": f32, "src_ptr": "*i64", "ox_ptr": f16,
                                    "os_ptr": f32, "osrc_ptr": "*i64", "scr_ptr": "*i32", "bst_ptr": f32,
                                    "mt_ptr": "*i32", "ob_ptr": f16, "rows_ptr": "*i32", "perm_ptr": "*i64",
                                    "ip_ptr": "*i32", "rk_ptr": "*i32", "m_ptr": f16, "vb_ptr": f32, "ctr_ptr": "*i32"},
                    dict(H=1, HAS_VALID=valid, IS_F32=False, DP=64, BM=64, BN=64, VEC=1, S=M.MERGE_BEST_SPLIT,
                         HAS_SIZES=True, PADDED=valid, PERM=perm, NAP=1024, BR=br, BT=bt, HAS_SOURCE=True,
                         LOG_SIZES=True, BA=M.MERGE_PLAN_TILES[0], BS=256, PP=1, HAS_Y=True, LOWP=True, RP=64,
                         RB=M.MERGE_STEP_SPLIT["rb"], BC=M.MERGE_STEP_SPLIT["gbc"], BCF=M.MERGE_STEP_SPLIT["fbc"],
                         ONE=True), M.MERGE_LONG_WARPS))
    cfg = PT.PITOME_ORDER_CONFIG
    for is32, padded in ((False, False), (False, True), (True, False)):
        out.append((PT._pitome_order, {"m_ptr": f32 if is32 else f16, "s_ptr": f32, "e_ptr": f32, "perm_ptr": "*i64",
                                       "margin": "fp32"},
                    dict(PADDED=padded, IS_F32=is32, DP=64, BR=cfg["br_f32" if is32 else "br"], BT=cfg["bt"], PP=1,
                         H=12),
                    cfg["warps"]))
    out.append((AP._apet_err, {"x_ptr": f16, "w_ptr": f32, "s_ptr": f32, "e_ptr": f32}, dict(KP=16, BN=64, BC=64), 8))
    # ApET stage from the Gram matrix (ViT-B: N=196 -> NP=256; the one-program limit N=1024; k=10 and 32)
    out.append((AP._gram, {"x_ptr": f16, "g_ptr": f32}, dict(IS_F32=False, BM=128, BK=32), 8))  # BK=64 spills
    # small batches; built as launched: the channel stride is 1, which Triton specialises as a constant
    out.append((AP._gram, {"x_ptr": f16, "g_ptr": f32}, dict(IS_F32=False, BM=64, BK=64, sxc=1), 4))
    out.append((AP._gram, {"x_ptr": f32, "g_ptr": f32}, dict(IS_F32=True, BM=64, BK=16), 4))
    for (np_, kp, w), select in itertools.product(((256, 16, 8), (256, 32, 8), (1024, 32, 8)),  # 4 warps at 256 spill
                                                  (False, True)):  # True: apet_step's (valid from the sizes)
        out.append((AP._apet_stage, {"g_ptr": f32, "v_ptr": f32 if select else "*u8", "basis_ptr": "*i64",
                                     "e_ptr": f32, "idx_ptr": "*i64", "eps": "fp32", "pmin": "fp32"},
                    dict(HAS_VALID=True, SELECT=select, NP=np_, KP=kp, BT=min(np_, max(4, 8192 // np_)), BR=64), w))
    out.append((AP._apet_assign, {"g_ptr": f32, "keep_ptr": "*i64", "t_ptr": "*i64"}, dict(BM=64, BK=64), 8))
    # DivPrune's max-min selection: ViT-B's 196 tokens (BN 256), Qwen2.5-VL's up to 2048, the one-program limit
    for bn in (256, 2048, SL.MAX_N):
        out.append((SL._max_min, {"g_ptr": f32, "v_ptr": "*i8", "w_ptr": f32, "o_ptr": "*i8"},
                    dict(HAS_VALID=True, HAS_W=True, BN=bn, BJ=max(1, 4096 // bn), enable_fp_fusion=False),
                    4 if bn <= 1024 else 8))
    # SigLIP's head dim 72: D and the strides are not multiples of 16, so no int is compiled aligned ("D72"); the
    # kernels take them divided by VEC = 8 (_triton_common._vec) and must still load 16 bytes at a time
    bm, bn, w = AT.BA_CONFIG["short"]
    out.append((AT._ba_fwd, {"q_ptr": f16, "k_ptr": f16, "v_ptr": f16, "bias_ptr": f16, "o_ptr": f16,
                             "km_ptr": f16, "qk_scale": "fp32"},
                dict(HAS_BIAS=True, IS_F32=False, DP=128, BLOCK_M=bm, BLOCK_N=bn, VEC=8, D72=True), w))
    bm, bn, w = S.RS_TILES
    out.append((S._rs_lse, {"q_ptr": f16, "k_ptr": f16, "bias_ptr": f16, "lse_ptr": f32, "scale": "fp32"},
                dict(HAS_BIAS=False, IS_F32=False, DP=128, BM=bm, BN=bn, VEC=8, D72=True), w))
    out.append((MT._bm_best, {"m_ptr": f16, "vb_ptr": f32, "best_ptr": f32, "idx_ptr": "*i32"},
                dict(H=1, HAS_VALID=False, IS_F32=False, DP=128, BM=64, BN=64, VEC=8, D72=True), 4))
    return [(*c, False) for c in out + capped] + [(*c, True) for c in sweep]


def check(arch: int = 90, verbose: bool = True) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for fn, types, consts, warps, sweep_only in _configs():
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
        d72 = consts.pop("D72", False)
        opts = {"num_warps": warps, **{o: consts.pop(o) for o in ("maxnreg", "enable_fp_fusion") if o in consts}}
        sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and (sig[a].startswith("*") or (ALIGNED.match(a) and not d72))}
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options=opts)
        row = {"kernel": fn.__name__, "config": dict(consts, **opts, **({"D72": True} if d72 else {})),
               "shared": k.metadata.shared, "sweep_only": sweep_only,
               "compile_s": round(time.perf_counter() - t0, 2)}  # (a cache hit: ~0; TRITON_CACHE_DIR for cold)
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(k.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "--dump-sass", f.name], capture_output=True, text=True).stdout
            os.unlink(f.name)
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            if m:
                row["registers"], row["stack"] = int(m.group(1)), int(m.group(2))
            row["hgmma"] = sass.count("HGMMA")
            row["async_copies"] = sass.count("LDGSTS")
            row["local_ld_st"] = sass.count("LDL") + sass.count("STL")
            row["wide_loads"] = len(re.findall(r"\bLDG(?:STS)?\.E(?:\.BYPASS)?\.128\b", sass))
            row["narrow_loads"] = len(re.findall(r"\bLDG\.E\.(?:U16|16|U8|8)\b", sass))
            row["div_checks"] = sass.count("FCHK")  # IEEE divisions' range checks: a called slow path where they flag
        rows.append(row)
        if verbose:
            print(f"{row['kernel']:<12} {row['config']}  shared {row['shared']}  regs {row.get('registers')}  "
                  f"stack {row.get('stack')}  HGMMA {row.get('hgmma')}  LDGSTS {row.get('async_copies')}  "
                  f"LDL/STL {row.get('local_ld_st')}  16-byte / 2-byte loads {row.get('wide_loads')} / "
                  f"{row.get('narrow_loads')}  FCHK {row.get('div_checks')}  {row['compile_s']} s"
                  + ("  (sweep variant)" if sweep_only else ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    check(ap.parse_args().arch)


if __name__ == "__main__":
    sys.exit(main())

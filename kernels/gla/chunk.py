"""Chunked gated linear attention over the flat varlen batch: linrec's Triton prefill, in place in the pool.

The math is prefill.py's (torch `chunk_gla`): within a chunk of BT tokens, with b_t = sum_{r <= t} g_r the
per-channel cumulative log decay from the chunk start (inclusive) and S_0 the state before the chunk,
    o_t = scale * ( (q_t * exp(b_t)) S_0 + sum_{s <= t} A[t, s] v_s ),  A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)
    S_BT = diag(exp b_last) S_0 + sum_s (k_s * exp(b_last - b_s))^T v_s
Every exponent below is a difference that is <= 0, so nothing overflows however fast the state forgets:
a chunk's per-channel decays may sum far below -88, where the factorised q*exp(b) . k*exp(-b) would give
inf * 0 = nan.

Four kernels with fixed block sizes. No autotune: the state kernel updates the pool in place, so a tuning
rerun would apply the update twice, and no request may wait on a tuning sweep.

1. `_chunk_cumsum_kernel`, one program per (sequence, KV head, K block), writes b, chunk by chunk, into
   the scratch `gc` [T, Hk, K]. tl.cumsum sits alone in its kernel, as in fla's own cumsum kernels:
   beside tl.sum it has miscompiled (triton-lang/triton#3017, still open).
2. `_chunk_state_kernel`, one program per (sequence, KV head, K block, V block), walks its sequence chunk
   by chunk: it reads the initial state tile from pool row slot_ids[b] (no gather), stores the state at
   each chunk start into the scratch `h` [B + T // BT, Hk, K, V], and writes the final state back into
   the same pool row (no scatter). Exponents: b_last - b_s <= 0 and b_last <= 0.
3. `_chunk_scores_kernel`, one program per (sub-chunk of BC tokens, query head), writes its rows of the
   scratch `A` [T, H, BT] (the scores against the keys of its own chunk):
   - the BC x BC diagonal block elementwise over [BC, BC, BKD] slabs of K: exp(b_t - b_s) only where
     s <= t (elsewhere the exponent is replaced by 0 and the score by 0);
   - each earlier sub-chunk of the chunk as one dot, through the reference point r = b_{p-1}, the
     cumulative decay just before the sub-chunk's first token p:
         exp(b_t - b_s) = exp(b_t - r) * exp(r - b_s),  both <= 0 for s < p <= t.
   Sub-chunks bound the elementwise exp work to BT * BC * K per chunk instead of BT * BT * K.
4. `_chunk_output_kernel`, one program per (chunk, query head, V block): (q * exp(b)) @ h_chunk plus the
   causal A @ v, times scale, stored in v's dtype. Exponent: b_t <= 0.

GQA: query head h reads KV head h // (H // Hk) for k, v, g and the state; A is per query head.
Null slot: a sequence whose slot is 0 or negative reads and writes no state and outputs zeros, as in the
decode kernel (decode.py). Real slots must be distinct within a batch (each program owns its pool tiles).

Programs find their sequence without a host-built index: block j of sequence b (blocks of BLK tokens from
the sequence start) is program b + bos_b // BLK + j. That is injective (it grows by at least one per block
and per sequence) and below B + T // BLK, so the grid is that bound, and a program finds its sequence by
counting the sequences with b + cu_seqlens[b] // BLK <= its id; an id past a sequence's end (at most one
per sequence) exits at once. Nothing is cached by tensor identity: a cu_seqlens buffer refilled in place
is read afresh, and nothing is read back to the host.

Precision: every tile is fp32 in registers, and dots take fp32 operands: ieee fp32 when q, k and v are all
fp32 (what the torch path and the decode kernels compute, so an fp32 engine gives the same tokens whether a
prompt is prefilled in one chunk or token by token; Liger-GLA's recurrent inputs are always fp32), tf32
otherwise (bf16/fp16 models; tf32 keeps 10 mantissa bits where fla's chunk_gla rounds to bf16's 7). No dot
takes bf16 operands, so the interpreter (CI) runs the GPU's arithmetic up to the tf32 rounding.

Blocks (launch_config) were chosen from register counts of the sm_90 build (cuobjdump, no GPU needed),
not from timings, none measured yet: at K, V in {16, 64, 96, 128, 256, 512}, fp32 and bf16 inputs, every
kernel compiles without spills under triton 3.6.0 (ptxas 12.8) and 3.9.0 (ptxas 12.9), at most 230
registers a thread (state kernel), 24-36 KiB shared memory for the output kernel. What drove the choice:
- tile offsets are int32 from scalar int64 base pointers advanced per chunk; 64-bit pointer tiles kept
  live across the chunk loop had the first versions at 255 registers and spilling.
- ieee dots run on FMA units with whole operand rows in registers: the output kernel slices K by 16 and
  V by 32 for them (K 32, V 64 for tf32, which runs on wgmma at BT = 64 with 8 warps).
- the state kernel keeps a 32 x 32 state tile (K, V blocks of 32, so more programs share the sequential
  walk) and 64 x 32 chunk tiles at 4 warps.
- the scores kernel holds q and the decayed q as BC x K (K up to 256) and [16, 16, 16] slabs for the
  diagonal at 4 warps, one pipeline stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch

CHUNK_SIZE = 64  # BT: tokens per chunk, the stride of the stored states
SUB_CHUNK_SIZE = 16  # BC: tokens per sub-chunk of the scores (the smallest tl.dot dimension)
SEARCH_BLOCK = 64  # sequences read at once when a program looks up its sequence


@triton.jit
def _locate(cu_ptr, pid, B, BLK: tl.constexpr, SEARCH: tl.constexpr):
    """Program `pid` -> (sequence b, its first token, its end, block j of b): b is the last sequence with
    b + cu[b] // BLK <= pid (see the module docstring); j * BLK may be past the sequence's end."""
    count = 0
    for start in range(0, B, SEARCH):
        offs = start + tl.arange(0, SEARCH)
        m = offs < B
        starts = tl.load(cu_ptr + offs, mask=m, other=0).to(tl.int64)
        count += tl.sum((m & (offs + starts // BLK <= pid)).to(tl.int32), axis=0)
    i_b = count - 1
    bos = tl.load(cu_ptr + i_b).to(tl.int64)
    eos = tl.load(cu_ptr + i_b + 1).to(tl.int64)
    j = pid - (i_b + bos // BLK)
    return i_b, bos, eos, j


@triton.jit
def _chunk_cumsum_kernel(
    g_ptr,
    slot_ptr,
    cu_ptr,
    gc_ptr,
    stride_gt,
    stride_gh,
    stride_ct,
    stride_ch,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_hk = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + i_b)
    if slot > 0:
        bos = tl.load(cu_ptr + i_b).to(tl.int64)
        L = tl.load(cu_ptr + i_b + 1).to(tl.int64) - bos
        o_t = tl.arange(0, BT)
        o_k = tl.program_id(2) * BK + tl.arange(0, BK)
        m_k = o_k < K
        # scalar base pointers advance by a chunk; the tile offsets stay int32 and loop-invariant
        p_g = g_ptr + bos * stride_gt + i_hk * stride_gh
        p_c = gc_ptr + bos * stride_ct + i_hk * stride_ch
        off_g = o_t[:, None] * stride_gt + o_k[None, :]
        off_c = o_t[:, None] * stride_ct + o_k[None, :]
        for c in range(0, tl.cdiv(L, BT)):
            m_tk = ((c * BT + o_t) < L)[:, None] & m_k[None, :]
            b_g = tl.load(p_g + off_g, mask=m_tk, other=0.0).to(tl.float32)
            tl.store(p_c + off_c, tl.cumsum(b_g, axis=0), mask=m_tk)
            p_g += BT * stride_gt
            p_c += BT * stride_ct


@triton.jit
def _chunk_state_kernel(
    k_ptr,
    v_ptr,
    state_ptr,
    slot_ptr,
    cu_ptr,
    h_ptr,
    gc_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_sn,
    stride_sh,
    stride_sk,
    stride_hn,
    stride_hh,
    stride_hk,
    stride_ct,
    stride_ch,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_hk = tl.program_id(1).to(tl.int64)
    i_kv = tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    if slot > 0:
        bos = tl.load(cu_ptr + i_b).to(tl.int64)
        L = tl.load(cu_ptr + i_b + 1).to(tl.int64) - bos
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_s = state_ptr + slot * stride_sn + i_hk * stride_sh
        off_s = o_k[:, None] * stride_sk + o_v[None, :]
        b_s = tl.load(p_s + off_s, mask=m_kv, other=0.0).to(tl.float32)  # [BK, BV]
        p_h = h_ptr + (i_b + bos // BT) * stride_hn + i_hk * stride_hh
        p_k = k_ptr + bos * stride_kt + i_hk * stride_kh
        p_v = v_ptr + bos * stride_vt + i_hk * stride_vh
        p_c = gc_ptr + bos * stride_ct + i_hk * stride_ch
        off_h = o_k[:, None] * stride_hk + o_v[None, :]
        off_k = o_t[:, None] * stride_kt + o_k[None, :]
        off_v = o_t[:, None] * stride_vt + o_v[None, :]
        off_c = o_t[:, None] * stride_ct + o_k[None, :]
        for c in range(0, tl.cdiv(L, BT)):
            tl.store(p_h + off_h, b_s, mask=m_kv)  # the state at the chunk's start
            m_t = (c * BT + o_t) < L
            m_tk = m_t[:, None] & m_k[None, :]
            b_b = tl.load(p_c + off_c, mask=m_tk, other=0.0)  # [BT, BK] cumulative decay from the chunk start
            b_last = tl.load(p_c + (tl.minimum(L - c * BT, BT) - 1) * stride_ct + o_k, mask=m_k, other=0.0)
            b_k = tl.load(p_k + off_k, mask=m_tk, other=0.0).to(tl.float32)
            b_v = tl.load(p_v + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
            # exponent <= 0 (rows past the end load b = 0 and k = 0: a finite exp(b_last) times 0)
            b_kd = b_k * tl.exp(b_last[None, :] - b_b)
            b_s = b_s * tl.exp(b_last)[:, None]
            b_s = tl.dot(tl.trans(b_kd), b_v, b_s, input_precision=PRECISION)
            p_h += stride_hn
            p_k += BT * stride_kt
            p_v += BT * stride_vt
            p_c += BT * stride_ct
        # Every load of the pool tile completes before any thread overwrites it (threads may hold replicas).
        tl.debug_barrier()
        tl.store(p_s + off_s, b_s, mask=m_kv)


@triton.jit(do_not_specialize=["B"])  # one build whatever the batch size
def _chunk_scores_kernel(
    q_ptr,
    k_ptr,
    gc_ptr,
    slot_ptr,
    cu_ptr,
    a_ptr,
    B,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_ch,
    stride_at,
    stride_ah,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BKD: tl.constexpr,
    SEARCH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_h = tl.program_id(1).to(tl.int64)
    i_b, bos, eos, j = _locate(cu_ptr, tl.program_id(0), B, BC, SEARCH)
    L = eos - bos
    slot = tl.load(slot_ptr + i_b)
    if (j * BC < L) & (slot > 0):
        i_hk = i_h // GROUP
        i_i = j % (BT // BC)  # the sub-chunk's place in its chunk
        t0 = bos + j * BC  # its first token
        o_c = tl.arange(0, BC)
        m_t = (j * BC + o_c) < L
        p_q = q_ptr + t0 * stride_qt + i_h * stride_qh
        p_k = k_ptr + t0 * stride_kt + i_hk * stride_kh
        p_c = gc_ptr + t0 * stride_ct + i_hk * stride_ch
        p_a = a_ptr + t0 * stride_at + i_h * stride_ah
        off_a = o_c[:, None] * stride_at + o_c[None, :]
        # Diagonal block, elementwise over [BC, BC, BKD] slabs of K: exp(b_t - b_s) only where s <= t
        # (elsewhere the exponent is set to 0, then the score to 0).
        causal = m_t[:, None] & (o_c[:, None] >= o_c[None, :])
        b_a = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, (K + BKD - 1) // BKD):
            o_kd = i_k * BKD + tl.arange(0, BKD)
            m_td = m_t[:, None] & (o_kd < K)[None, :]
            b_qd = tl.load(p_q + o_c[:, None] * stride_qt + o_kd[None, :], mask=m_td, other=0.0).to(tl.float32)
            b_kd = tl.load(p_k + o_c[:, None] * stride_kt + o_kd[None, :], mask=m_td, other=0.0).to(tl.float32)
            b_bd = tl.load(p_c + o_c[:, None] * stride_ct + o_kd[None, :], mask=m_td, other=0.0)
            exponent = tl.where(causal[:, :, None], b_bd[:, None, :] - b_bd[None, :, :], 0.0)
            b_a += tl.sum(b_qd[:, None, :] * b_kd[None, :, :] * tl.exp(exponent), axis=2)
        b_a = tl.where(causal, b_a, 0.0)
        tl.store(p_a + i_i * BC + off_a, b_a, mask=m_t[:, None])
        # The earlier sub-chunks of the chunk (all full), through r = b at the token before this sub-chunk.
        if i_i > 0:
            o_k = tl.arange(0, BK)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            b_q = tl.load(p_q + o_c[:, None] * stride_qt + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            b_bq = tl.load(p_c + o_c[:, None] * stride_ct + o_k[None, :], mask=m_tk, other=0.0)
            b_r = tl.load(p_c - stride_ct + o_k, mask=m_k, other=0.0)
            b_qr = b_q * tl.exp(tl.where(m_t[:, None], b_bq - b_r[None, :], 0.0))  # exponent <= 0
            off_k = o_c[:, None] * stride_kt + o_k[None, :]
            off_c = o_c[:, None] * stride_ct + o_k[None, :]
            m_jk = (o_c >= 0)[:, None] & m_k[None, :]
            for jj in range(0, i_i):
                back = (i_i - jj) * BC  # tokens from sub-chunk jj's start to this one's
                b_kj = tl.load(p_k - back * stride_kt + off_k, mask=m_jk, other=0.0).to(tl.float32)
                b_bj = tl.load(p_c - back * stride_ct + off_c, mask=m_jk, other=0.0)
                b_kr = b_kj * tl.exp(b_r[None, :] - b_bj)  # exponent <= 0; [BC, BK]
                b_a = tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
                tl.store(p_a + jj * BC + off_a, b_a, mask=m_t[:, None])


@triton.jit(do_not_specialize=["B"])
def _chunk_output_kernel(
    q_ptr,
    v_ptr,
    gc_ptr,
    h_ptr,
    a_ptr,
    slot_ptr,
    cu_ptr,
    o_ptr,
    B,
    scale,
    stride_qt,
    stride_qh,
    stride_vt,
    stride_vh,
    stride_ct,
    stride_ch,
    stride_hn,
    stride_hh,
    stride_hk,
    stride_at,
    stride_ah,
    stride_ot,
    stride_oh,
    K: tl.constexpr,
    V: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SEARCH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_h = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    i_b, bos, eos, c = _locate(cu_ptr, tl.program_id(0), B, BT, SEARCH)
    L = eos - bos
    if c * BT < L:
        t0 = bos + c * BT  # the chunk's first token
        o_t = tl.arange(0, BT)
        o_v = i_v * BV + tl.arange(0, BV)
        m_t = (c * BT + o_t) < L
        m_v = o_v < V
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        slot = tl.load(slot_ptr + i_b)
        if slot > 0:
            i_hk = i_h // GROUP
            o_k = tl.arange(0, BK)
            p_q = q_ptr + t0 * stride_qt + i_h * stride_qh
            p_c = gc_ptr + t0 * stride_ct + i_hk * stride_ch
            p_h = h_ptr + (i_b + bos // BT + c) * stride_hn + i_hk * stride_hh
            off_q = o_t[:, None] * stride_qt + o_k[None, :]
            off_c = o_t[:, None] * stride_ct + o_k[None, :]
            off_h = o_k[:, None] * stride_hk + o_v[None, :]
            for i_k in range(0, (K + BK - 1) // BK):
                m_k = (i_k * BK + o_k) < K
                m_tk = m_t[:, None] & m_k[None, :]
                b_q = tl.load(p_q + i_k * BK + off_q, mask=m_tk, other=0.0).to(tl.float32)
                b_b = tl.load(p_c + i_k * BK + off_c, mask=m_tk, other=0.0)
                b_h = tl.load(p_h + i_k * BK * stride_hk + off_h, mask=m_k[:, None] & m_v[None, :], other=0.0)
                b_o = tl.dot(b_q * tl.exp(b_b), b_h, b_o, input_precision=PRECISION)  # exponent <= 0
            causal = m_t[:, None] & (o_t[:, None] >= o_t[None, :])
            p_a = a_ptr + t0 * stride_at + i_h * stride_ah
            b_a = tl.load(p_a + o_t[:, None] * stride_at + o_t[None, :], mask=causal, other=0.0)
            p_v = v_ptr + t0 * stride_vt + i_hk * stride_vh
            m_tv = m_t[:, None] & m_v[None, :]
            b_v = tl.load(p_v + o_t[:, None] * stride_vt + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_o = tl.dot(b_a, b_v, b_o, input_precision=PRECISION)
            b_o = b_o * scale
        p_o = o_ptr + t0 * stride_ot + i_h * stride_oh + o_t[:, None] * stride_ot + o_v[None, :]
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def dot_precision(*xs: torch.Tensor) -> str:
    """tl.dot precision for fp32 operands: ieee when every input is fp32, else tf32 (see the docstring)."""
    return "ieee" if all(x.dtype == torch.float32 for x in xs) else "tf32"


def launch_config(K: int, V: int, precision: str) -> dict[str, dict[str, int]]:
    """Per kernel, the fixed block sizes (powers of two, >= 16 where they feed tl.dot) and launch options
    for head dims K, V and the dot precision. Chosen from register counts (module docstring), not timings."""
    pow_k, pow_v = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    # ieee dots run on FMA units with whole operand rows in registers: thinner K slices, smaller V blocks
    out_bk, out_bv, out_stages = (16, 32, 1) if precision == "ieee" else (32, 64, 2)
    return {
        "cumsum": {"BK": min(32, pow_k), "num_warps": 4},
        "state": {"BK": min(32, pow_k), "BV": min(32, pow_v), "num_warps": 4, "num_stages": 2},
        "scores": {"BK": pow_k, "BKD": 16, "num_warps": 4, "num_stages": 1},
        "output": {"BK": min(out_bk, pow_k), "BV": min(out_bv, pow_v), "num_warps": 8, "num_stages": out_stages},
    }


def chunk_gla_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    batch: ForwardBatch,
    scale: float = 1.0,
) -> torch.Tensor:
    """The arguments and result of gla_varlen's prefill, on the Triton kernels (CUDA, or the CPU under
    TRITON_INTERPRET=1). q [T, H, K]; k, g [T, Hk, K] (g the log decay, <= 0); v [T, Hk, V]; state
    [N, Hk, K, V] fp32, row slot_ids[b] read as sequence b's initial state and overwritten with its final
    state in place; slot 0 or negative: no state read or written, output rows zero. Returns o [T, H, V] in
    v's dtype.
    """
    T, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    if k.shape != (T, Hk, K) or g.shape != (T, Hk, K) or v.shape[0] != T or state.shape[1:] != (Hk, K, V):
        raise ValueError(
            f"expected k and g {(T, Hk, K)}, v [{T}, {Hk}, V], state [N, {Hk}, {K}, V]; got k {tuple(k.shape)}, "
            f"g {tuple(g.shape)}, v {tuple(v.shape)}, state {tuple(state.shape)}"
        )
    if state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError(
            f"expected an fp32 state with contiguous rows, got {state.dtype} strides {tuple(state.stride())}"
        )
    B = batch.num_seqs
    if batch.num_tokens != T:
        raise ValueError(f"expected {batch.num_tokens} tokens for the batch's sequences, got T={T}")
    o = q.new_empty(T, H, V, dtype=v.dtype)
    if T == 0:
        return o
    q, k, v, g = (_last_dim_contiguous(x) for x in (q, k, v, g))
    cu_seqlens = batch.cu_seqlens.to(device=q.device, dtype=torch.int64)
    slot_ids = batch.slot_ids.to(device=q.device, dtype=torch.int64)
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    precision = dot_precision(q, k, v)
    # Scratch: chunk-local cumulative decays, the state at each chunk start, the intra-chunk scores.
    gc = torch.empty(T, Hk, K, dtype=torch.float32, device=q.device)
    h = torch.empty(B + T // BT, Hk, K, V, dtype=torch.float32, device=q.device)
    A = torch.empty(T, H, BT, dtype=torch.float32, device=q.device)

    group = H // Hk
    cfg = launch_config(K, V, precision)
    c = cfg["cumsum"]
    _chunk_cumsum_kernel[(B, Hk, triton.cdiv(K, c["BK"]))](
        g, slot_ids, cu_seqlens, gc, g.stride(0), g.stride(1), gc.stride(0), gc.stride(1), K=K, BT=BT, **c
    )
    c = cfg["state"]
    _chunk_state_kernel[(B, Hk, triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]))](
        k,
        v,
        state,
        slot_ids,
        cu_seqlens,
        h,
        gc,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        gc.stride(0),
        gc.stride(1),
        K=K,
        V=V,
        BT=BT,
        PRECISION=precision,
        **c,
    )
    _chunk_scores_kernel[(B + T // BC, H)](
        q,
        k,
        gc,
        slot_ids,
        cu_seqlens,
        A,
        B,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        gc.stride(0),
        gc.stride(1),
        A.stride(0),
        A.stride(1),
        K=K,
        GROUP=group,
        BT=BT,
        BC=BC,
        SEARCH=SEARCH_BLOCK,
        PRECISION=precision,
        **cfg["scores"],
    )
    c = cfg["output"]
    _chunk_output_kernel[(B + T // BT, H, triton.cdiv(V, c["BV"]))](
        q,
        v,
        gc,
        h,
        A,
        slot_ids,
        cu_seqlens,
        o,
        B,
        float(scale),
        q.stride(0),
        q.stride(1),
        v.stride(0),
        v.stride(1),
        gc.stride(0),
        gc.stride(1),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        A.stride(0),
        A.stride(1),
        o.stride(0),
        o.stride(1),
        K=K,
        V=V,
        GROUP=group,
        BT=BT,
        SEARCH=SEARCH_BLOCK,
        PRECISION=precision,
        **c,
    )
    return o

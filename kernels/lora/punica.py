"""LoRA shrink and expand over tokens grouped by adapter slot: the Triton kernels (Punica's SGMV idea).

Both kernels share one grid, (cdiv(T, BLOCK_M) * cdiv(N, BLOCK_N), S), that depends only on the static
shapes, so a CUDA graph can capture them: program (m-block, n-block, slot s) owns rows
sorted_token_ids[slot_starts[s] + m-block] and returns at once when its m-block lies past the slot's
token count. Unadapted tokens sit after slot_starts[S] and no program reads or writes them.

    shrink:  shrunk[t] = A[s] x[t]           x [T, in], A [S, R, in]  -> shrunk [T, R] fp32
    expand:  y[t] = y[t] + B[s] shrunk[t]    B [S, out, R], y [T, out] in place, one rounding to y's dtype

Every tile is cast to fp32 before tl.dot, and the dot runs in IEEE fp32 (not TF32): the delta is the fp32
one the naive reference computes. tl.dot needs block dims >= 16, so the rank block is padded to
max(16, next_pow2(R)) under masks. No autotune: expand updates y in place, and a rerun would add twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:  # the mapping is built in kernels/lora/__init__.py, which imports this module
    from linrec.kernels.lora import LoraMapping

# input features per step of the shrink's reduction, and output features per expand program
BLOCK_K = 32
BLOCK_N = 64


def _block_m(num_tokens: int) -> int:
    """Token rows per program: 16 to 64, from the static T (decode batches are small; a slot rarely holds
    more rows than the whole batch)."""
    return min(64, max(16, triton.next_power_of_2(num_tokens)))


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@triton.jit
def _slot_rows(sorted_ids_ptr, slot_starts_ptr, slot, i_m, BLOCK_M: tl.constexpr):
    """Rows (token indices) of m-block i_m of `slot`'s group, their mask, and the group's token count. Past the
    group's end the mask is all False and nothing is read."""
    start = tl.load(slot_starts_ptr + slot)
    count = tl.load(slot_starts_ptr + slot + 1) - start
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < count
    tokens = tl.load(sorted_ids_ptr + start + o_m, mask=m_m, other=0).to(tl.int64)
    return tokens, m_m, count


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    sorted_ids_ptr,
    slot_starts_ptr,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_ot,
    stride_or,
    K,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_r_blocks = tl.cdiv(R, BLOCK_R)
    i_m = tl.program_id(0) // num_r_blocks
    i_r = tl.program_id(0) % num_r_blocks
    slot = tl.program_id(1).to(tl.int64)
    tokens, m_m, count = _slot_rows(sorted_ids_ptr, slot_starts_ptr, slot, i_m, BLOCK_M)
    if i_m * BLOCK_M >= count:
        return
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        x_ptrs = x_ptr + tokens[:, None] * stride_xt + o_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(x_ptrs, mask=m_m[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        a_ptrs = (
            a_ptr + slot * stride_as + o_r[None, :].to(tl.int64) * stride_ar + o_k[:, None].to(tl.int64) * stride_ak
        )
        b_a = tl.load(a_ptrs, mask=m_k[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_R]
        acc += tl.dot(b_x, b_a, input_precision="ieee")
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + o_r[None, :].to(tl.int64) * stride_or
    tl.store(out_ptrs, acc, mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _expand_kernel(
    shrunk_ptr,
    b_ptr,
    y_ptr,
    sorted_ids_ptr,
    slot_starts_ptr,
    stride_st,
    stride_sr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    N,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    i_m = tl.program_id(0) // num_n_blocks
    i_n = tl.program_id(0) % num_n_blocks
    slot = tl.program_id(1).to(tl.int64)
    tokens, m_m, count = _slot_rows(sorted_ids_ptr, slot_starts_ptr, slot, i_m, BLOCK_M)
    if i_m * BLOCK_M >= count:
        return
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_r = tl.arange(0, BLOCK_R)  # the whole rank in one block: R <= BLOCK_R
    m_r = o_r < R
    s_ptrs = shrunk_ptr + tokens[:, None] * stride_st + o_r[None, :].to(tl.int64) * stride_sr
    b_s = tl.load(s_ptrs, mask=m_m[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_R]
    b_ptrs = b_ptr + slot * stride_bs + o_n[None, :].to(tl.int64) * stride_bn + o_r[:, None].to(tl.int64) * stride_br
    b_b = tl.load(b_ptrs, mask=m_r[:, None] & m_n[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
    delta = tl.dot(b_s, b_b, input_precision="ieee")
    m_y = m_m[:, None] & m_n[None, :]
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + o_n[None, :].to(tl.int64) * stride_yn
    b_y = tl.load(y_ptrs, mask=m_y, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (b_y + delta).to(y_ptr.dtype.element_ty), mask=m_y)


def triton_lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
    """x [T, in]; lora_a [S, R, in]. Returns shrunk [T, R] fp32: A[s] x[t] on adapted rows, zeros on the
    others. Shapes are checked by linrec.kernels.lora.lora_shrink."""
    T, K = x.shape
    S, R = lora_a.shape[0], lora_a.shape[1]
    out = x.new_zeros(T, R, dtype=torch.float32)
    if T == 0 or S == 0:
        return out
    block_m, block_r = _block_m(T), _block_r(R)
    grid = (triton.cdiv(T, block_m) * triton.cdiv(R, block_r), S)
    _shrink_kernel[grid](
        x,
        lora_a,
        out,
        mapping.sorted_token_ids,
        mapping.slot_starts,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        out.stride(0),
        out.stride(1),
        K,
        R,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=BLOCK_K,
    )
    return out


def triton_lora_expand_(y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, mapping: LoraMapping) -> None:
    """y [T, out] += B[s] shrunk[t] in place on adapted rows (fp32 sum, one rounding to y's dtype); other rows
    are not touched. shrunk [T, R] fp32; lora_b [S, out, R]. Shapes are checked by
    linrec.kernels.lora.lora_expand_."""
    T, N = y.shape
    S, R = lora_b.shape[0], lora_b.shape[2]
    if T == 0 or S == 0:
        return
    block_m = _block_m(T)
    grid = (triton.cdiv(T, block_m) * triton.cdiv(N, BLOCK_N), S)
    _expand_kernel[grid](
        shrunk,
        lora_b,
        y,
        mapping.sorted_token_ids,
        mapping.slot_starts,
        shrunk.stride(0),
        shrunk.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        y.stride(0),
        y.stride(1),
        N,
        R,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_R=_block_r(R),
    )

"""Torch forms of the SSD op that the CPU (and any device without the Triton kernels) runs.

chunk_ssd: the chunked state space dual form for one sequence. Within a chunk of Q tokens the
recurrence is a masked attention-like product (C_l . B_s weighted by the decay from s to l); across
chunks only the [H, P, N] state is carried, so the cost is O(T Q) instead of T sequential steps.
ssd_step: one token for each of B sequences at once (the decode step).
Both compute in fp32 and match naive_ssd up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linrec.kernels.ssd.naive import check_ssd_shapes


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., Q] -> [..., Q, Q] with out[..., l, s] = a_{s+1} + ... + a_l for s <= l and -inf above the diagonal.

    Summing the masked increments directly (instead of subtracting two running sums) keeps the
    exponent exact to rounding even when the running sum is large, as it is for fast-decaying heads.
    """
    Q = a.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    increments = a[..., :, None].expand(*a.shape, Q)  # [..., i, s] = a_i
    increments = increments.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)  # keep i > s
    sums = increments.cumsum(dim=-2)  # [..., l, s] = sum over s < i <= l
    return sums.masked_fill(~torch.tril(ones), float("-inf"))


def chunk_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, same arguments and results as naive_ssd: y [T, H, P] fp32, final state [H, P, N] fp32."""
    heads_per_group = check_ssd_shapes(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"expected chunk_size >= 1, got {chunk_size}")
    T, H, P = x.shape
    N = B.shape[2]
    Q = chunk_size
    num_chunks = -(-T // Q)
    pad = num_chunks * Q - T

    # Padded tokens have dt = 0: decay exp(0) = 1 and input 0, so they leave the state as it was.
    xf = x.float()
    dtf = dt.float()
    log_decay = F.pad(dtf * A.float(), (0, 0, 0, pad))  # [T', H]
    x_dt = F.pad(xf * dtf[..., None], (0, 0, 0, 0, 0, pad))  # [T', H, P]
    Bh = F.pad(B.float().repeat_interleave(heads_per_group, dim=1), (0, 0, 0, 0, 0, pad))  # [T', H, N]
    Ch = F.pad(C.float().repeat_interleave(heads_per_group, dim=1), (0, 0, 0, 0, 0, pad))  # [T', H, N]

    # c = chunk, l and s = positions in a chunk (target, source), h = head, p = headdim, n = dstate
    log_decay = log_decay.view(num_chunks, Q, H).transpose(1, 2)  # [c, h, l]
    x_dt = x_dt.view(num_chunks, Q, H, P)
    Bh = Bh.view(num_chunks, Q, H, N)
    Ch = Ch.view(num_chunks, Q, H, N)
    cumulative = log_decay.cumsum(dim=-1)  # [c, h, l]: log decay from the chunk start to l

    # Within a chunk: y_l = sum_{s <= l} exp(a_{s+1} + ... + a_l) (C_l . B_s) x_s dt_s
    decay_s_to_l = torch.exp(_segment_sums(log_decay))  # [c, h, l, s]
    scores = torch.einsum("clhn,cshn->chls", Ch, Bh) * decay_s_to_l
    y = torch.einsum("chls,cshp->clhp", scores, x_dt)

    # What each chunk adds to the state at its end, and how much the state entering it decays across it
    decay_to_end = torch.exp(cumulative[..., -1:] - cumulative)  # [c, h, l]
    chunk_inputs = torch.einsum("chl,clhn,clhp->chpn", decay_to_end, Bh, x_dt)  # [c, H, P, N]
    chunk_decay = torch.exp(cumulative[..., -1])  # [c, h]

    h = (
        initial_state.float().clone()
        if initial_state is not None
        else torch.zeros(H, P, N, dtype=torch.float32, device=x.device)
    )
    entering = []
    for c in range(num_chunks):
        entering.append(h)
        h = chunk_decay[c][:, None, None] * h + chunk_inputs[c]
    entering_states = torch.stack(entering)  # [c, H, P, N]

    # The state entering a chunk reaches position l decayed by exp(a_0 + ... + a_l).
    y = y + torch.einsum("clhn,chpn->clhp", Ch, entering_states) * torch.exp(cumulative).transpose(1, 2)[..., None]
    y = y.reshape(num_chunks * Q, H, P)[:T]
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y, h


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences. x [B, H, P]; dt [B, H]; A [H]; B, C [B, G, N]; D [H] or None;
    state [B, H, P, N]. Returns y [B, H, P] fp32 and the new state [B, H, P, N] fp32 (state is not modified).
    """
    heads_per_group = check_ssd_shapes(x, dt, A, B, C)  # the batch axis stands where T stands
    if state.shape != (*x.shape, B.shape[2]):
        raise ValueError(f"expected state of shape {(*x.shape, B.shape[2])}, got {tuple(state.shape)}")
    xf, dtf = x.float(), dt.float()
    Bh = B.float().repeat_interleave(heads_per_group, dim=1)  # [B, H, N]
    Ch = C.float().repeat_interleave(heads_per_group, dim=1)  # [B, H, N]
    decay = torch.exp(dtf * A.float())  # [B, H]
    new_state = decay[..., None, None] * state.float() + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y, new_state

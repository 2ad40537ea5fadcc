"""`linrec bench kernels` and `linrec bench decode`: the decode path against its physical limit and its peers.

bench kernels: each decode kernel (gated delta rule, Mamba2 SSD, GLA with one state per head and with one
state per KV head, Liger's window ring, the fused Liger step, the short-conv update) at batch 1/8/64/256 on
a 1.3B-class layer shape (KERNEL_SHAPES), timed beside its peers in one run. A decode step is memory bound:
it reads and writes every state it advances (recurrent state, ring, conv state) and reads its inputs once,
so the figure of merit is the achieved bandwidth (bytes moved / time) as a share of the device's measured
copy bandwidth (a large tensor copy timed the same way, read + write bytes). Peers: linrec's torch path and
fla-core's fused_recurrent kernels (gated delta rule, GLA; CUDA only), both with the gather/scatter of
states the in-place kernel avoids; transformers' torch selective_state_update for Mamba2; for the Liger
step, the window and GLA kernels as two launches.

bench decode: end-to-end decode tokens/s of linrec's engine at batch 1/8/64/256 on a 1.3B-class random
model against HF transformers `generate` on the same weights (for Liger-GLA, the ORIGINAL Llama with its
KV cache). Decode alone is isolated by difference: a run generating 1 + n tokens minus a run generating 1
token, with the same prompts, on each side.

`--size small` (a tiny config, batch 1 and 2) exists so CI can smoke-test both on a CPU in seconds. CPU
figures are not performance figures, and Triton kernels on the CPU run under TRITON_INTERPRET=1, whose
times mean nothing: the JSON says so in `note`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from linrec.bench.throughput import BENCH_FAMILIES, Workload, _hf_peer, run_hf, run_linrec, write_bench_model

SIZES = ("small", "1.3b")
DEFAULT_BATCH_SIZES = {"small": (1, 2), "1.3b": (1, 8, 64, 256)}
DECODE_FORMAT_VERSION = 1

# Per-layer op shapes of 1.3B-class models:
#   gated_delta      fla's Gated DeltaNet 1.3B (hidden 2048: 6 heads of K=256, V=512)
#   ssd              Mamba2-1.3B (hidden 2048, expand 2: 64 heads of P=64, dstate 128, one group)
#   gla              fla's GLA 1.3B (hidden 2048, 4 heads, expand_k 0.5, expand_v 1: K=256, V=512; one state a head)
#   gla_grouped      Liger-GLA's recurrent branch on Llama-3.2-1B (32 query heads, 8 KV heads, head_dim 64):
#                    one state per KV head serves a group of 4 query heads
#   window           Liger's 64-key ring on Llama-3.2-1B's heads
#   liger_step       the fused Liger step (ring + GLA + mix) on Llama-3.2-1B's heads, and liger_step_d128 on
#                    Llama-3-8B's (32/8 heads of 128), where the fused kernel's register tiles are largest
#   short_conv       Mamba2-1.3B's conv1d update (conv_dim 4096 + 2 * 128 = 4352 channels, kernel 4)
KERNEL_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "1.3b": {
        "gated_delta": {"H": 6, "HV": 6, "K": 256, "V": 512},
        "ssd": {"H": 64, "P": 64, "G": 1, "N": 128},
        "gla": {"H": 4, "Hk": 4, "K": 256, "V": 512},
        "gla_grouped": {"H": 32, "Hk": 8, "K": 64, "V": 64},
        "window": {"H": 32, "Hk": 8, "D": 64, "W": 64},
        "liger_step": {"H": 32, "Hk": 8, "D": 64, "W": 64},
        "liger_step_d128": {"H": 32, "Hk": 8, "D": 128, "W": 64},
        "short_conv": {"D": 4352, "W": 4},
    },
    "small": {
        "gated_delta": {"H": 2, "HV": 2, "K": 16, "V": 16},
        "ssd": {"H": 2, "P": 8, "G": 1, "N": 16},
        "gla": {"H": 2, "Hk": 2, "K": 16, "V": 32},
        "gla_grouped": {"H": 4, "Hk": 2, "K": 16, "V": 16},
        "window": {"H": 4, "Hk": 2, "D": 16, "W": 8},
        "liger_step": {"H": 4, "Hk": 2, "D": 16, "W": 8},
        "liger_step_d128": {"H": 4, "Hk": 2, "D": 32, "W": 8},
        "short_conv": {"D": 48, "W": 4},
    },
}

# Model overrides of bench.throughput's bench configs: 1.3B-class (random weights, written once) and tiny.
DECODE_MODEL_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "1.3b": {
        # ~1.2B parameters: Llama shape with GQA (served as Liger-GLA, peer: this Llama under HF generate)
        "liger_gla": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 128,
        },
        # Mamba2-1.3B's shape
        "mamba2": {"hidden_size": 2048, "num_hidden_layers": 48, "num_heads": 64, "head_dim": 64, "state_size": 128},
    },
    "small": {
        "liger_gla": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 300,
        },
        "mamba2": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 16,
            "state_size": 16,
            "n_groups": 2,
            "chunk_size": 16,
            "vocab_size": 300,
        },
    },
}

NOTE_GPU = "CUDA: absolute times and bandwidth shares are meaningful"
NOTE_CPU = (
    "CPU smoke run: not a performance figure; Triton kernels, if listed, ran under TRITON_INTERPRET=1 and their "
    "times mean nothing"
)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"expected size in {SIZES}, got {size!r}")


def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"expected batch sizes >= 1, got {list(batch_sizes)}")
    return sizes


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8,64' -> (1, 8, 64)."""
    try:
        return _check_batch_sizes([int(p) for p in text.split(",") if p.strip()])
    except ValueError:
        raise ValueError(f"expected comma-separated batch sizes >= 1 such as 1,8,64, got {text!r}") from None


# -- bench kernels -----------------------------------------------------------------------------------


def time_per_call(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> float:
    """Seconds per call of fn: CUDA events around `repeats` back-to-back calls on a GPU, wall time on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def copy_bandwidth(device, num_bytes: int, repeats: int) -> float:
    """Bytes per second of dst.copy_(src) over a num_bytes fp32 tensor, counting read + write."""
    import torch

    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds


@dataclass
class KernelRow:
    kernel: str  # a key of KERNEL_SHAPES[size]
    impl: str  # what ran
    batch: int
    seconds: float  # per decode step of one layer
    bytes_moved: int  # states read + written, inputs read, outputs written (the same for every impl)
    gb_per_s: float  # bytes_moved / seconds / 1e9
    share_of_copy: float  # gb_per_s over the measured copy bandwidth
    is_interpreted: bool = False  # a Triton kernel under TRITON_INTERPRET=1: its time is not a performance figure


@dataclass
class KernelsResult:
    device: str
    size: str
    interpreted: bool  # Triton ran under TRITON_INTERPRET=1 (times meaningless)
    copy_gb_per_s: float
    shapes: dict[str, dict[str, int]]
    rows: list[KernelRow]
    skipped: list[str] = field(default_factory=list)  # impls not run here, with the reason
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        lines = [
            f"device: {self.device}, size {self.size}; copy bandwidth {self.copy_gb_per_s:.1f} GB/s; {self.note}",
            "",
            f"{'kernel':<16} {'impl':<56} {'batch':>5} {'us/step':>10} {'KB moved':>10} {'GB/s':>8} {'of copy':>8}",
        ]
        for r in self.rows:
            impl = f"{r.impl} [interpreter]" if r.is_interpreted else r.impl
            lines.append(
                f"{r.kernel:<16} {impl:<56} {r.batch:>5} {r.seconds * 1e6:>10.1f} {r.bytes_moved / 1e3:>10.1f} "
                f"{r.gb_per_s:>8.1f} {r.share_of_copy:>7.1%}"
            )
        if any(r.is_interpreted for r in self.rows):
            lines.append(
                "[interpreter]: Triton under TRITON_INTERPRET=1 on the CPU; the time is NOT a performance figure"
            )
        lines += [f"skipped: {s}" for s in self.skipped]
        return "\n".join(lines)


def _gated_delta_cases(shape: dict[str, int], batch: int, device, run_triton: bool, run_fla: bool):
    """(impl name, fn) for one decode step of one layer, and the bytes that step must move."""
    import torch
    import torch.nn.functional as F

    from linrec.kernels.gated_delta.decode import gated_delta_decode_triton
    from linrec.kernels.gated_delta.prefill import gated_delta_decode

    H, HV, K, V = shape["H"], shape["HV"], shape["K"], shape["V"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    # the model's dtypes: q, k fp32 (L2-normed in fp32), v in the model dtype, g and beta fp32
    q = torch.randn(batch, H, K, device=device, generator=gen)
    k = F.normalize(torch.randn(batch, H, K, device=device, generator=gen), dim=-1)
    v = torch.randn(batch, HV, V, device=device, generator=gen).to(act)
    g = F.logsigmoid(torch.randn(batch, HV, device=device, generator=gen) + 2)
    beta = torch.rand(batch, HV, device=device, generator=gen)
    state = torch.randn(batch + 1, HV, K, V, device=device, generator=gen) * 0.1
    slots = torch.randperm(batch, device=device, generator=gen) + 1  # out of order, as a pool hands them out
    scale = K**-0.5
    state_bytes = 2 * batch * HV * K * V * 4
    input_bytes = 2 * q.numel() * 4 + v.numel() * v.element_size() + 2 * g.numel() * 4 + batch * 8
    output_bytes = batch * HV * V * v.element_size()
    cases = []
    if run_triton:
        cases.append(
            ("linrec triton (in place)", lambda: gated_delta_decode_triton(q, k, v, g, beta, state, slots, scale))
        )
    cases.append(("linrec torch (gather/scatter)", lambda: gated_delta_decode(q, k, v, g, beta, state, slots, scale)))
    if run_fla:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        def fla_step():
            o, final = fused_recurrent_gated_delta_rule(
                q[:, None].to(act), k[:, None].to(act), v[:, None], g[:, None], beta[:, None].to(act),
                scale=scale, initial_state=state[slots], output_final_state=True,
            )  # fmt: skip
            state[slots] = final
            return o

        cases.append(("fla fused_recurrent + gather/scatter", fla_step))
    return cases, state_bytes + input_bytes + output_bytes


def _ssd_cases(shape: dict[str, int], batch: int, device, run_triton: bool):
    import torch

    from linrec.kernels.ssd.decode import ssd_decode_triton
    from linrec.kernels.ssd.prefill import ssd_step

    H, P, G, N = shape["H"], shape["P"], shape["G"], shape["N"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, H, P, device=device, generator=gen).to(act)
    dt = torch.rand(batch, H, device=device, generator=gen) * 0.1  # fp32, as the model computes it
    A = -torch.rand(H, device=device, generator=gen) - 0.5
    Bm = torch.randn(batch, G, N, device=device, generator=gen).to(act)
    Cm = torch.randn(batch, G, N, device=device, generator=gen).to(act)
    D = torch.ones(H, device=device)
    state = torch.randn(batch + 1, H, P, N, device=device, generator=gen) * 0.1
    slots = torch.randperm(batch, device=device, generator=gen) + 1
    state_bytes = 2 * batch * H * P * N * 4
    input_bytes = (x.numel() + 2 * Bm.numel()) * x.element_size() + dt.numel() * 4 + 2 * H * 4 + batch * 8
    output_bytes = x.numel() * x.element_size()

    def torch_step():
        y, new_state = ssd_step(x, dt, A, Bm, Cm, D, state[slots])
        state[slots] = new_state
        return y

    def hf_step():
        from transformers.models.mamba2.modeling_mamba2 import mamba2_selective_state_update

        gathered = state[slots]  # updated in place by transformers' step, then scattered back
        y = mamba2_selective_state_update(  # per-(head, headdim) dt, A and D, as transformers' mixer feeds it
            gathered,
            x,
            dt[:, :, None].expand(batch, H, P),
            A[:, None, None].expand(H, P, N),
            Bm,
            Cm,
            D[:, None].expand(H, P),
        )
        state[slots] = gathered
        return y

    cases = []
    if run_triton:
        cases.append(("linrec triton (in place)", lambda: ssd_decode_triton(x, dt, A, Bm, Cm, D, state, slots)))
    cases.append(("linrec torch (gather/scatter)", torch_step))
    cases.append(("transformers torch step + gather/scatter", hf_step))
    return cases, state_bytes + input_bytes + output_bytes


def _decode_batch(slots, positions):
    """The ForwardBatch of a decode step (one token per sequence) that the varlen torch paths take."""
    import torch

    from linrec.models.batch import ForwardBatch

    B = slots.shape[0]
    return ForwardBatch(
        cu_seqlens=torch.arange(B + 1, dtype=torch.int64, device=slots.device),
        positions=positions,
        slot_ids=slots,
        seq_lens=(1,) * B,
        start_positions=tuple(positions.tolist()),
        slot_ids_host=tuple(slots.tolist()),
    )


def _fla_gla_step(q, k, v, g, state, slots, scale: float, act):
    """fla-core's fused_recurrent_gla for one token per sequence: states gathered from the pool and repeated
    over each query group (fla keeps one state per query head), the first of each group scattered back."""
    from fla.ops.gla import fused_recurrent_gla

    group = q.shape[1] // k.shape[1]

    def per_query_head(x):
        return x.repeat_interleave(group, dim=1) if group > 1 else x

    o, final = fused_recurrent_gla(
        q[:, None].to(act), per_query_head(k)[:, None].to(act), per_query_head(v)[:, None].to(act),
        gk=per_query_head(g)[:, None].float(), scale=scale, initial_state=per_query_head(state[slots]),
        output_final_state=True,
    )  # fmt: skip
    state[slots] = final[:, ::group]
    return o


def _gla_cases(shape: dict[str, int], batch: int, device, run_triton: bool, run_fla: bool, is_liger: bool):
    """GLA with one state per KV head. is_liger: Liger's recurrent branch (fp32 feature maps and v, scale 1);
    else fla GLA's layer (q, k, v in the model dtype, fp32 log decays, scale K^-0.5)."""
    import torch
    import torch.nn.functional as F

    from linrec.kernels.gla.decode import gla_decode
    from linrec.kernels.gla.step import gla_step

    H, Hk, K, V = shape["H"], shape["Hk"], shape["K"], shape["V"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = torch.float32 if is_liger else act
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, H, K, device=device, generator=gen).to(inputs)
    k = torch.randn(batch, Hk, K, device=device, generator=gen).to(inputs)
    v = torch.randn(batch, Hk, V, device=device, generator=gen).to(inputs)
    g = F.logsigmoid(torch.randn(batch, Hk, K, device=device, generator=gen)) / 16
    state = torch.randn(batch + 1, Hk, K, V, device=device, generator=gen) * 0.1
    slots = torch.randperm(batch, device=device, generator=gen) + 1
    scale = 1.0 if is_liger else K**-0.5
    state_bytes = 2 * batch * Hk * K * V * 4
    input_bytes = (q.numel() + k.numel() + v.numel()) * q.element_size() + g.numel() * 4 + batch * 8
    output_bytes = batch * H * V * 4
    cases = []
    if run_triton:
        cases.append(("linrec triton (in place)", lambda: gla_decode(q, k, v, g, state, slots, scale)))
    cases.append(("linrec torch (gather/scatter)", lambda: gla_step(q, k, v, g, state, slots, scale)))
    if run_fla:
        peer = "fla fused_recurrent_gla + gather/scatter" + (" (states per query head)" if H > Hk else "")
        cases.append((peer, lambda: _fla_gla_step(q, k, v, g, state, slots, scale, act)))
    return cases, state_bytes + input_bytes + output_bytes


def _ring_inputs(shape: dict[str, int], batch: int, device, gen):
    """q [B, H, D], k, v [B, Hk, D] and rings [B+1, W, Hk, D] in the model dtype; positions past the first
    lap of the ring (every entry visible), slots out of order."""
    import torch

    H, Hk, D, W = shape["H"], shape["Hk"], shape["D"], shape["W"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(batch, H, D, device=device, generator=gen).to(act)
    k = torch.randn(batch, Hk, D, device=device, generator=gen).to(act)
    v = torch.randn(batch, Hk, D, device=device, generator=gen).to(act)
    ring_k = torch.randn(batch + 1, W, Hk, D, device=device, generator=gen).to(act)
    ring_v = torch.randn(batch + 1, W, Hk, D, device=device, generator=gen).to(act)
    positions = torch.randint(W, 4 * W, (batch,), device=device, generator=gen)
    slots = torch.randperm(batch, device=device, generator=gen) + 1
    # the whole ring of each sequence read, one entry written, in k's and v's dtype; slots and positions
    ring_bytes = 2 * batch * (W + 1) * Hk * D * act.itemsize + batch * 16
    return q, k, v, ring_k, ring_v, positions, slots, ring_bytes


def _window_cases(shape: dict[str, int], batch: int, device, run_triton: bool):
    import torch

    from linrec.kernels.window_attn import window_attn_varlen
    from linrec.kernels.window_attn.decode import window_attn_decode

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, ring_k, ring_v, positions, slots, ring_bytes = _ring_inputs(shape, batch, device, gen)
    scale = shape["D"] ** -0.5
    forward_batch = _decode_batch(slots, positions)
    input_bytes = (q.numel() + k.numel() + v.numel()) * q.element_size()
    output_bytes = q.numel() * 4
    cases = []
    if run_triton:
        cases.append(
            (
                "linrec triton (in place)",
                lambda: window_attn_decode(q, k, v, ring_k, ring_v, slots, positions, scale),
            )
        )
    cases.append(
        (
            "linrec torch (gather/scatter)",
            lambda: window_attn_varlen(q, k, v, ring_k, ring_v, forward_batch, scale, backend="torch"),
        )
    )
    return cases, ring_bytes + input_bytes + output_bytes


def _liger_step_cases(shape: dict[str, int], batch: int, device, run_triton: bool, run_fla: bool):
    """One Liger attention step: ring write + window attention + GLA update + 0.5/0.5 mix."""
    import torch
    import torch.nn.functional as F

    from linrec.kernels.gla.decode import gla_decode
    from linrec.kernels.window_attn import liger_attention_varlen
    from linrec.kernels.window_attn.decode import liger_attention_decode, window_attn_decode

    H, Hk, D = shape["H"], shape["Hk"], shape["D"]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, ring_k, ring_v, positions, slots, ring_bytes = _ring_inputs(shape, batch, device, gen)
    # the model's branch inputs: softmax feature maps and log decays in fp32
    phi_q = torch.randn(batch, H, D, device=device, generator=gen).softmax(-1)
    phi_k = torch.randn(batch, Hk, D, device=device, generator=gen).softmax(-1)
    g = F.logsigmoid(torch.randn(batch, Hk, D, device=device, generator=gen)) / 16
    state = torch.randn(batch + 1, Hk, D, D, device=device, generator=gen) * 0.1
    scale = D**-0.5
    forward_batch = _decode_batch(slots, positions)
    state_bytes = 2 * batch * Hk * D * D * 4
    input_bytes = (q.numel() + k.numel() + v.numel()) * q.element_size() + (phi_q.numel() + 2 * phi_k.numel()) * 4
    output_bytes = q.numel() * 4

    def unfused():
        window = window_attn_decode(q, k, v, ring_k, ring_v, slots, positions, scale)
        return 0.5 * window + 0.5 * gla_decode(phi_q, phi_k, v.float(), g, state, slots, 1.0)

    def fla_step():
        window = window_attn_decode(q, k, v, ring_k, ring_v, slots, positions, scale)
        recurrent = _fla_gla_step(phi_q, phi_k, v.float(), g, state, slots, 1.0, torch.float32)[:, 0]
        return 0.5 * window + 0.5 * recurrent

    cases = []
    if run_triton:
        fused = "linrec triton fused (in place, one launch)"
        args = (q, k, v, phi_q, phi_k, g, state, ring_k, ring_v, slots, positions, scale)
        cases.append((fused, lambda: liger_attention_decode(*args)))
        cases.append(("linrec triton window + GLA (two launches)", unfused))
    cases.append(
        (
            "linrec torch (gather/scatter)",
            lambda: liger_attention_varlen(
                q, k, v, phi_q, phi_k, g, state, ring_k, ring_v, forward_batch, scale, backend="torch"
            ),
        )
    )
    if run_fla:
        cases.append(("fla fused_recurrent_gla + gather/scatter, triton window", fla_step))
    return cases, state_bytes + ring_bytes + input_bytes + output_bytes


def _short_conv_cases(shape: dict[str, int], batch: int, device, run_triton: bool):
    import torch

    from linrec.kernels.short_conv.decode import short_conv_decode_triton
    from linrec.kernels.short_conv.prefill import short_conv_decode

    D, W = shape["D"], shape["W"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, D, device=device, generator=gen).to(act)
    weight = torch.randn(D, W, device=device, generator=gen).to(act)
    bias = torch.randn(D, device=device, generator=gen).to(act)
    conv_state = torch.randn(batch + 1, D, W - 1, device=device, generator=gen).to(act)  # the model's dtype
    slots = torch.randperm(batch, device=device, generator=gen) + 1
    state_bytes = 2 * batch * D * (W - 1) * act.itemsize
    input_bytes = (x.numel() + weight.numel() + bias.numel()) * act.itemsize + batch * 8
    output_bytes = x.numel() * act.itemsize
    cases = []
    if run_triton:
        cases.append(("linrec triton (in place)", lambda: short_conv_decode_triton(x, weight, bias, conv_state, slots)))
    cases.append(("linrec torch (gather/scatter)", lambda: short_conv_decode(x, weight, bias, conv_state, slots)))
    return cases, state_bytes + input_bytes + output_bytes


def _kernel_cases(kernel: str, shape: dict[str, int], batch: int, device, run_triton: bool, run_fla: bool):
    """(impl name, fn) of every contender for one decode step of one layer of `kernel`, and the bytes moved."""
    if kernel == "gated_delta":
        return _gated_delta_cases(shape, batch, device, run_triton, run_fla)
    if kernel == "ssd":
        return _ssd_cases(shape, batch, device, run_triton)
    if kernel in ("gla", "gla_grouped"):
        return _gla_cases(shape, batch, device, run_triton, run_fla, is_liger=kernel == "gla_grouped")
    if kernel == "window":
        return _window_cases(shape, batch, device, run_triton)
    if kernel in ("liger_step", "liger_step_d128"):
        return _liger_step_cases(shape, batch, device, run_triton, run_fla)
    if kernel == "short_conv":
        return _short_conv_cases(shape, batch, device, run_triton)
    raise ValueError(f"expected a kernel in {tuple(KERNEL_SHAPES['1.3b'])}, got {kernel!r}")


def run_kernels(
    *, size: str = "1.3b", batch_sizes: Sequence[int] | None = None, device: str = "auto", repeats: int | None = None
) -> KernelsResult:
    """Time every decode kernel and its peers at each batch size; see the module docstring."""
    import torch

    from linrec.engine.core import resolve_device
    from linrec.envs import triton_interpreter

    _check_size(size)
    batch_sizes = _check_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES[size])
    torch_device = resolve_device(device)
    on_gpu = torch_device.type == "cuda"
    if repeats is None:
        repeats = 50 if on_gpu else 2
    interpreted = not on_gpu and triton_interpreter()
    run_triton = on_gpu or interpreted
    skipped = []
    if not run_triton:
        skipped.append("linrec triton (in place): needs CUDA, or TRITON_INTERPRET=1 on the CPU")
    if not on_gpu:
        skipped.append("fla fused_recurrent (gated delta, GLA) + gather/scatter: CUDA only")
    copy_bytes = 1 << 30 if on_gpu else 1 << 24
    copy_bw = copy_bandwidth(torch_device, copy_bytes, repeats)
    shapes = KERNEL_SHAPES[size]
    rows = []
    with torch.inference_mode():
        for batch in batch_sizes:
            for kernel, shape in shapes.items():
                cases, num_bytes = _kernel_cases(kernel, shape, batch, torch_device, run_triton, on_gpu)
                for impl, fn in cases:
                    # one warm-up call on the CPU (lazy imports), where nothing compiles: the interpreter is slow
                    seconds = time_per_call(fn, torch_device, repeats, warmup=2 if on_gpu else 1)
                    rate = num_bytes / seconds
                    is_interpreted = interpreted and "triton" in impl
                    rows.append(
                        KernelRow(kernel, impl, batch, seconds, num_bytes, rate / 1e9, rate / copy_bw, is_interpreted)
                    )
    return KernelsResult(
        device=torch.cuda.get_device_name(torch_device) if on_gpu else "cpu",
        size=size,
        interpreted=interpreted,
        copy_gb_per_s=copy_bw / 1e9,
        shapes=shapes,
        rows=rows,
        skipped=skipped,
        note=NOTE_GPU if on_gpu else NOTE_CPU,
    )


# -- bench decode ------------------------------------------------------------------------------------


def decode_model_path(family: str, size: str) -> Path:
    """The seeded random checkpoint of `family` at `size`, written on first use under linrec's cache dir."""
    from linrec import __version__
    from linrec.envs import cache_dir
    from linrec.models.staging import cached_dir

    _check_size(size)
    if family not in BENCH_FAMILIES:
        raise ValueError(f"expected a bench family in {BENCH_FAMILIES}, got {family!r}")
    final = cache_dir() / "models" / f"decode-{family}-{size}-{__version__}-v{DECODE_FORMAT_VERSION}"
    return cached_dir(final, lambda staging: write_bench_model(staging, family, DECODE_MODEL_OVERRIDES[size][family]))


@dataclass
class DecodeRow:
    batch: int
    # decode tokens / s: batch * output_len / (t(1 + output_len) - t(1)); None when timing noise exceeded
    # the decode time (only seen on tiny CPU smoke runs)
    linrec_tokens_per_s: float | None
    hf_tokens_per_s: float | None
    ratio: float | None  # linrec / HF


@dataclass
class DecodeResult:
    model: str
    family: str
    size: str
    device: str
    dtype: str
    kernel_backend: str
    cuda_graphs: bool
    prompt_len: int
    output_len: int  # decode tokens per request that are timed
    hf_peer: str
    rows: list[DecodeRow]
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        lines = [
            f"model: {self.model} ({self.family}, {self.size}, {self.dtype}) on {self.device}; kernel_backend "
            f"{self.kernel_backend}, CUDA graphs {'on' if self.cuda_graphs else 'off'}; {self.note}",
            f"decode tokens/s over {self.output_len} tokens per request after a {self.prompt_len}-token prompt; "
            f"peer {self.hf_peer}",
            "",
            f"{'batch':>5} {'linrec tok/s':>13} {'HF tok/s':>10} {'ratio':>7}",
        ]

        def cell(value: float | None, width: int, fmt: str) -> str:
            return f"{value:>{width}{fmt}}" if value is not None else f"{'noise':>{width}}"

        for r in self.rows:
            lines.append(
                f"{r.batch:>5} {cell(r.linrec_tokens_per_s, 13, '.1f')} {cell(r.hf_tokens_per_s, 10, '.1f')} "
                f"{cell(r.ratio, 6, '.2f')}x"
            )
        return "\n".join(lines)


def _decode_seconds(
    run: Callable[[Workload], float], prompts: list[list[int]], output_len: int, repeats: int = 3
) -> float | None:
    """Seconds spent decoding output_len tokens per request: the fastest of `repeats` (1 + output_len)-token
    runs minus the fastest 1-token run. None when noise swallows the difference (raise output_len)."""
    short = min(run(Workload(prompts, [1] * len(prompts))) for _ in range(repeats))
    long = min(run(Workload(prompts, [1 + output_len] * len(prompts))) for _ in range(repeats))
    return long - short if long > short else None


def _linrec_decode_seconds(
    path: str,
    *,
    prompts: list[list[int]],
    batch_sizes: tuple[int, ...],
    output_len: int,
    repeats: int,
    **engine_kwargs,
) -> tuple[dict[int, float | None], bool, str | None]:
    """Decode seconds per batch size through linrec's engine, whether CUDA graphs were on, and the family
    served. The engine is dropped on return, so the peer loads into freed memory."""
    from linrec.engine.llm import LLM

    llm = LLM(path, **engine_kwargs)
    cuda_graphs = llm.engine.runner.decode_graphs is not None
    family = getattr(llm.engine.model.config, "model_type", None)
    run_linrec(llm, Workload(prompts[:2], [4] * len(prompts[:2])))  # warm-up: Triton compiles, allocator settles

    def linrec_run(w: Workload) -> float:
        return run_linrec(llm, w)[0]

    seconds = {b: _decode_seconds(linrec_run, prompts[:b], output_len, repeats) for b in batch_sizes}
    return seconds, cuda_graphs, family


def run_decode(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    size: str = "1.3b",
    batch_sizes: Sequence[int] | None = None,
    prompt_len: int = 16,
    output_len: int = 64,
    dtype: str = "auto",
    device: str = "auto",
    kernel_backend: str = "auto",
    enforce_eager: bool = False,
    seed: int = 0,
    repeats: int = 3,
) -> DecodeResult:
    """linrec's decode tokens/s beside HF generate's at each batch size, on the same weights and dtype.

    model: a Llama/Qwen2/Mistral/Liger/mamba2 checkpoint directory; None writes (once) the random model of
    `family` at `size`. dtype auto is bfloat16 on CUDA and float32 on the CPU.
    """
    import random

    import torch

    from linrec.bench.throughput import _LINEARIZABLE
    from linrec.engine.core import resolve_device
    from linrec.models.loader import read_hf_config

    _check_size(size)
    batch_sizes = _check_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES[size])
    if prompt_len < 1 or output_len < 1 or repeats < 1:
        raise ValueError(
            f"expected prompt_len, output_len and repeats >= 1, got {prompt_len}, {output_len} and {repeats}"
        )
    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    path = Path(model) if model is not None else decode_model_path(family, size)
    hf_config = read_hf_config(path)
    model_type = hf_config.get("model_type")
    rng = random.Random(seed)
    vocab_size = int(hf_config["vocab_size"])
    largest = max(batch_sizes)
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(largest)]
    pad_token_id = hf_config.get("pad_token_id") if isinstance(hf_config.get("pad_token_id"), int) else 0

    linrec_seconds, cuda_graphs, linrec_family = _linrec_decode_seconds(
        str(path),
        dtype=dtype,
        device=str(torch_device),
        kernel_backend=kernel_backend,
        max_num_seqs=largest,
        max_num_batched_tokens=largest * prompt_len,
        linearize="liger-gla" if model_type in _LINEARIZABLE else None,
        enforce_eager=enforce_eager,
        seed=seed,
        prompts=prompts,
        batch_sizes=batch_sizes,
        output_len=output_len,
        repeats=repeats,
    )
    linrec_family = linrec_family or model_type
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()

    hf_model = _hf_peer(path, hf_config, getattr(torch, dtype), torch_device)
    hf_peer = f"HF {type(hf_model).__name__}.generate"
    run_hf(hf_model, Workload(prompts[:2], [4] * len(prompts[:2])), 2, pad_token_id)

    def hf_run(w: Workload) -> float:
        return run_hf(hf_model, w, len(w.prompts), pad_token_id)[0]

    rows = []
    for b in batch_sizes:
        hf_seconds = _decode_seconds(hf_run, prompts[:b], output_len, repeats)
        hf_rate = b * output_len / hf_seconds if hf_seconds else None
        linrec_rate = b * output_len / linrec_seconds[b] if linrec_seconds[b] else None
        ratio = linrec_rate / hf_rate if linrec_rate and hf_rate else None
        rows.append(DecodeRow(b, linrec_rate, hf_rate, ratio))
    return DecodeResult(
        model=str(path),
        family=str(linrec_family),
        size=size,
        device=torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        dtype=dtype,
        kernel_backend=kernel_backend,
        cuda_graphs=cuda_graphs,
        prompt_len=prompt_len,
        output_len=output_len,
        hf_peer=hf_peer,
        rows=rows,
        note=NOTE_GPU if torch_device.type == "cuda" else NOTE_CPU,
    )

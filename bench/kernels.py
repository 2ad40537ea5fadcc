"""`linrec bench kernels`: each decode kernel against its physical limit and its peers.

Each decode kernel (gated delta rule, Mamba2 SSD, GLA with one state per head and with one state per KV
head, Liger's window ring, the fused Liger step, the short-conv update) at batch 1/8/64/256 on a 1.3B-class
layer shape (KERNEL_SHAPES), timed beside its peers in one run. A decode step is memory bound: it reads and
writes every state it advances (recurrent state, ring, conv state) and reads its inputs once, so the figure
of merit is the achieved bandwidth (bytes moved / time) as a share of the device's measured copy bandwidth
(a large tensor copy timed the same way, read + write bytes). Peers: linrec's torch path and fla-core's
fused_recurrent kernels (gated delta rule, GLA; CUDA only), both with the gather/scatter of states the
in-place kernel avoids; transformers' torch selective_state_update for Mamba2; for the Liger step, the
window and GLA kernels as two launches.

`--size small` (tiny shapes, batch 1 and 2) exists so CI can smoke-test it on a CPU in seconds. CPU figures
are not performance figures, and Triton kernels on the CPU run under TRITON_INTERPRET=1, whose times mean
nothing: the JSON says so in `note` and marks each such row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from linrec.bench.common import DEFAULT_BATCH_SIZES, NOTE_CPU, NOTE_GPU, check_batch_sizes, check_size

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

    check_size(size)
    batch_sizes = check_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES[size])
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

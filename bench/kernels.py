"""`linrec bench kernels`: each decode kernel against its physical limit and its peers.

Each decode kernel (gated delta rule, Mamba2 SSD, GLA with one state per head and with one state per KV
head, Liger's window ring, the fused Liger step, the LoLCATs step, the short-conv update, and the LoRA add-on
of a batch mixing adapters) at batch 1/8/64/256 on a 1.3B-class
layer shape (KERNEL_SHAPES), timed beside its peers in one run. A decode step is memory bound: it reads and
writes every state it advances (recurrent state, ring, conv state) and reads its inputs once, so the figure
of merit is the achieved bandwidth (bytes moved / time) as a share of the device's measured copy bandwidth
(a large tensor copy timed the same way, read + write bytes). Peers: linrec's torch path and fla-core's
fused_recurrent kernels (gated delta rule, GLA; on the CPU only the gated delta one runs, under the
interpreter: fla's GLA kernel is autotuned), both with the gather/scatter of states the in-place kernel
avoids; transformers' torch selective_state_update for Mamba2; for the Liger step, the
window and GLA kernels as two launches.

On CUDA each contender is timed twice: eager (CUDA events around back-to-back calls, which at small batch
measures how fast the host issues launches: every linrec kernel showed a 40-65 us floor that way) and by
CUDA-graph replay (CALLS_PER_GRAPH calls captured into one graph, replayed GRAPH_REPLAYS times between
events: GPU time alone). The bandwidth share comes from the replay time. A contender that cannot be captured
(a host sync, an autotuner) keeps its eager time, and its row says why (`timing`). Capturing and replaying
re-apply the in-place state update; the inputs keep states bounded (log decays <= 0, beta in [0, 1],
L2-normed keys), so the repeats time the same work. A contender that raises is recorded in `errors`; an error
that loses the CUDA context (an illegal address) ends the run there, and the rows so far are kept.

`--size small` (tiny shapes, batch 1 and 2) exists so CI can smoke-test it on a CPU in seconds. CPU figures
are not performance figures, and Triton kernels on the CPU run under TRITON_INTERPRET=1, whose times mean
nothing: the JSON says so in `note` and marks each such row. fla-core is optional: without it (or on a CPU
without the interpreter) its peers are listed in `skipped`.

--kernels and --impls filter the cases, so that one case can run alone in its own process (bench/gpu_check.py
does that to find which case fails).
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
#   lolcats_step     the LoLCATs step (ring + Hedgehog linear attention, one normaliser: kernels/lolcats) on
#                    Llama-3-8B's heads (32/8 of 128) with the released feature maps (F = 64) and window (64)
#   short_conv       Mamba2-1.3B's conv1d update (conv_dim 4096 + 2 * 128 = 4352 channels, kernel 4)
#   lora             the LoRA add-on of one decode step on Llama-3.2-1B's q_proj (2048 -> 2048), rank 16, with S
#                    adapter slots and the batch's tokens spread round-robin over them (min(batch, S) in use)
KERNEL_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "1.3b": {
        "gated_delta": {"H": 6, "HV": 6, "K": 256, "V": 512},
        "ssd": {"H": 64, "P": 64, "G": 1, "N": 128},
        "gla": {"H": 4, "Hk": 4, "K": 256, "V": 512},
        "gla_grouped": {"H": 32, "Hk": 8, "K": 64, "V": 64},
        "window": {"H": 32, "Hk": 8, "D": 64, "W": 64},
        "liger_step": {"H": 32, "Hk": 8, "D": 64, "W": 64},
        "liger_step_d128": {"H": 32, "Hk": 8, "D": 128, "W": 64},
        "lolcats_step": {"H": 32, "Hk": 8, "D": 128, "F": 64, "W": 64},
        "short_conv": {"D": 4352, "W": 4},
        "lora": {"IN": 2048, "OUT": 2048, "R": 16, "S": 16},
    },
    "small": {
        "gated_delta": {"H": 2, "HV": 2, "K": 16, "V": 16},
        "ssd": {"H": 2, "P": 8, "G": 1, "N": 16},
        "gla": {"H": 2, "Hk": 2, "K": 16, "V": 32},
        "gla_grouped": {"H": 4, "Hk": 2, "K": 16, "V": 16},
        "window": {"H": 4, "Hk": 2, "D": 16, "W": 8},
        "liger_step": {"H": 4, "Hk": 2, "D": 16, "W": 8},
        "liger_step_d128": {"H": 4, "Hk": 2, "D": 32, "W": 8},
        "lolcats_step": {"H": 4, "Hk": 2, "D": 16, "F": 8, "W": 8},
        "short_conv": {"D": 48, "W": 4},
        "lora": {"IN": 40, "OUT": 24, "R": 8, "S": 3},
    },
}


# CUDA-graph timing: calls captured into one graph, and replays of it between two events. 10 calls keep the
# largest torch peer's captured temporaries (gated delta at batch 256: ~3 GB a call) well inside the device.
CALLS_PER_GRAPH = 10
GRAPH_REPLAYS = 5
# Errors after which the CUDA context is unusable: nothing later in the process can run.
FATAL_CUDA_ERRORS = ("illegal memory access", "illegal address", "unspecified launch failure", "misaligned address")


def time_per_call(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> float:
    """Seconds per call of fn: CUDA events around `repeats` back-to-back calls on a GPU (the eager time: at
    small sizes it is the host's launch rate), wall time on the CPU. The warm-up calls are synchronized before
    timing starts, so an asynchronous error they cause is raised here, in the case that caused it."""
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


class CudaGraphOps:
    """The torch.cuda calls that graph timing makes, in one object so that tests can pass a fake one."""

    def __init__(self, device):
        self.device = device

    def new_graph(self):
        import torch

        return torch.cuda.CUDAGraph()

    def capture(self, graph):
        """Context in which launches are recorded into `graph` (on torch's side stream, not run)."""
        import torch

        # thread_local: a host sync elsewhere in the process does not invalidate this capture
        return torch.cuda.graph(graph, capture_error_mode="thread_local")

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)

    def event(self):
        import torch

        return torch.cuda.Event(enable_timing=True)


def time_graph_per_call(
    fn: Callable[[], object], ops: CudaGraphOps, calls: int = CALLS_PER_GRAPH, replays: int = GRAPH_REPLAYS
) -> float:
    """Seconds per call of fn as GPU time: `calls` calls captured into one CUDA graph, replayed `replays` times
    between two events (after one untimed replay). fn must already have run eagerly (compiled, autotuned):
    a first call inside a capture would compile or benchmark there, which a capture cannot hold."""
    graph = ops.new_graph()
    with ops.capture(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # untimed: first-replay upload of the graph
    ops.synchronize()
    start, end = ops.event(), ops.event()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    ops.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * calls)


@dataclass
class CaseTiming:
    seconds: float  # per call: the graph replay's where it was captured, else the eager time
    eager_seconds: float  # per call, CUDA events around back-to-back launches (wall time on the CPU)
    graph_seconds: float | None  # per call from graph replay; None: not captured (CPU, or see timing)
    timing: str  # "graph replay", "eager (CPU)", or "eager: graph capture failed: <error>"


def time_case(
    fn: Callable[[], object],
    device,
    repeats: int,
    *,
    warmup: int = 2,
    graph_ops: CudaGraphOps | None = None,
    graph_timer: Callable[[Callable[[], object], CudaGraphOps], float] = time_graph_per_call,
) -> CaseTiming:
    """The eager time of fn, then on CUDA (graph_ops given) its graph-replay time; a capture that fails leaves
    the eager time as the figure, marked. An error that loses the CUDA context is raised, never swallowed."""
    eager = time_per_call(fn, device, repeats, warmup)
    if graph_ops is None:
        return CaseTiming(eager, eager, None, "eager (CPU)")
    try:
        replay = graph_timer(fn, graph_ops)
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager time, recorded
        message = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if is_fatal_cuda_error(e):
            raise
        return CaseTiming(eager, eager, None, f"eager: graph capture failed: {message}")
    return CaseTiming(replay, eager, replay, "graph replay")


def is_fatal_cuda_error(error: BaseException) -> bool:
    """Whether `error` left the CUDA context unusable (every later call in the process would fail too)."""
    text = str(error).lower()
    return any(marker in text for marker in FATAL_CUDA_ERRORS)


def copy_bandwidth(device, num_bytes: int, repeats: int, graph_ops: CudaGraphOps | None = None) -> float:
    """Bytes per second of dst.copy_(src) over a num_bytes fp32 tensor, counting read + write; timed by graph
    replay on CUDA, like the kernels it is the limit of."""
    import torch

    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_case(lambda: dst.copy_(src), device, repeats, graph_ops=graph_ops).seconds
    return 2 * src.numel() * 4 / seconds


@dataclass
class KernelRow:
    kernel: str  # a key of KERNEL_SHAPES[size]
    impl: str  # what ran
    batch: int
    seconds: float  # per decode step of one layer: graph replay on CUDA where captured, else eager
    bytes_moved: int  # states read + written, inputs read, outputs written (the same for every impl)
    gb_per_s: float  # bytes_moved / seconds / 1e9
    share_of_copy: float  # gb_per_s over the measured copy bandwidth
    is_interpreted: bool = False  # a Triton kernel under TRITON_INTERPRET=1: its time is not a performance figure
    eager_seconds: float | None = None  # back-to-back launches between events (host-bound at small sizes)
    graph_seconds: float | None = None  # CUDA-graph replay; None where not captured
    timing: str = ""  # how `seconds` was measured (CaseTiming.timing)


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
    errors: list[str] = field(default_factory=list)  # "kernel / impl / batch: error" of contenders that raised
    timing: str = ""  # how rows were timed on this device

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        lines = [
            f"device: {self.device}, size {self.size}; copy bandwidth {self.copy_gb_per_s:.1f} GB/s; {self.note}",
            f"timing: {self.timing}" if self.timing else "",
            f"{'kernel':<16} {'impl':<56} {'batch':>5} {'us/step':>10} {'us eager':>10} {'KB moved':>10} "
            f"{'GB/s':>8} {'of copy':>8}",
        ]
        for r in self.rows:
            impl = f"{r.impl} [interpreter]" if r.is_interpreted else r.impl
            if r.timing.startswith("eager:"):
                impl = f"{impl} [eager]"
            eager = r.eager_seconds if r.eager_seconds is not None else r.seconds
            lines.append(
                f"{r.kernel:<16} {impl:<56} {r.batch:>5} {r.seconds * 1e6:>10.1f} {eager * 1e6:>10.1f} "
                f"{r.bytes_moved / 1e3:>10.1f} {r.gb_per_s:>8.1f} {r.share_of_copy:>7.1%}"
            )
        if any(r.is_interpreted for r in self.rows):
            lines.append(
                "[interpreter]: Triton under TRITON_INTERPRET=1 on the CPU; the time is NOT a performance figure"
            )
        if any(r.timing.startswith("eager:") for r in self.rows):
            lines.append("[eager]: not capturable in a CUDA graph; us/step is the eager (host-bound) time")
            lines += [
                f"  {r.kernel} / {r.impl} / {r.batch}: {r.timing}" for r in self.rows if r.timing.startswith("eager:")
            ]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


@dataclass
class KernelCases:
    """Every contender for one decode step of one layer of a kernel at one batch size."""

    cases: list[tuple[str, Callable[[], object]]]  # (impl name, fn): fn runs one step and returns its output
    num_bytes: int  # what the step must move (states read + written, inputs read, outputs written)
    states: tuple  # the tensors the step updates in place (tests restore them between contenders)


def _gated_delta_cases(shape: dict[str, int], batch: int, device, run_triton: bool, run_fla: bool):
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
            # every argument by keyword: fla-core 0.6.0's fifth positional parameter is gk (a per-key decay
            # [B, T, HV, K]), not beta. Passed positionally, beta [B, 1, HV] was read as gk, K times past its end
            # (the illegal memory access of issue 11), and beta defaulted to ones.
            o, final = fused_recurrent_gated_delta_rule(
                q=q[:, None].to(act), k=k[:, None].to(act), v=v[:, None], g=g[:, None], beta=beta[:, None].to(act),
                scale=scale, initial_state=state[slots], output_final_state=True,
            )  # fmt: skip
            state[slots] = final
            return o

        cases.append(("fla fused_recurrent + gather/scatter", fla_step))
    return KernelCases(cases, state_bytes + input_bytes + output_bytes, (state,))


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
    return KernelCases(cases, state_bytes + input_bytes + output_bytes, (state,))


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
    return KernelCases(cases, state_bytes + input_bytes + output_bytes, (state,))


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
    return KernelCases(cases, ring_bytes + input_bytes + output_bytes, (ring_k, ring_v))


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
    return KernelCases(cases, state_bytes + ring_bytes + input_bytes + output_bytes, (state, ring_k, ring_v))


def _lolcats_step_cases(shape: dict[str, int], batch: int, device, run_triton: bool):
    """One LoLCATs attention step: the leaving key into the per-query-head linear state, ring write, window +
    linear attention under one normaliser (the Triton kernel in place against the torch step's gather/scatter)."""
    import torch

    from linrec.kernels.lolcats import hedgehog_features
    from linrec.kernels.lolcats.decode import lolcats_decode
    from linrec.kernels.lolcats.step import lolcats_step

    H, D, F = shape["H"], shape["D"], shape["F"]
    gen = torch.Generator(device=device).manual_seed(0)
    # positions past the first lap: a key leaves the window at every step, so the linear state is written
    q, k, v, ring_k, ring_v, positions, slots, ring_bytes = _ring_inputs(shape, batch, device, gen)
    # the model's tensors: feature maps in the model dtype, phi_q and gamma in fp32
    q_weight = (torch.randn(H, D, F, device=device, generator=gen) * D**-0.5).to(q.dtype)
    k_weight = (torch.randn(H, D, F, device=device, generator=gen) * D**-0.5).to(q.dtype)
    phi_q = hedgehog_features(q, q_weight, 1e-12)
    gamma = torch.sigmoid(torch.randn(H, device=device, generator=gen))
    # states as after a few hundred tokens: S = sum phi v, z = sum phi (each phi half sums to 1)
    linear = torch.randn(batch + 1, H, 2 * F, D, device=device, generator=gen)
    normalizer = torch.rand(batch + 1, H, 2 * F, device=device, generator=gen) * 256 / F
    scale = D**-0.5
    state_bytes = 2 * batch * H * 2 * F * (D + 1) * 4  # linear and normalizer read + written, fp32
    input_bytes = (q.numel() + k.numel() + v.numel() + k_weight.numel()) * q.element_size()
    input_bytes += (phi_q.numel() + gamma.numel()) * 4
    output_bytes = q.numel() * 4
    args = (q, phi_q, k, v, k_weight, gamma, linear, normalizer, ring_k, ring_v, slots, positions, scale, 1e-12)
    cases = []
    if run_triton:
        cases.append(("linrec triton (in place)", lambda: lolcats_decode(*args)))
    cases.append(("linrec torch (gather/scatter)", lambda: lolcats_step(*args)))
    num_bytes = state_bytes + ring_bytes + input_bytes + output_bytes
    return KernelCases(cases, num_bytes, (linear, normalizer, ring_k, ring_v))


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
    return KernelCases(cases, state_bytes + input_bytes + output_bytes, (conv_state,))


def _lora_cases(shape: dict[str, int], batch: int, device, run_triton: bool):
    """y += B[s] A[s] x per token: the grouped shrink/expand (host-grouped and device-grouped mappings, the
    latter what a CUDA graph replays) against torch's grouped matmuls and its per-token gather + bmm."""
    import torch

    from linrec.kernels.lora import LoraMapping, lora_add_

    IN, OUT, R, S = shape["IN"], shape["OUT"], shape["R"], shape["S"]
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, IN, device=device, generator=gen).to(act)
    y = torch.randn(batch, OUT, device=device, generator=gen).to(act)
    lora_a = (torch.randn(S, R, IN, device=device, generator=gen) * IN**-0.5).to(act)
    lora_b = (torch.randn(S, OUT, R, device=device, generator=gen) * 1e-3).to(act)
    token_slots = [t % S for t in range(batch)]
    host = LoraMapping.build(token_slots, S, device)
    on_device = LoraMapping.from_device(torch.tensor(token_slots, device=device), S)
    active = min(batch, S)
    adapter_bytes = active * R * (IN + OUT) * act.itemsize
    num_bytes = x.numel() * act.itemsize + 2 * y.numel() * act.itemsize + adapter_bytes + batch * 8

    def add(mapping, backend):
        def step():
            lora_add_(y, x, lora_a, lora_b, mapping, backend)
            return y

        return step

    cases = []
    if run_triton:
        cases.append(("linrec triton shrink/expand", add(host, "triton")))
        cases.append(("linrec triton, device-grouped (graphs)", add(on_device, "triton")))
    # torch's grouped path gathers each adapter's rows and scatters the sum back: the bench's reference name
    cases.append(("linrec torch (gather/scatter)", add(host, "torch")))
    cases.append(("linrec torch, device-grouped (gather + bmm)", add(on_device, "torch")))
    return KernelCases(cases, num_bytes, (y,))


def _kernel_cases(
    kernel: str, shape: dict[str, int], batch: int, device, run_triton: bool, run_fla: bool
) -> KernelCases:
    """Every contender for one decode step of one layer of `kernel`, and the bytes it moves."""
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
    if kernel == "lolcats_step":
        return _lolcats_step_cases(shape, batch, device, run_triton)
    if kernel == "short_conv":
        return _short_conv_cases(shape, batch, device, run_triton)
    if kernel == "lora":
        return _lora_cases(shape, batch, device, run_triton)
    raise ValueError(f"expected a kernel in {tuple(KERNEL_SHAPES['1.3b'])}, got {kernel!r}")


def fla_available() -> bool:
    """Whether fla-core's ops import here (it is optional: the GPU check machine may not have it)."""
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        import fla.ops.gla  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or broken for this torch/triton: either way no fla peers
        return False
    return True


def run_kernels(
    *,
    size: str = "1.3b",
    batch_sizes: Sequence[int] | None = None,
    device: str = "auto",
    repeats: int | None = None,
    kernels: Sequence[str] | None = None,
    impls: Sequence[str] | None = None,
    use_graphs: bool = True,
) -> KernelsResult:
    """Time every decode kernel and its peers at each batch size; see the module docstring.

    kernels: keys of KERNEL_SHAPES[size] to run (all by default); impls: run only contenders whose name
    contains one of these strings; use_graphs: False keeps eager timing on CUDA too.
    """
    import torch

    from linrec.engine.core import resolve_device
    from linrec.envs import triton_interpreter

    check_size(size)
    batch_sizes = check_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES[size])
    shapes = KERNEL_SHAPES[size]
    kernels = tuple(kernels or shapes)
    unknown = [k for k in kernels if k not in shapes]
    if unknown:
        raise ValueError(f"expected kernels among {tuple(shapes)}, got {unknown}")
    torch_device = resolve_device(device)
    on_gpu = torch_device.type == "cuda"
    if repeats is None:
        repeats = 50 if on_gpu else 2
    interpreted = not on_gpu and triton_interpreter()
    run_triton = on_gpu or interpreted
    run_fla = run_triton and fla_available()  # fla's kernels are Triton: CUDA, or the interpreter on a CPU
    skipped = []
    if not run_triton:
        skipped.append("linrec triton (in place): needs CUDA, or TRITON_INTERPRET=1 on the CPU")
    if not run_fla:
        why = "fla-core not importable" if run_triton else "needs CUDA, or TRITON_INTERPRET=1 on the CPU"
        skipped.append(f"fla fused_recurrent (gated delta, GLA) + gather/scatter: {why}")
    elif not on_gpu:
        skipped.append("fla fused_recurrent_gla + gather/scatter: CUDA only (autotuned: the interpreter has no driver)")
    graph_ops = CudaGraphOps(torch_device) if on_gpu and use_graphs else None
    if on_gpu:
        timing = (
            f"us/step by CUDA-graph replay ({CALLS_PER_GRAPH} calls a graph, {GRAPH_REPLAYS} replays); us eager: "
            f"events around {repeats} back-to-back calls"
            if graph_ops
            else f"eager: events around {repeats} back-to-back calls (host-bound at small sizes)"
        )
    else:
        timing = f"wall time of {repeats} calls on the CPU (not a performance figure)"
    copy_bytes = 1 << 30 if on_gpu else 1 << 24
    copy_bw = copy_bandwidth(torch_device, copy_bytes, repeats, graph_ops)
    rows: list[KernelRow] = []
    errors: list[str] = []
    with torch.inference_mode():
        for batch in batch_sizes:
            for kernel in kernels:
                # fla's GLA recurrent kernel is autotuned, which the interpreter cannot run (no driver)
                fla_here = run_fla and (on_gpu or kernel == "gated_delta")
                made = _kernel_cases(kernel, shapes[kernel], batch, torch_device, run_triton, fla_here)
                for impl, fn in made.cases:
                    if impls and not any(part in impl for part in impls):
                        continue
                    try:
                        # one warm-up call on the CPU (lazy imports), where nothing compiles: the interpreter is slow
                        t = time_case(fn, torch_device, repeats, warmup=2 if on_gpu else 1, graph_ops=graph_ops)
                    except Exception as e:  # noqa: BLE001 - one contender failing must not end the bench
                        errors.append(f"{kernel} / {impl} / batch {batch}: {type(e).__name__}: {e}".splitlines()[0])
                        if is_fatal_cuda_error(e):
                            errors.append("stopped: the CUDA context is lost; later cases cannot run in this process")
                            return _result(
                                torch_device, size, interpreted, copy_bw, shapes, rows, skipped, errors, timing
                            )
                        continue
                    rate = made.num_bytes / t.seconds
                    is_interpreted = interpreted and "triton" in impl
                    rows.append(
                        KernelRow(
                            kernel,
                            impl,
                            batch,
                            t.seconds,
                            made.num_bytes,
                            rate / 1e9,
                            rate / copy_bw,
                            is_interpreted,
                            t.eager_seconds,
                            t.graph_seconds,
                            t.timing,
                        )  # fmt: skip
                    )
                del made
                if on_gpu:
                    torch.cuda.empty_cache()  # each case's inputs and captured graphs go before the next's
    return _result(torch_device, size, interpreted, copy_bw, shapes, rows, skipped, errors, timing)


def _result(device, size, interpreted, copy_bw, shapes, rows, skipped, errors, timing) -> KernelsResult:
    import torch

    on_gpu = device.type == "cuda"
    return KernelsResult(
        device=torch.cuda.get_device_name(device) if on_gpu else "cpu",
        size=size,
        interpreted=interpreted,
        copy_gb_per_s=copy_bw / 1e9,
        shapes=shapes,
        rows=rows,
        skipped=skipped,
        note=NOTE_GPU if on_gpu else NOTE_CPU,
        errors=errors,
        timing=timing,
    )

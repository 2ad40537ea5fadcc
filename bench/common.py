"""What the `linrec bench` workloads share: the seeded random bench checkpoints and their HF peers, the
greedy workload runners for linrec and HF `generate`, the bench model of a family or a checkpoint,
batch-size parsing and percentiles.

Like every bench module it imports torch and transformers only inside functions, so that building the
`linrec` parser (which reads BENCH_FAMILIES and SIZES) loads neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bench-sized seeded random checkpoints (`--family` without `--model`): a few layers, hidden 512, GQA.
BENCH_FAMILIES = ("liger_gla", "mamba2")
BENCH_FORMAT_VERSION = 1
BENCH_SEED = 0
BENCH_VOCAB_SIZE = 32000
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    # Written as a plain Llama: linrec loads it with linearize="liger-gla", HF as LlamaForCausalLM.
    "liger_gla": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "mamba2": {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_heads": 16,
        "head_dim": 64,
        "expand": 2,
        "state_size": 64,
        "n_groups": 1,
        "conv_kernel": 4,
        "chunk_size": 64,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": True,
        "tie_word_embeddings": True,
        # finite: transformers 5 writes the default (0, inf) as {"__float__": "Infinity"}, which
        # models/mamba2.py does not read yet; no dt comes near 1e9, so the clamp is the same
        "time_step_limit": [0.0, 1e9],
    },
}
LINEARIZABLE = ("llama", "qwen2", "mistral")
# Liger model_type -> the base transformer whose weights it keeps (the HF peer)
LIGER_BASE = {"liger_gla": "llama", "liger_qwen2_gla": "qwen2", "liger_mistral_gla": "mistral"}


# `linrec bench kernels` and `bench decode`: 1.3B-class shapes, or tiny ones for a CPU smoke test.
SIZES = ("small", "1.3b")
DEFAULT_BATCH_SIZES = {"small": (1, 2), "1.3b": (1, 8, 64, 256)}

NOTE_GPU = "CUDA: absolute times and bandwidth shares are meaningful"
NOTE_CPU = (
    "CPU smoke run: not a performance figure; Triton kernels, if listed, ran under TRITON_INTERPRET=1 and their "
    "times mean nothing"
)


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"expected size in {SIZES}, got {size!r}")


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"expected batch sizes >= 1, got {list(batch_sizes)}")
    return sizes


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'32' or '1,8,64' -> (32,) or (1, 8, 64)."""
    try:
        return check_batch_sizes([int(p) for p in text.split(",") if p.strip()])
    except ValueError:
        raise ValueError(f"expected comma-separated batch sizes >= 1 such as 1,8,64, got {text!r}") from None


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]  # token ids per request
    output_lens: list[int]  # tokens requested per request (greedy, EOS ignored)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def cached_bench_model(name: str, family: str, overrides: dict[str, Any] | None = None) -> Path:
    """The checkpoint write_bench_model(family, overrides) writes, kept as `name` under linrec's cache dir:
    written once, atomically (models/staging.py), and reused by every later run."""
    from linrec.envs import cache_dir
    from linrec.models.staging import cached_dir

    if family not in BENCH_FAMILIES:
        raise ValueError(f"expected a bench family in {BENCH_FAMILIES}, got {family!r}")
    return cached_dir(cache_dir() / "models" / name, lambda staging: write_bench_model(staging, family, overrides))


def write_bench_model(dst: str | Path, family: str = "liger_gla", overrides: dict[str, Any] | None = None) -> Path:
    """Write a seeded random transformers checkpoint (Llama for liger_gla, Mamba2 for mamba2) with the
    byte-level tokenizer; `overrides` changes config fields (tests use it for a tiny model)."""
    import torch
    import transformers

    from linrec.models.tokenizer import demo_special_token_ids, write_byte_tokenizer

    if family not in BENCH_FAMILIES:
        raise ValueError(f"expected a bench family in {BENCH_FAMILIES}, got {family!r}")
    fields = {**BENCH_CONFIGS[family], "vocab_size": BENCH_VOCAB_SIZE, **demo_special_token_ids()}
    fields.update(overrides or {})
    model_type = fields.pop("model_type")
    fields.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(BENCH_SEED)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst = Path(dst)
    model.save_pretrained(dst)
    write_byte_tokenizer(dst)
    return dst


def hf_peer(path: Path, hf_config: dict[str, Any], dtype, device):
    """The transformers model a user would run instead: the base transformer of a Liger or linearized
    checkpoint, or Mamba2ForCausalLM for mamba2."""
    import transformers

    model_type = hf_config.get("model_type")
    if model_type in LIGER_BASE:
        fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures", "window_size")}
        config = transformers.AutoConfig.for_model(LIGER_BASE[model_type], **fields)
    elif model_type in (*LINEARIZABLE, "mamba2"):
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        raise ValueError(
            f"no HF transformers peer for model_type {model_type!r}; expected a Llama/Qwen2/Mistral, Liger or "
            "mamba2 checkpoint"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype)
    return model.to(device).eval()


def run_linrec(llm, workload: Workload) -> tuple[float, float, list[list[int]]]:
    """Wall and CPU seconds to generate the workload through LLM.generate, and the tokens of each request."""
    from linrec.engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = llm.generate(workload.prompts, params)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    for i, (ids, n) in enumerate(zip(token_ids, workload.output_lens)):
        if len(ids) != n:
            raise RuntimeError(f"linrec generated {len(ids)} tokens for request {i}, expected {n}")
    return seconds, cpu_seconds, token_ids


def run_hf(model, workload: Workload, batch_size: int, pad_token_id: int) -> tuple[float, float, int, list[list[int]]]:
    """Wall and CPU seconds for HF generate over the workload in batches of `batch_size` (in workload order,
    left-padded), the tokens computed, and each request's first output_lens[i] generated tokens."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    token_ids: list[list[int]] = []
    num_generated = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for lo in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[lo : lo + batch_size]
            longest = max(workload.output_lens[lo : lo + batch_size])
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.int64)
            attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
            for row, p in enumerate(prompts):
                input_ids[row, width - len(p) :] = torch.tensor(p)
                attention_mask[row, width - len(p) :] = 1
            # eos_token_id=None: no stopping and no EOS masking, so greedy equals linrec's ignore_eos greedy
            config = GenerationConfig(
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad_token_id,
                eos_token_id=None,
                bos_token_id=None,
            )
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            generated = out[:, width:].tolist()
            num_generated += sum(len(g) for g in generated)
            token_ids.extend(g[:n] for g, n in zip(generated, workload.output_lens[lo : lo + batch_size]))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, num_generated, token_ids


def bench_model_dir(model: str | None, family: str, tmp: str) -> tuple[Path, dict, str | None]:
    """(directory, config.json, linearize) of a bench's model: `model`, or the tiny demo model of `family`
    written under `tmp`; a Llama/Qwen2/Mistral checkpoint is served linearized to Liger-GLA."""
    from linrec.models.loader import read_hf_config

    if model is None:
        from linrec.models.demo import write_demo_model
        from linrec.models.registry import DEMO_FAMILIES

        if family not in DEMO_FAMILIES:
            raise ValueError(f"expected a demo family in {DEMO_FAMILIES}, got {family!r}")
        path = write_demo_model(Path(tmp) / "model", family)
    else:
        path = Path(model)
    hf_config = read_hf_config(path)
    linearize = "liger-gla" if hf_config.get("model_type") in LINEARIZABLE else None
    return path, hf_config, linearize


def served_model_type(hf_config: dict[str, Any], linearize: str | None) -> str | None:
    """The model_type linrec serves a checkpoint as: its own, or the linearized config's."""
    from linrec.models.loader import linearize_config

    return (linearize_config(hf_config, linearize) if linearize else hf_config).get("model_type")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]

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
BENCH_FAMILIES = ("liger_gla", "mamba2", "lolcats_llama")
BENCH_FORMAT_VERSION = 1
BENCH_SEED = 0
BENCH_VOCAB_SIZE = 32000
# The Llama of the liger_gla and lolcats_llama bench models (the same weights' shape: their ratios compare).
_BENCH_LLAMA: dict[str, Any] = {
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
}
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    # Written as a plain Llama: linrec loads it with linearize="liger-gla", HF as LlamaForCausalLM.
    "liger_gla": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_BENCH_LLAMA},
    # That Llama with the released LoLCATs attention's window (64) and feature maps (F = 64 on 64-dim heads,
    # as the released 8B models have on 128-dim ones), written by linrec's own class (LINREC_WRITTEN).
    "lolcats_llama": {
        "model_type": "lolcats_llama",
        "architectures": ["LolcatsLlamaForCausalLM"],
        **_BENCH_LLAMA,
        "window_size": 64,
        "feature_dim": 64,
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
# LoLCATs (models/lolcats.py): its base is config.json's lolcats_base_model_type (llama when absent); the config
# keys it adds to the base's, and the per-layer tensors the base has no place for, are dropped for the HF peer.
LOLCATS = "lolcats_llama"
LOLCATS_CONFIG_KEYS = ("window_size", "feature_dim", "feature_map_eps", "lolcats_base_model_type", "lolcats_lora")
LOLCATS_TENSORS = (".self_attn.feature_map_q.", ".self_attn.feature_map_k.", ".self_attn.window_factors")
# Bench families transformers has no class for: linrec's own class writes them (models/demo.py), in the names
# of their released checkpoints.
LINREC_WRITTEN = (LOLCATS,)
# The model_types with an HF transformers peer (hf_peer)
HF_PEER_MODEL_TYPES = (*LINEARIZABLE, *LIGER_BASE, LOLCATS, "mamba2")


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


def cached_bench_model(name: str, family: str, overrides: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
    """The checkpoint write_bench_model(family, overrides, dtype) writes, kept as `name` under linrec's cache dir:
    written once, atomically (models/staging.py), and reused by every later run."""
    from linrec.envs import cache_dir
    from linrec.models.staging import cached_dir

    if family not in BENCH_FAMILIES:
        raise ValueError(f"expected a bench family in {BENCH_FAMILIES}, got {family!r}")
    return cached_dir(
        cache_dir() / "models" / name, lambda staging: write_bench_model(staging, family, overrides, dtype)
    )


def write_bench_model(
    dst: str | Path, family: str = "liger_gla", overrides: dict[str, Any] | None = None, dtype: str = "float32"
) -> Path:
    """Write a seeded random checkpoint (a transformers Llama for liger_gla, Mamba2 for mamba2; linrec's own
    class for LINREC_WRITTEN families) with the byte-level tokenizer, in `dtype` (float32 | bfloat16);
    `overrides` changes config fields (tests use it for a tiny model)."""
    import torch
    import transformers

    from linrec.models.tokenizer import demo_special_token_ids, write_byte_tokenizer

    if family not in BENCH_FAMILIES:
        raise ValueError(f"expected a bench family in {BENCH_FAMILIES}, got {family!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"expected dtype float32 or bfloat16, got {dtype!r}")
    fields = {**BENCH_CONFIGS[family], "vocab_size": BENCH_VOCAB_SIZE, **demo_special_token_ids()}
    fields.update(overrides or {})
    if family in LINREC_WRITTEN:
        from linrec.models.demo import write_seeded_model

        return write_seeded_model(dst, family, fields, vocab_size=fields["vocab_size"], dtype=dtype, seed=BENCH_SEED)
    model_type = fields.pop("model_type")
    fields.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(BENCH_SEED)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    dst = Path(dst)
    model.save_pretrained(dst)
    write_byte_tokenizer(dst)
    return dst


def base_model_type(hf_config: dict[str, Any]) -> str | None:
    """The base transformer whose weights a Liger or LoLCATs checkpoint keeps (its HF peer); None for others."""
    model_type = hf_config.get("model_type")
    if model_type == LOLCATS:
        return hf_config.get("lolcats_base_model_type") or "llama"
    return LIGER_BASE.get(model_type)


def is_lolcats_tensor(name: str) -> bool:
    """Whether checkpoint tensor `name` is a LoLCATs feature map or window factor (no base transformer has it)."""
    return any(part in name for part in LOLCATS_TENSORS)


def hf_peer(path: Path, hf_config: dict[str, Any], dtype, device):
    """The transformers model a user would run instead: the base transformer of a Liger, LoLCATs or
    linearized checkpoint, or Mamba2ForCausalLM for mamba2.

    A LoLCATs checkpoint's base is read by name with linrec's readers, without its feature maps and window
    factors, and must fill the base model exactly; its own LoRA (lolcats_lora) is not merged: the base is the
    original transformer, what a user runs instead of linearizing."""
    import transformers

    model_type = hf_config.get("model_type")
    base = base_model_type(hf_config)
    if base is not None:
        dropped = {"model_type", "architectures", "window_size", *LOLCATS_CONFIG_KEYS}
        fields = {k: v for k, v in hf_config.items() if k not in dropped}
        config = transformers.AutoConfig.for_model(base, **fields)
        if model_type == LOLCATS:
            return _base_from_checkpoint(path, config, dtype).to(device).eval()
    elif model_type in (*LINEARIZABLE, "mamba2"):
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        raise ValueError(
            f"no HF transformers peer for model_type {model_type!r}; expected a Llama/Qwen2/Mistral, Liger, "
            "LoLCATs or mamba2 checkpoint"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype)
    return model.to(device).eval()


def _base_from_checkpoint(path: Path, config, dtype):
    """The transformers class of `config` holding every tensor of the checkpoint at `path` but the LoLCATs
    ones (read with linrec's readers: any index or shard layout linrec loads). A missing or unexpected tensor
    is an error: a peer with random weights in their place would time a different model."""
    import transformers

    from linrec.models.loader import checkpoint_files, iter_checkpoint_tensors

    state = {n: t for n, t in iter_checkpoint_tensors(checkpoint_files(path)) if not is_lolcats_tensor(n)}
    model_cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model, info = model_cls.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(
            f"expected {model_cls.__name__} to take every base tensor of {str(path)!r}, got missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


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

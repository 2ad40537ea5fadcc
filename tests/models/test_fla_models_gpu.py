"""Our GLA and Gated DeltaNet against flash-linear-attention's own HF model classes, on CUDA.

Needs a GPU and the full `flash-linear-attention` package (fla.models; fla-core alone has no models).
Each comparison runs in a subprocess: importing fla.models re-registers transformers' mamba/mamba2
configs, which must not leak into the rest of the test session. Run this file directly to see the
numbers: `python tests/models/test_fla_models_gpu.py gla demo`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB = 96
# fp32 on both sides; fla's chunk kernels may round matmul inputs to tf32, hence a relative bound
MAX_REL_DIFF = 5e-3

CASES = {
    "gla": {
        "demo": {},
        "gqa_untied_relu": dict(num_kv_heads=2, tie_word_embeddings=False, feature_map="relu", clamp_min=-0.05),
        "unfused_no_conv": dict(fuse_norm=False, use_short_conv=False),
    },
    "gated_deltanet": {
        "demo": {},
        "gva_neg_eigval_untied": dict(num_v_heads=4, allow_neg_eigval=True, tie_word_embeddings=False),
        "no_gate_no_conv": dict(use_gate=False, use_short_conv=False),
        "sigmoid_gate": dict(output_gate_activation="sigmoid", expand_v=1.0),
    },
}


def _fla_models_available() -> bool:
    # Looks for fla/models on disk without importing fla (fla-core's import alone takes seconds).
    spec = importlib.util.find_spec("fla")
    return spec is not None and any((Path(p) / "models").is_dir() for p in spec.submodule_search_locations or [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not _fla_models_available(), reason="needs the flash-linear-attention package (fla.models)")
@pytest.mark.parametrize("family,case", [(f, c) for f, cases in CASES.items() for c in cases])
def test_matches_fla_model_on_cuda(family: str, case: str):
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), family, case], capture_output=True, text=True, timeout=900
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"{family}/{case} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def _compare(family: str, case: str) -> bool:
    """Build fla's model on a tiny config, load its state_dict into ours, compare logits. True if close."""
    import fla.models as fla_models

    from linrec.models.batch import ForwardBatch
    from linrec.models.gated_deltanet import GatedDeltaNetForCausalLM
    from linrec.models.gla import GLAForCausalLM

    ours_cls, fla_config_cls, fla_model_cls = {
        "gla": (GLAForCausalLM, fla_models.GLAConfig, fla_models.GLAForCausalLM),
        "gated_deltanet": (
            GatedDeltaNetForCausalLM,
            fla_models.GatedDeltaNetConfig,
            fla_models.GatedDeltaNetForCausalLM,
        ),
    }[family]
    cfg = {**ours_cls.demo_hf_config(), "vocab_size": VOCAB, **CASES[family][case]}
    fla_kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    device = torch.device("cuda")
    theirs = fla_model_cls(fla_config_cls(**fla_kwargs)).to(device).eval()
    with torch.no_grad():
        # fla's init (std 0.02, unit norms, zero biases) leaves logits nearly flat: make every tensor matter
        for name, p in theirs.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_(std=1.0)
            elif p.ndim >= 2:
                p.normal_(std=p.shape[-1] ** -0.5)
        if cfg.get("tie_word_embeddings"):
            theirs.lm_head.weight.copy_(theirs.model.embeddings.weight)

    ok = True
    for backend in ("torch", "auto"):
        ours = ours_cls.from_hf_config(cfg, kernel_backend=backend).to(device).eval()
        ours.load_weights(theirs.state_dict().items())
        for T in (20, 100):  # fla runs its fused_recurrent kernels up to 64 tokens and chunk kernels beyond
            ids = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(T)).to(device)
            with torch.no_grad():
                ref = theirs(input_ids=ids[None], use_cache=False).logits[0].float()
                state = ours.allocate_state(2, device)
                full = ours.compute_logits(ours(ids, ForwardBatch.build([T], device=device), state))
                # prefill half, then token-by-token decode: the serving path
                state = ours.allocate_state(2, device)
                half = T // 2
                pieces = [ours.compute_logits(ours(ids[:half], ForwardBatch.build([half], device=device), state))]
                for t in range(half, T):
                    batch = ForwardBatch.build([1], start_positions=[t], device=device)
                    pieces.append(ours.compute_logits(ours(ids[t : t + 1], batch, state)))
                decoded = torch.cat(pieces)
            scale = ref.abs().max().item()
            for what, logits in (("full forward", full), ("prefill + decode", decoded)):
                rel = (logits - ref).abs().max().item() / scale
                good = rel < MAX_REL_DIFF
                ok &= good
                print(
                    f"{family}/{case} backend={backend} T={T} {what}: max abs diff / max |logits| = {rel:.2e}"
                    f" (|logits| <= {scale:.2f}){'' if good else '  FAIL'}"
                )
    return ok


if __name__ == "__main__":
    sys.exit(0 if _compare(sys.argv[1], sys.argv[2]) else 1)

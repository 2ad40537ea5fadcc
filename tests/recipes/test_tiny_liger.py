"""The default model's recipe end to end at micro scale, on a small synthetic corpus written as reStructuredText:
tokenizer -> Llama -> convert -> LoRA -> merge -> linrec loads and generates -> report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from linrec.models.loader import load_model
from linrec.models.tokenizer import load_tokenizer
from linrec.recipes.tiny_liger import REPORT_BEGIN, REPORT_END, RecipeConfig, main

SENTENCES = (
    "A list is a mutable sequence of items that keeps their order.",
    "The dictionary maps each key to a value and finds it quickly.",
    "A function returns a value to the code that called it.",
    "The module defines classes that read and write files on the disk.",
    "An exception is raised when an operation cannot be completed.",
    "The loop runs the block once for every item of the sequence.",
    "A string is an immutable sequence of characters.",
    "The generator yields one value at a time instead of building a list.",
    "Each thread runs its own task while the others wait for the lock.",
    "The parser reads the text and returns a tree of nodes.",
    "A tuple holds a fixed number of values that never change.",
    "The socket sends bytes to the server and waits for its answer.",
)
TOPICS = ("lists", "dictionaries", "functions", "files", "exceptions", "loops", "strings", "generators")
MICRO = [
    "--seed=0",
    "--num-threads=1",
    "--held-out-fraction=0.25",
    "--vocab-size=320",
    "--hidden-size=32",
    "--intermediate-size=64",
    "--num-hidden-layers=2",
    "--num-attention-heads=4",
    "--num-key-value-heads=2",
    "--seq-len=80",
    "--batch-size=4",
    "--pretrain-steps=40",
    "--pretrain-lr=3e-3",
    "--warmup-steps=5",
    "--lora-steps=20",
    "--lora-lr=5e-3",
    "--loss-probe-batches=2",
    "--eval-batch-size=8",
    "--sample-tokens=8",
]


def write_corpus(root: Path, num_docs: int = 12, seed: int = 0) -> Path:
    """Documents with titles, paragraphs, code, directives and index entries, as CPython's docs have them."""
    rng = random.Random(seed)
    for d in range(num_docs):
        topic = TOPICS[d % len(TOPICS)]
        lines = [f".. _doc-{d}:", "", f"Working with {topic} ({d})", "=" * 40, "", f".. index:: single: {topic}", ""]
        for s in range(3):
            lines += [f"Part {s} about :mod:`{topic}`", "-" * 30, ""]
            for _ in range(3):
                lines += [" ".join(rng.choice(SENTENCES) for _ in range(4)), ""]
            lines += ["For example::", "", f"    x = {topic}[{s}]", "", ".. versionadded:: 3.11", ""]
        path = root / f"doc{d}.rst.txt"
        path.write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    (root / "corpus").mkdir()
    corpus = write_corpus(root / "corpus")
    report = root / "default-model.md"
    report.write_text("# The default model\n\nHand-written text stays.\n")
    argv = ["train", f"--work-dir={root / 'work'}", f"--out={root / 'out'}", f"--corpus={corpus}", f"--report={report}"]
    assert main([*argv, *MICRO]) == 0
    return root, json.loads((root / "work" / "run.json").read_text())


def test_stages_ran_and_lora_lowered_the_training_loss(micro_run):
    root, run = micro_run
    assert list(run["stages"]) == ["corpus", "tokenizer", "pretrain", "convert", "lora", "merge", "evaluate"]
    assert run["corpus"]["num_held_out_documents"] == 3 and run["corpus"]["num_train_documents"] == 9
    assert run["pretrain"]["losses"][-1] < run["pretrain"]["losses"][0]
    assert run["lora"]["probe_loss_after"] < run["lora"]["probe_loss_before"]
    assert run["lora"]["num_trainable_parameters"] == 2 * 8 * (32 + 32 + 2 * (32 + 16))  # r=8: q, k, v per layer
    assert run["merge"]["max_logit_difference_merged_vs_adapter"] < 1e-4


def test_perplexities_are_finite_and_samples_are_text(micro_run):
    root, run = micro_run
    evaluation = run["evaluation"]
    assert [r["key"] for r in evaluation["rows"]] == ["llama", "liger", "liger+lora", "shipped"]
    for row in evaluation["rows"]:
        assert math.isfinite(row["ppl"]) and 1.0 < row["ppl"] < 320, row
        assert row["num_tokens"] == evaluation["rows"][0]["num_tokens"] > 0
    for key, texts in evaluation["samples"].items():
        assert len(texts) == len(evaluation["prompts"]) and all(isinstance(t, str) for t in texts), key


def test_the_merged_checkpoint_loads_and_has_a_chat_template(micro_run):
    root, _ = micro_run
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    model = load_model(out, kernel_backend="torch")
    assert model.config.model_type == "liger_gla" and model.config.tie_word_embeddings
    tokenizer = load_tokenizer(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|bos|><|user|>Hi<|eos|><|assistant|>"
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|eos|>")


def test_report_keeps_the_hand_written_part(micro_run):
    root, run = micro_run
    text = (root / "default-model.md").read_text()
    assert text.startswith("# The default model\n\nHand-written text stays.\n")
    assert text.count(REPORT_BEGIN) == 1 and text.count(REPORT_END) == 1
    assert "| Liger-GLA + LoRA (merged at load) | linrec |" in text
    assert "python -m linrec.recipes.tiny_liger train" in text


def test_a_rerun_writes_the_same_checkpoint(micro_run, tmp_path):
    root, _ = micro_run
    argv = ["train", f"--work-dir={tmp_path / 'work'}", f"--out={tmp_path / 'out'}", f"--corpus={root / 'corpus'}"]
    assert main([*argv, *MICRO, "--sample-tokens=1"]) == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (root / "out" / name).read_bytes(), name


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_attention_heads divisible by num_key_value_heads"):
        RecipeConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="held_out_fraction"):
        RecipeConfig(held_out_fraction=1.0)

"""A byte-level BPE tokenizer trained on the corpus, with linrec's chat tokens and chat template.

The special tokens and the template are those of linrec's demo tokenizer (models/tokenizer.py), so the
server renders a conversation as <|bos|><|user|>...<|eos|><|assistant|>... for this model as for the demo;
here they come first (ids 0..5) and the learned byte-level merges follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from linrec.models.tokenizer import (
    BOS_TOKEN,
    DEMO_CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    save_chat_tokenizer,
)

CHAT_TEMPLATE = DEMO_CHAT_TEMPLATE


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer`: GPT-2-style byte-level BPE with `vocab_size` tokens in all (SPECIAL_TOKENS
    first, then the 256 bytes, then merges). Encoding with special tokens prepends <|bos|>.

    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    num_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size <= num_fixed:
        raise ValueError(f"expected vocab_size > {num_fixed} (special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids, as config.json and generation_config.json spell them."""
    return {
        "bos_token_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "pad_token_id": tokenizer.token_to_id(PAD_TOKEN),
    }


def save_tokenizer(tokenizer, dst: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into `dst`: the demo
    tokenizer's files (models/tokenizer.py), with this tokenizer's vocabulary and length."""
    save_chat_tokenizer(tokenizer, dst, model_max_length)

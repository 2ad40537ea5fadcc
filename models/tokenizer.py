"""Tokenizers: loading a checkpoint's own, and the byte-level one the demo models ship with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Files whose presence means a directory carries a tokenizer transformers can load.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

# The demo tokenizer: ids 0..255 are the raw bytes, the special tokens follow in this order.
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"  # also ends every chat turn, so generation stops where a turn would
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values())
NUM_BYTE_TOKENS = 256
DEMO_VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)

# <|bos|><|system|>...<|eos|><|user|>...<|eos|><|assistant|>...<|eos|>, then <|assistant|> when a reply
# is wanted. Roles outside ROLE_TOKENS are refused rather than rendered as text the model never saw.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('expected role system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: the alphabet of ByteLevel pre-tokenization."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    num_shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + num_shifted)
            num_shifted += 1
    return chars


def build_byte_tokenizer():
    """A `tokenizers.Tokenizer` whose token i < 256 is byte i (no merges), plus SPECIAL_TOKENS.

    Encoding prepends <|bos|> when special tokens are requested; decoding is the exact inverse on any
    UTF-8 text (no normalizer, no prefix space, no cleanup).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting, every byte stands alone anyway.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    if tokenizer.get_vocab_size() != DEMO_VOCAB_SIZE:
        raise AssertionError(f"byte tokenizer has {tokenizer.get_vocab_size()} tokens, expected {DEMO_VOCAB_SIZE}")
    return tokenizer


def demo_special_token_ids() -> dict[str, int]:
    """bos/eos/pad token ids of the demo tokenizer, for config.json and generation_config.json."""
    return {
        "bos_token_id": NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(PAD_TOKEN),
    }


def write_byte_tokenizer(dst: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) of the demo tokenizer."""
    save_chat_tokenizer(build_byte_tokenizer(), dst, model_max_length=1 << 30)


def save_chat_tokenizer(tokenizer, dst: str | Path, model_max_length: int) -> None:
    """Write a `tokenizers.Tokenizer` with linrec's special tokens as tokenizer.json, and its
    tokenizer_config.json (transformers' fast tokenizer, <|bos|> prepended, linrec's chat template)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | Path):
    """The tokenizer (with its chat template) saved beside a checkpoint; never downloads.

    Raises FileNotFoundError when `path` holds no tokenizer files.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {str(path)!r} does not exist (only local directories are accepted)"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {str(path)!r}: expected tokenizer.json or tokenizer_config.json")

    from transformers import AutoTokenizer, PretrainedConfig  # the spelling transformers 4.x and 5.x both have
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs: dict[str, Any] = {}
    if _read_model_type(path) not in CONFIG_MAPPING:
        # A model_type transformers does not know (liger_gla, ...): let AutoTokenizer go by
        # tokenizer_config.json alone instead of parsing config.json as some other model's config.
        kwargs["config"] = PretrainedConfig()
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {first_line}") from exc


def _read_model_type(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None

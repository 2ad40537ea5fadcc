"""Suite-wide setup: Triton kernels run under the interpreter where there is no GPU; tiny demo checkpoints
shared by the engine and bench suites.

triton.jit reads TRITON_INTERPRET when it decorates a kernel (triton 3.9: knobs.runtime.interpret, read
from the environment at each access), so it is set here, before any test module imports linrec.kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Subprocesses the tests start (`python -m linrec...` from the checkout) must not put the working directory
# first on sys.path: this checkout's kernels/ folder would shadow the PyPI package `kernels`, which transformers
# (5.25 on) imports. linrec itself is importable through its editable install.
os.environ.setdefault("PYTHONSAFEPATH", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """Per family, a tiny demo checkpoint written once for the whole session."""
    from linrec.models.demo import write_demo_model

    made: dict[str, str] = {}

    def get(family: str = "liger_gla") -> str:
        if family not in made:
            path = tmp_path_factory.mktemp(f"demo-{family}")
            write_demo_model(path, family)
            made[family] = str(path)
        return made[family]

    return get


# A word list nobody here wrote: Debian's `wamerican` (SCOWL's American English, 104k words), which
# `.ci/run` installs. Text is judged against it, not against the corpus or tokenizer of our own model.
WORD_LIST = "/usr/share/dict/words"


@pytest.fixture(scope="session")
def english_words() -> frozenset[str]:
    """Lowercased words of the system word list (skips the test without one)."""
    try:
        with open(WORD_LIST, encoding="utf-8", errors="replace") as f:
            return frozenset(line.strip().lower() for line in f if line.strip())
    except FileNotFoundError:
        pytest.skip(f"no word list at {WORD_LIST} (Debian: apt-get install wamerican)")


@pytest.fixture(scope="session")
def assert_english(english_words):
    """assert_readable_english against the system word list."""
    return lambda text, min_word_share=0.6: assert_readable_english(text, english_words, min_word_share)


def assert_readable_english(text: str, words: frozenset[str], min_word_share: float = 0.6) -> None:
    """`text` is valid text (no replacement characters, no lone surrogates), at least 95% printable, and at
    least `min_word_share` of its whitespace-separated tokens are dictionary words once the punctuation
    around them is stripped (possessives and plurals of dictionary words count)."""
    assert text.strip(), f"empty text: {text!r}"
    assert "\ufffd" not in text, f"replacement characters (invalid UTF-8 decoded): {text!r}"
    text.encode("utf-8")  # raises on a lone surrogate
    printable = sum(c.isprintable() or c in "\n\t" for c in text)
    assert printable >= 0.95 * len(text), f"only {printable}/{len(text)} printable characters: {text!r}"
    tokens = text.split()
    known = 0
    for token in tokens:
        word = token.strip("\"'`()[]{}<>.,;:!?*-_").lower()
        known += bool(word) and (
            word in words or word.removesuffix("'s") in words or (word.endswith("s") and word[:-1] in words)
        )
    assert known >= min_word_share * len(tokens), f"only {known}/{len(tokens)} dictionary words: {text!r}"

"""The corpus of the default model: the Python 3.11 documentation's reStructuredText, read as English prose.

Debian's `python3.11-doc` package ships the sources Sphinx built the HTML from, under
usr/share/doc/python3.11/html/_sources/**/*.rst.txt (~500 files, ~11 MB; ~6.8 MB of prose once code, tables
and markup are gone). Python's documentation is licensed under the PSF License Version 2 (the package's
usr/share/doc/python3.11-doc/copyright; the docs' own license page). Documents are split into training and
held-out sets whole, by a seeded shuffle, so no held-out paragraph was ever seen in training.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from linrec.recipes.rst_prose import Section, collect_ref_titles, rst_to_sections

DEB_PACKAGE = "python3.11-doc"
SOURCES_SUBDIR = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT_FILE = "usr/share/doc/python3.11-doc/copyright"
LICENSE = "PSF License Version 2 (Python Software Foundation License Agreement)"
# A chat example asks about a section by its title; the answer is the section's opening text.
CHAT_PROMPTS = ("Tell me about {title}.", "What is {title}?", "Explain {title}.", "{title}")
MAX_ANSWER_CHARS = 700


@dataclass(frozen=True)
class Document:
    """One source file: its path relative to the corpus root and its sections of prose."""

    name: str
    sections: tuple[Section, ...]

    @property
    def paragraphs(self) -> list[str]:
        return [p for s in self.sections for p in s.paragraphs]

    @property
    def text(self) -> str:
        """The document's prose, paragraphs separated by blank lines."""
        return "\n\n".join(self.paragraphs)


@dataclass(frozen=True)
class CorpusSource:
    """Where the corpus came from, for the report."""

    root: Path  # the directory of .rst/.rst.txt files that was read
    package: str | None  # e.g. "python3.11-doc 3.11.2-6+deb12u8" when fetched with apt, else None


def fetch_python_docs(workdir: str | Path) -> CorpusSource:
    """Download Debian's python3.11-doc with `apt-get download` into `workdir` (reused when already there)
    and unpack it with `dpkg-deb -x`. Returns the _sources directory and the package version.

    Needs apt (any Debian/Ubuntu with the package in its sources); elsewhere pass a directory of .rst files.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    debs = sorted(workdir.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise RuntimeError(
                f"apt-get not found: cannot download {DEB_PACKAGE}; pass --corpus DIR with the .rst sources instead"
            )
        subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=workdir, check=True, capture_output=True)
        debs = sorted(workdir.glob(f"{DEB_PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {DEB_PACKAGE} left no .deb in {str(workdir)!r}")
    deb = debs[-1]
    unpacked = workdir / "root"
    sources = unpacked / SOURCES_SUBDIR
    if not sources.is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
    if not (unpacked / COPYRIGHT_FILE).is_file() or not sources.is_dir():
        raise RuntimeError(f"{deb.name} holds no {SOURCES_SUBDIR} with its copyright file")
    version = deb.name.removeprefix(f"{DEB_PACKAGE}_").rsplit("_", 1)[0]
    return CorpusSource(root=sources, package=f"{DEB_PACKAGE} {version}")


def source_files(root: str | Path) -> list[Path]:
    """Every reStructuredText file under `root` (*.rst.txt as Sphinx copies them, or *.rst), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {str(root)!r} does not exist")
    files = sorted({*root.rglob("*.rst.txt"), *root.rglob("*.rst")})
    if not files:
        raise FileNotFoundError(f"no *.rst or *.rst.txt files under {str(root)!r}")
    return files


def read_documents(root: str | Path) -> list[Document]:
    """Every file under `root` as a Document (those without any prose left out), in path order.

    :ref:`label` links read as the titles of the sections they point to, collected over the whole corpus.
    """
    root = Path(root)
    texts = {f.relative_to(root).as_posix(): f.read_text(encoding="utf-8") for f in source_files(root)}
    titles: dict[str, str] = {}
    for text in texts.values():
        titles.update(collect_ref_titles(text))
    docs = []
    for name, text in texts.items():
        sections = tuple(s for s in rst_to_sections(text, titles) if s.paragraphs)
        if sections:
            docs.append(Document(name, sections))
    return docs


def split_documents(docs: list[Document], held_out_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, held_out): whole documents, held_out_fraction of them (at least one) chosen by `seed`."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"expected held_out_fraction in (0, 1), got {held_out_fraction}")
    if len(docs) < 2:
        raise ValueError(f"expected at least 2 documents to split, got {len(docs)}")
    order = sorted(range(len(docs)), key=lambda i: docs[i].name)
    random.Random(seed).shuffle(order)
    num_held_out = min(len(docs) - 1, max(1, round(held_out_fraction * len(docs))))
    held = set(order[:num_held_out])
    train = [d for i, d in enumerate(docs) if i not in held]
    held_out = [d for i, d in enumerate(docs) if i in held]
    return train, held_out


def chat_examples(docs: list[Document], seed: int) -> Iterator[list[dict[str, str]]]:
    """One conversation per titled section: the user asks about the title, the assistant answers with the
    section's opening paragraphs (up to MAX_ANSWER_CHARS, whole paragraphs, at least one)."""
    rng = random.Random(seed)
    for doc in docs:
        for section in doc.sections:
            if not section.title or not section.paragraphs:
                continue
            answer = section.paragraphs[0]
            for paragraph in section.paragraphs[1:]:
                if len(answer) + 2 + len(paragraph) > MAX_ANSWER_CHARS:
                    break
                answer += "\n\n" + paragraph
            prompt = rng.choice(CHAT_PROMPTS).format(title=section.title)
            yield [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

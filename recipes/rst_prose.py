"""reStructuredText -> English prose: what a small language model should read of the Python docs.

Kept: paragraphs, list items, the bodies of admonitions (note, warning, seealso, versionchanged, ...) and of
description directives (function, class, method, ...: the signature goes, the description stays), and
definition lists as "term: definition". Dropped: code (literal blocks after `::`, doctest blocks, code-block
and friends), tables, index entries, comments, targets, toctrees, options and other markup that is not a
sentence. Inline markup becomes its text: :func:`~os.path.join` -> join(), ``x`` -> x, `text <url>`_ -> text.
Section titles are kept apart from the prose (a Section's title), so that a recipe can pair a title with
the text under it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# Directives that describe an API: a signature header (possibly several lines, options below it) up to
# the first blank line, then a prose body.
SIGNATURE_DIRECTIVES = frozenset(
    {
        "function",
        "method",
        "classmethod",
        "staticmethod",
        "coroutinefunction",
        "coroutinemethod",
        "awaitablefunction",
        "awaitablemethod",
        "abstractmethod",
        "decorator",
        "decoratormethod",
        "class",
        "exception",
        "attribute",
        "data",
        "describe",
        "object",
        "opcode",
        "cmdoption",
        "option",
        "envvar",
        "pdbcommand",
        "c:function",
        "c:member",
        "c:type",
        "c:var",
        "c:macro",
        "c:struct",
        "c:data",
    }
)
# Directives whose body is prose and may start on the line after the directive (".. versionchanged:: 3.4"
# then the text); the argument is dropped unless it is text itself (TEXT_ARGUMENT_DIRECTIVES).
BODY_DIRECTIVES = frozenset(
    {
        "note",
        "warning",
        "important",
        "caution",
        "tip",
        "hint",
        "attention",
        "danger",
        "error",
        "admonition",
        "seealso",
        "versionadded",
        "versionchanged",
        "deprecated",
        "deprecated-removed",
        "impl-detail",
        "topic",
        "sidebar",
        "epigraph",
        "glossary",
    }
)
TEXT_ARGUMENT_DIRECTIVES = frozenset(
    {"note", "warning", "important", "caution", "tip", "hint", "attention", "danger", "error", "seealso"}
)
# What |name| substitutions read as in CPython's docs.
SUBSTITUTIONS = {"version": "3.11", "release": "3.11", "today": "", "python_version": "3.11"}

_SECTION_CHARS = set("=-`:'\"~^_*+#<>.")
_DIRECTIVE = re.compile(r"\.\.\s+([\w:.-]+)::(.*)")
_ROLE = re.compile(r":([\w.+-]+(?::[\w.+-]+)*):`((?:[^`\\]|\\.)+)`")
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_INTERPRETED = re.compile(r"`([^`]+)`_{0,2}")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FOOTNOTE_REF = re.compile(r"\s*\[(?:#[\w-]*|\d+|\*)\]_")
_SUBSTITUTION = re.compile(r"\|([\w-]+)\|_{0,2}")
_BULLET = re.compile(r"([-*+•]|\d+[.)]|#\.|\(\d+\)|[a-zA-Z][.)])\s+")
_TABLE_LINE = re.compile(r"[+|]|=+(\s+=+)+\s*$")
_FIELD = re.compile(r":[\w -]+:(\s|$)")
_TARGET = re.compile(r"\.\.\s+_([^:`]+):")


@dataclass
class Section:
    """One titled part of a document: its title (inline markup removed; "" before the first title) and
    its prose paragraphs, each one line of plain text."""

    title: str
    paragraphs: list[str] = field(default_factory=list)


def rst_to_sections(text: str, ref_titles: Mapping[str, str] | None = None) -> list[Section]:
    """A reStructuredText document -> its sections, in order, each with its prose paragraphs.

    ref_titles (label -> section title, from `collect_ref_titles` over every document) names the sections that
    :ref:`label` points to; an unknown label reads as itself. Sections without prose are kept (their
    title may still matter to a caller); callers filter.
    """
    sections = [Section("")]
    for kind, payload in _blocks(text.splitlines(), ref_titles or {}):
        if kind == "title":
            sections.append(Section(payload))
        else:
            sections[-1].paragraphs.append(payload)
    return sections


def rst_to_prose(text: str, ref_titles: Mapping[str, str] | None = None) -> str:
    """The prose of a reStructuredText document: its paragraphs, separated by blank lines."""
    return "\n\n".join(p for s in rst_to_sections(text, ref_titles) for p in s.paragraphs)


def collect_ref_titles(text: str) -> dict[str, str]:
    """label -> title of every section a `.. _label:` target stands above, in one document."""
    lines = [line.rstrip() for line in text.splitlines()]
    found: dict[str, str] = {}
    pending: list[str] = []  # labels waiting for the next title
    for i, line in enumerate(lines):
        target = _TARGET.fullmatch(line.strip())
        if target:
            pending.append(target.group(1).lower())
            continue
        if not pending or not line.strip():
            continue
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if _is_underline(line.strip()) and i + 2 < len(lines) and _is_underline(lines[i + 2].strip()):
            continue  # an overline: the title is the next line
        if nxt and _is_underline(nxt) and not _is_underline(line.strip()):
            for label in pending:
                found[label] = _title(line, {})
        pending = []
    return found


def clean_inline(text: str, ref_titles: Mapping[str, str] | None = None) -> str:
    """Inline reStructuredText markup -> the text a reader sees; whitespace collapsed to single spaces."""
    titles = ref_titles or {}
    text = _ROLE.sub(lambda m: _role_text(m, titles), text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub("", text)
    text = _SUBSTITUTION.sub(lambda m: SUBSTITUTIONS.get(m.group(1), m.group(1)), text)
    text = text.replace("\\ ", "").replace("\\", "")
    return " ".join(text.split())


def is_prose(paragraph: str) -> bool:
    """A paragraph worth training on: a few words, mostly letters, not a line of code or a table row."""
    words = paragraph.split()
    if len(words) < 3 or len(paragraph) < 20:
        return False
    letters = sum(c.isalpha() for c in paragraph)
    if letters < 0.6 * len(paragraph.replace(" ", "")):
        return False
    return not paragraph.startswith((">>>", "$ ", "...", "#", "{", "[", "(", "def ", "class ", "import "))


def _role_text(match: re.Match, ref_titles: Mapping[str, str]) -> str:
    role, content = match.group(1), match.group(2).replace("\\", "")
    explicit = re.fullmatch(r"(.*?)\s*<([^<>]*)>", content, flags=re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    if explicit:
        content = explicit.group(2)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    name = role.rsplit(":", 1)[-1]
    if name in ("ref", "doc") and explicit is None:
        return ref_titles.get(content.lower(), content)
    if name == "abbr":
        return content.split(" (", 1)[0]
    if name in ("pep", "rfc"):
        return f"{name.upper()} {content}"
    if name in ("issue", "gh"):
        return f"issue {content}"
    if name in ("func", "meth") and not content.endswith(")"):
        return content + "()"
    return content


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_underline(line: str) -> bool:
    s = line.rstrip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in _SECTION_CHARS


def _blocks(lines: list[str], ref_titles: Mapping[str, str]):
    """Yield ("title", text) and ("paragraph", text) in document order."""
    paragraph: list[str] = []  # raw lines of the paragraph being read
    skip_deeper_than: int | None = None  # skip blank lines and lines indented more than this
    skip_options_deeper_than: int | None = None  # a kept directive's ":option:" lines
    i = 0
    while i < len(lines):
        line = lines[i].expandtabs(8).rstrip()
        i += 1
        if skip_deeper_than is not None:
            if not line.strip() or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        stripped = line.strip()
        if skip_options_deeper_than is not None:
            if stripped and _indent(line) > skip_options_deeper_than and _FIELD.match(stripped):
                continue
            if stripped:
                skip_options_deeper_than = None
        if not stripped:
            yield from _flush(paragraph, ref_titles)
            if paragraph and _ends_literal(paragraph):
                skip_deeper_than = _indent(paragraph[0])
            paragraph = []
            continue
        if not paragraph and stripped.startswith(".."):
            directive = _DIRECTIVE.match(stripped)
            name = directive.group(1) if directive else None
            if name in SIGNATURE_DIRECTIVES:
                # the header (signatures, continued with backslashes or stacked, and options) ends at the
                # first blank line; the body after it is the prose
                while i < len(lines) and lines[i].strip():
                    i += 1
                continue
            if name in BODY_DIRECTIVES:
                argument = directive.group(2).strip()
                if name in TEXT_ARGUMENT_DIRECTIVES and argument:  # ".. note:: Text ..."
                    paragraph = [" " * (_indent(line) + 3) + argument]
                skip_options_deeper_than = _indent(line)
                continue
            skip_deeper_than = _indent(line)  # comments, targets, code, tables, index, toctree, ...
            continue
        if _is_underline(stripped):
            if len(paragraph) == 1:  # the line above was a section title
                yield ("title", _title(paragraph[0], ref_titles))
                paragraph = []
                continue
            if not paragraph and i < len(lines) and i + 1 < len(lines) and _is_underline(lines[i + 1].strip()):
                # an overline: the next line is the title, the one after its underline
                yield ("title", _title(lines[i], ref_titles))
                i += 2
                continue
        paragraph.append(line)
    yield from _flush(paragraph, ref_titles)


def _ends_literal(paragraph: list[str]) -> bool:
    return paragraph[-1].rstrip().endswith("::")


def _title(line: str, ref_titles: Mapping[str, str]) -> str:
    return clean_inline(line, ref_titles).replace(" --- ", ": ").replace(" -- ", ": ").strip()


def _flush(paragraph: list[str], ref_titles: Mapping[str, str]):
    if not paragraph:
        return
    first = paragraph[0].strip()
    if first.startswith(">>>") or any(_TABLE_LINE.match(line.strip()) for line in paragraph):
        return  # a doctest block or a table
    if _BULLET.match(first):  # list items without blank lines between them: one paragraph each
        base = _indent(paragraph[0])
        starts = [j for j, ln in enumerate(paragraph) if _indent(ln) == base and _BULLET.match(ln.strip())]
        for a, b in zip(starts, [*starts[1:], len(paragraph)]):
            yield from _flush_one(paragraph[a:b], ref_titles)
        return
    yield from _flush_one(paragraph, ref_titles)


def _flush_one(paragraph: list[str], ref_titles: Mapping[str, str]):
    lines = list(paragraph)
    if lines[-1].rstrip().endswith("::"):  # "text::" reads "text:"; "text ::" and "::" read nothing
        last = lines[-1].rstrip()[:-2]
        lines[-1] = last if last.endswith(" ") or not last.strip() else last + ":"
    text_lines = [ln.strip() for ln in lines]
    if len(lines) > 1 and _indent(lines[1]) > _indent(lines[0]) and not _BULLET.match(text_lines[0]):
        # a definition list item: "term" then its indented definition
        term, body = clean_inline(text_lines[0], ref_titles), clean_inline(" ".join(text_lines[1:]), ref_titles)
        text = f"{term}: {body}" if term and body else term or body
    else:
        text = clean_inline(" ".join(text_lines), ref_titles)
        bullet = _BULLET.match(text)
        if bullet:
            text = text[bullet.end() :]
    if text.strip() and is_prose(text):
        yield ("paragraph", text.strip())

"""The reStructuredText -> prose cleaner on a sample written like CPython's docs."""

from __future__ import annotations

from linrec.recipes.rst_prose import clean_inline, collect_ref_titles, is_prose, rst_to_prose, rst_to_sections

SAMPLE = """\
.. _json-intro:

:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. index:: single: JSON

The :mod:`json` module exposes an API familiar to users of the :mod:`marshal`
and :mod:`pickle` modules, see `the JSON site <https://json.org>`_ for more [#note]_.

Encoding basic Python object hierarchies::

    >>> import json
    >>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])

.. code-block:: shell-session

    $ echo '{"json":"obj"}' | python -m json.tool

>>> json.loads('[1, 2]')
[1, 2]

Basic Usage
-----------

.. function:: dump(obj, fp, *, skipkeys=False, ensure_ascii=True, \\
                   check_circular=True)
   :noindex:

   Serialize *obj* as a JSON formatted stream to *fp* using
   :func:`~json.JSONEncoder.encode` and ``str`` objects.

   .. versionchanged:: 3.6
      All optional parameters are now **keyword-only**.

   .. note:: Keys in key/value pairs of JSON are always of the type :class:`str`.

+--------+---------+
| JSON   | Python  |
+========+=========+
| object | dict    |
+--------+---------+

* The first item of a list is
  continued on a second line.
* A second item that is long enough.

decoder
   The object that turns a JSON document back into Python values.

See :ref:`json-intro` and :pep:`8` for the rest of the story, or :ref:`the index <genindex>`.

.. This comment is not prose at all, whatever it says.
"""


def test_sections_titles_and_prose():
    sections = rst_to_sections(SAMPLE, collect_ref_titles(SAMPLE))
    titles = [s.title for s in sections]
    assert titles == ["", "json: JSON encoder and decoder", "Basic Usage"]
    intro, usage = sections[1].paragraphs, sections[2].paragraphs
    assert intro == [
        "The json module exposes an API familiar to users of the marshal and pickle modules, "
        "see the JSON site for more.",
        "Encoding basic Python object hierarchies:",
    ]
    assert usage == [
        "Serialize obj as a JSON formatted stream to fp using encode() and str objects.",
        "All optional parameters are now keyword-only.",
        "Keys in key/value pairs of JSON are always of the type str.",
        "The first item of a list is continued on a second line.",
        "A second item that is long enough.",
        "decoder: The object that turns a JSON document back into Python values.",
        "See json: JSON encoder and decoder and PEP 8 for the rest of the story, or the index.",
    ]


def test_code_tables_directives_and_comments_are_gone():
    prose = rst_to_prose(SAMPLE)
    for gone in (">>>", "json.dumps", "echo", "synopsis", "single: JSON", "skipkeys", "+----", "dict", "comment"):
        assert gone not in prose, gone
    assert "\n\n" in prose and "::" not in prose and "`" not in prose and ":mod:" not in prose


def test_inline_markup():
    assert clean_inline(":meth:`!dict.items` and :func:`os.path.join`") == "dict.items() and os.path.join()"
    assert clean_inline(":abbr:`LIFO (last-in, first-out)` ``x = 1`` *emphasis*") == "LIFO x = 1 emphasis"
    assert clean_inline(":rfc:`7159` and :issue:`12345` in |version|") == "RFC 7159 and issue 12345 in 3.11"
    assert clean_inline("a `link text <https://example.org>`__ and *args") == "a link text and *args"
    assert clean_inline(":ref:`unknown-label`") == "unknown-label"


def test_is_prose_keeps_sentences_and_drops_code():
    assert is_prose("Return the number of items in the container.")
    assert not is_prose("x = f(1, 2) + g[3]")
    assert not is_prose("See also.")
    assert not is_prose(">>> print('hello world, again')")

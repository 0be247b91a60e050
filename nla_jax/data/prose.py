"""Human-written English prose for the default corpus: the CPython documentation's reST sources.

Debian's `python3.11-doc` package ships the documentation sources next to the HTML
(/usr/share/doc/python3.11/html/_sources/**/*.rst.txt). They are written by people, in
expository English (tutorial, HOWTOs, FAQ, "What's New", language and library reference), under
the Python Software Foundation License Version 2, and large enough (~12 MB of reST) for
thousands of paragraph chunks. Nothing from them is committed to this repository: the text is
read from the installed package at build time.

The reader keeps only running prose: code and literal blocks (`::`, code directives, doctests),
grammar productions, tables, lists, option fields, comments and headings are dropped, inline
markup is reduced to its visible text, and consecutive paragraphs of one file are joined into
chunks of roughly `min_words`-`max_words` words. Chunk ids (`<file>#<n>`) depend only on the
file's content, so a given package version always yields the same chunks.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from typing import Iterator

from nla_jax.errors import UserError

PACKAGE = "python3.11-doc"
DEFAULT_ROOT = "/usr/share/doc/python3.11/html/_sources"
ROOT_ENV = "NLA_PROSE_DIR"
LICENSE = ("PSF-2.0 (Python Software Foundation License Version 2, the license of the Python "
           "documentation; see /usr/share/doc/python3.11-doc/copyright)")
INSTALL_COMMAND = "apt-get install -y --no-install-recommends python3.11-doc"
INSTALL_HINT = (f"{INSTALL_COMMAND} (as root; without root: apt-get download {PACKAGE} && "
                f"dpkg -x {PACKAGE}_*.deb DIR, then pass --prose-dir "
                f"DIR/usr/share/doc/python3.11/html/_sources or set {ROOT_ENV})")

# Sections that are not running prose or not written as such.
SKIP_FILES = ("whatsnew/changelog", "license", "copyright", "contents", "about", "bugs",
              "glossary", "py-modindex", "genindex")

# Directives whose whole indented body is dropped.
_DROP_DIRECTIVES = {
    "code-block", "sourcecode", "code", "highlight", "doctest", "testcode", "testoutput",
    "testsetup", "testcleanup", "productionlist", "literalinclude", "index", "toctree", "image",
    "figure", "table", "csv-table", "list-table", "raw", "include", "only", "sectionauthor",
    "moduleauthor", "module", "currentmodule", "program", "cmdoption", "option", "envvar",
    "opcode", "audit-event", "audit-event-table", "availability", "c:macro", "c:member",
    "c:var", "c:type", "c:function", "c:struct", "c:enum", "c:enumerator", "c:union", "c:data",
    "c:namespace", "c:namespace-push", "c:namespace-pop", "c:expr", "c:texpr", "cfunction",
    "limited-api-list", "miscnews", "pdbcommand", "literal-block", "parsed-literal", "math",
    "graphviz", "seealso", "rubric", "tabularcolumns", "centered", "hlist", "autoclass",
    "autofunction", "automodule", "default-domain", "role", "pep", "rfc", "versionchanged",
    "versionadded", "deprecated", "deprecated-removed", "productionlist", "grammar-snippet",
    "mdinclude", "incompat",
}

_HEADING_CHARS = set("=-`:'\"~^_*+#<>.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclasses.dataclass(frozen=True)
class Chunk:
    chunk_id: str
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_underline(line: str) -> bool:
    s = line.strip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in _HEADING_CHARS


def _is_heading(block: list[str]) -> bool:
    if len(block) == 2 and _is_underline(block[1]) and not _is_underline(block[0]):
        return True
    return len(block) == 3 and _is_underline(block[0]) and _is_underline(block[2])


_ROLE_TARGET = re.compile(r":[\w:+.-]+:`([^`<]*?)\s*<[^`>]*>`")
_ROLE = re.compile(r":([\w:+.-]+):`([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``")
_LINK_TARGET = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_LINK = re.compile(r"`([^`]+)`__?")
_INTERPRETED = re.compile(r"`([^`]+)`")
_FOOTNOTE = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
_STRONG = re.compile(r"\*\*([^*\n]+?)\*\*")
_EMPH = re.compile(r"(?<![\w*\\])\*([^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])")
_SUBST = re.compile(r"\|([\w -]+)\|")


_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}


def _clean_role(m: re.Match) -> str:
    s = m.group(2).strip()
    prefix = _ROLE_PREFIX.get(m.group(1))
    if prefix and s.isdigit():
        return prefix + s
    if s.startswith("!"):
        s = s[1:]
    if s.startswith("~"):
        s = s[1:].rsplit(".", 1)[-1]
    return s


def clean_inline(text: str) -> str:
    """reST inline markup -> the text a reader sees."""
    text = _ROLE_TARGET.sub(lambda m: m.group(1).strip(), text)
    text = _ROLE.sub(_clean_role, text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK_TARGET.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _FOOTNOTE.sub("", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _SUBST.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return " ".join(text.split())


def _looks_like_prose(p: str) -> bool:
    words = p.split()
    # A paragraph ending in ":" introduces a code example or list that is dropped.
    if len(words) < 8 or p[-1] not in ".!?)\"'":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in p)
    if letters < 0.85 * len(p):
        return False
    codeish = sum(1 for w in words if any(c in w for c in "=_{}[]<>#$/") or w.endswith("()"))
    return codeish <= 0.15 * len(words)


_LIST_ITEM = re.compile(r"^([-*+•]|\d+[.)]|#\.|\(\w\)|\w[.)])\s")


def rst_paragraphs(text: str) -> Iterator[str | None]:
    """Prose paragraphs of one reST file, with None at each section heading."""
    blocks: list[list[str]] = []
    cur: list[str] = []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.rstrip().expandtabs(8))
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)

    skip_deeper: int | None = None  # drop blocks indented deeper than this
    for block in blocks:
        ind = _indent(block[0])
        if skip_deeper is not None:
            if ind > skip_deeper:
                continue
            skip_deeper = None
        first = block[0].strip()
        if _is_heading(block):
            yield None
            continue
        if first.startswith(".."):
            m = re.match(r"\.\.\s+([\w:+-]+)::", first)
            if m is None or m.group(1) in _DROP_DIRECTIVES:
                skip_deeper = ind  # comment, label, target or dropped directive
                continue
            # a prose-bearing directive (note, warning, function, class, ...): keep body text
            body = [ln for ln in block[1:] if not ln.strip().startswith(":")]
            if body:
                block = body
                ind = _indent(block[0])
                first = block[0].strip()
            else:
                continue
        if first == "::" or first.startswith((">>>", "$ ", "|", "+-", "==", ":")) or _LIST_ITEM.match(first):
            if block[-1].rstrip().endswith("::"):
                skip_deeper = ind
            continue
        if len(block) > 1 and _indent(block[1]) > ind:  # definition list / hanging indent
            if block[-1].rstrip().endswith("::"):
                skip_deeper = ind
            continue
        para = " ".join(ln.strip() for ln in block)
        if para.endswith("::"):
            skip_deeper = ind
            para = para[:-2].rstrip() + (":" if not para[:-2].endswith(" ") else "")
            if para.endswith(" :"):
                para = para[:-2]
        para = clean_inline(para)
        if para and _looks_like_prose(para):
            yield para


def _split_long(p: str, max_words: int) -> list[str]:
    if len(p.split()) <= max_words:
        return [p]
    out, cur, n = [], [], 0
    for s in _SENTENCE_END.split(p):
        w = len(s.split())
        if cur and n + w > max_words:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.append(s)
        n += w
    if cur:
        out.append(" ".join(cur))
    return out


def chunk_paragraphs(paras: Iterator[str | None], min_words: int, target_words: int,
                     max_words: int) -> Iterator[str]:
    """Join consecutive paragraphs into chunks of about target_words (never past max_words)."""
    cur: list[str] = []
    n = 0

    def flush():
        nonlocal cur, n
        text = "\n\n".join(cur)
        cur, n = [], 0
        return text

    for p in paras:
        if p is None:  # section boundary: end the chunk if it is long enough
            if n >= min_words:
                yield flush()
            continue
        for piece in _split_long(p, max_words):
            w = len(piece.split())
            if cur and n + w > max_words:
                if n >= min_words:
                    yield flush()
                else:
                    cur, n = [], 0  # a short fragment that cannot grow: drop it
            cur.append(piece)
            n += w
            if n >= target_words:
                yield flush()
    if n >= min_words:
        yield flush()


def resolve_root(root: str | None = None) -> str:
    """The _sources folder: `root`, else $NLA_PROSE_DIR, else the Debian package's path."""
    path = root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "tutorial", "index.rst.txt")):
        raise UserError(f"the prose source (CPython documentation sources from the Debian package {PACKAGE}) "
                        f"is not at {path!r}: install it with: {INSTALL_HINT}")
    return path


def package_version(root: str) -> str:
    """The installed Debian package version when `root` is the packaged path, else 'unpackaged'."""
    if os.path.realpath(root) != os.path.realpath(DEFAULT_ROOT):
        return "unpackaged"
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def iter_chunks(root: str | None = None, min_words: int = 60, target_words: int = 160,
                max_words: int = 320) -> Iterator[Chunk]:
    """All prose chunks of the documentation sources, in sorted file order."""
    root = resolve_root(root)
    files = []
    for d, _, names in os.walk(root):
        files += [os.path.join(d, n) for n in names if n.endswith(".rst.txt")]
    for fn in sorted(files):
        rel = os.path.relpath(fn, root)[: -len(".rst.txt")].replace(os.sep, "/")
        if rel.startswith(SKIP_FILES) or rel in SKIP_FILES:
            continue
        with open(fn, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for i, chunk in enumerate(chunk_paragraphs(rst_paragraphs(text), min_words, target_words, max_words)):
            yield Chunk(f"{rel}#{i}", chunk)

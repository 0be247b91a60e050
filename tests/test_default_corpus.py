"""Default corpus: the prompt set, the prose reader, and a tiny real build (resume, repair, determinism)."""
from __future__ import annotations

import collections
import json
import os

import pytest

from nla_jax.data import default_corpus as dc
from nla_jax.data import prose
from nla_jax.data.corpus import load_corpus
from nla_jax.data.prompts import MULTI_TURN, PROMPTS
from nla_jax.errors import UserError


def _prose_installed() -> bool:
    try:
        prose.resolve_root()
        return True
    except UserError:
        return False


needs_prose = pytest.mark.skipif(not _prose_installed(), reason=(
    f"prose source not installed (Debian package {prose.PACKAGE}): {prose.INSTALL_COMMAND}"))


def test_prompt_set():
    assert len(PROMPTS) >= 320
    texts = [p.text for p in PROMPTS]
    assert len(set(texts)) == len(texts), [t for t, n in collections.Counter(texts).items() if n > 1]
    assert all(p.text.strip() == p.text and len(p.text) >= 8 for p in PROMPTS)
    non_en = [p for p in PROMPTS if p.lang != "en"]
    assert len(non_en) >= 0.10 * len(PROMPTS)
    assert {"fr", "es", "de", "zh"} <= {p.lang for p in non_en}
    assert len({p.lang for p in non_en}) >= 8
    # the language tags are plausible: English prompts are (nearly) pure ASCII
    assert sum(not p.text.isascii() for p in PROMPTS if p.lang == "en") <= 2
    cats = collections.Counter(p.category for p in PROMPTS)
    for c in ("factual", "howto", "story", "poem", "code_python", "code_js", "code_sql", "code_shell",
              "advice", "math", "opinion", "roleplay", "summary"):
        assert cats[c] >= 5, (c, cats[c])
    for conv in MULTI_TURN:
        roles = [m["role"] for m in conv.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles


def test_chat_jobs_are_a_prefix_and_seeded():
    big, small = dc.chat_jobs(900, 0), dc.chat_jobs(50, 0)
    assert big[:50] == small
    assert len({j.doc_id for j in big}) == 900
    n_seeds = len(PROMPTS) + len(MULTI_TURN)
    assert {j.doc_id.rsplit("/", 1)[1] for j in big} == {"s0", "s1", "s2"}
    assert len({j.doc_id for j in big[:n_seeds]}) == n_seeds and all(j.doc_id.endswith("/s0") for j in big[:n_seeds])
    assert [j.doc_id for j in dc.chat_jobs(50, 1)] != [j.doc_id for j in small]


def test_rst_cleanup():
    text = """Title
=====

This uses :func:`~os.path.join` and ``open()`` with *care*; see :pep:`8` and the `guide <https://x>`_.
It has two lines and more than eight words in total.

For example::

   x = 1  # code is dropped

.. note::

   A note body is prose that is kept because it reads like a sentence.

* a list item that is dropped even though it has many words in it.
"""
    paras = [p for p in prose.rst_paragraphs(text) if p]
    assert paras[0] == ("This uses join and open() with care; see PEP 8 and the guide. "
                        "It has two lines and more than eight words in total.")
    assert paras[1] == "A note body is prose that is kept because it reads like a sentence."
    assert len(paras) == 2


@needs_prose
def test_prose_reader_volume(real):
    chunks = list(prose.iter_chunks())
    assert len(chunks) >= 1500
    assert len({c.chunk_id for c in chunks}) == len(chunks)
    words = [c.words for c in chunks]
    assert min(words) >= 60 and max(words) <= 320
    toks = [len(real.tok.encode(c.text)) for c in chunks[::3]]
    assert min(toks) >= 60
    assert sum(toks) / len(toks) > 150
    for c in chunks[::97]:  # no reST left over
        assert "::" not in c.text and ":func:`" not in c.text and "``" not in c.text, c


@needs_prose
def test_tiny_build_resume_and_repair(real, tmp_path):
    out = str(tmp_path / "corpus")
    kw = dict(documents=8, chat_fraction=0.5, max_new_tokens=8, batch_size=4, seed=3, model=tuple(real),
              progress=False, log=lambda s: None)
    m = dc.build(out, **kw)
    assert m["complete"] and m["chat"]["count"] == 4 and m["prose"]["count"] == 4
    assert m["prose"]["source"]["package"] == "python3.11-doc" and "PSF" in m["prose"]["source"]["license"]
    docs, stats = load_corpus(dc.corpus_sources(out))
    assert len(docs) == 8 and not stats.skipped
    chats = [d for d in docs if d.messages is not None]
    assert len(chats) == 4
    for d in chats:
        assert [m["role"] for m in d.messages][-2:] == ["user", "assistant"] and d.messages[-1]["content"]
        assert len(d.render(real.tok)) > 20
    assert all(len(d.text.split()) >= 60 for d in docs if d.text is not None)

    chat_path = os.path.join(out, dc.CHAT_FILE)
    before = {p: open(os.path.join(out, p), "rb").read() for p in (dc.CHAT_FILE, dc.PROSE_FILE)}
    dc.build(out, **kw)  # complete: adds nothing
    assert {p: open(os.path.join(out, p), "rb").read() for p in before} == before

    data = before[dc.CHAT_FILE]
    cut = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(chat_path, "wb") as f:  # interrupted while writing the last record
        f.write(data[:cut] + data[cut:cut + 25])
    assert dc.read_ids(chat_path) == {json.loads(x)["id"] for x in data[:cut].splitlines()}
    m = dc.build(out, **kw)
    assert m["complete"] and m["chat"]["count"] == 4
    assert open(chat_path, "rb").read() == data  # the missing reply is regenerated identically

    with pytest.raises(UserError, match="max_new_tokens"):
        dc.build(out, **{**kw, "max_new_tokens": 9})


def test_missing_prose_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="apt-get install -y --no-install-recommends python3.11-doc"):
        dc.build(str(tmp_path / "c"), documents=4, prose_dir=str(tmp_path / "nowhere"), progress=False)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        dc.build_parser().parse_args(["--help"])
    assert e.value.code == 0
    assert "--chat-fraction" in capsys.readouterr().out

"""Corpus readers, split assignment and position sampling (pure functions of seed and doc_id)."""
import json
import os

import numpy as np
import pytest

from nla_jax.data import corpus, positions
from nla_jax.errors import UserError

FRACS = positions.DEFAULT_SPLITS


def test_split_is_stable_and_order_independent():
    ids = [f"doc-{i}" for i in range(2000)]
    a = {d: positions.split_of(7, d, FRACS) for d in ids}
    b = {d: positions.split_of(7, d, FRACS) for d in reversed(ids)}
    assert a == b
    counts = positions.split_counts(7, ids, FRACS)
    for name, frac in FRACS:  # binomial sd at n=2000 is <= 0.011; 4 sd
        assert abs(counts[name] / len(ids) - frac) < 0.045, (name, counts)
    # another seed moves documents (the seed really is used)
    c = {d: positions.split_of(8, d, FRACS) for d in ids}
    assert sum(a[d] != c[d] for d in ids) > 500


def test_split_fraction_validation():
    with pytest.raises(UserError, match="sum to 1"):
        positions.check_fractions((("a", 0.5), ("b", 0.4)))
    with pytest.raises(UserError, match="unique"):
        positions.check_fractions((("a", 0.5), ("a", 0.5)))
    positions.check_fractions(FRACS)


def test_positions_deterministic_and_valid():
    toks = [1] + list(range(10, 200)) + [2, 5, 2, 7]  # specials 1 and 2
    p1 = positions.sample_positions(toks, k=8, min_position=50, special_ids=[1, 2], seed=0, doc_id="x")
    p2 = positions.sample_positions(toks, k=8, min_position=50, special_ids=[1, 2], seed=0, doc_id="x")
    np.testing.assert_array_equal(p1, p2)
    assert len(p1) == 8 and len(set(p1.tolist())) == 8
    assert (p1 >= 50).all() and (np.diff(p1) > 0).all()
    assert not np.isin(np.asarray(toks)[p1], [1, 2]).any()
    p3 = positions.sample_positions(toks, k=8, min_position=50, special_ids=[1, 2], seed=0, doc_id="y")
    assert not np.array_equal(p1, p3)


def test_positions_short_documents():
    assert len(positions.sample_positions(list(range(40)), k=5, min_position=50, special_ids=[], seed=0,
                                          doc_id="s")) == 0
    few = positions.sample_positions(list(range(53)), k=5, min_position=50, special_ids=[], seed=0, doc_id="s")
    np.testing.assert_array_equal(few, [50, 51, 52])


def test_readers(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Hello there.")
    (d / "sub" / "b.md").write_text("Second doc.")
    (d / "bad.txt").write_bytes(b"\xff\xfe not utf8 \xc3\x28")
    (d / "empty.txt").write_text("   ")
    (d / "ignored.bin").write_bytes(b"x")
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join([
        json.dumps({"text": "plain"}),
        json.dumps({"id": "chat-1", "messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}),
        "{not json",
        json.dumps({"foo": 1}),
        json.dumps([1, 2]),
    ]) + "\n")
    docs, stats = corpus.load_corpus([{"kind": "text_dir", "path": str(d), "name": "web"},
                                      {"kind": "jsonl", "path": str(j), "name": "chat"}])
    ids = [x.doc_id for x in docs]
    assert ids == ["web/a.txt", "web/sub/b.md", "chat/c.jsonl:0", "chat/chat-1"]
    assert docs[3].messages[1]["content"] == "hello"
    assert stats.documents == 4
    assert stats.skipped == {"not UTF-8": 1, "empty": 1, "invalid JSON line": 1,
                             "no 'text' string or 'messages' list": 1, "record is not an object": 1}
    assert "5 skipped" in stats.summary()


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        corpus.load_corpus([{"kind": "jsonl", "path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(UserError, match="not one of"):
        corpus.load_corpus([{"kind": "csv", "path": str(tmp_path)}])
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="corpus is empty"):
        corpus.load_corpus([{"kind": "text_dir", "path": str(tmp_path / "e")}])
    j = tmp_path / "dup.jsonl"
    j.write_text(json.dumps({"id": "1", "text": "a"}) + "\n" + json.dumps({"id": "1", "text": "b"}) + "\n")
    with pytest.raises(UserError, match="duplicate document id"):
        corpus.load_corpus([{"kind": "jsonl", "path": str(j)}])
    if os.geteuid() != 0:  # root reads anything
        f = tmp_path / "locked.jsonl"
        f.write_text("{}\n")
        f.chmod(0)
        with pytest.raises(UserError, match="cannot be read"):
            corpus.load_corpus([{"kind": "jsonl", "path": str(f)}])


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["one", "two", ""]}), tmp_path / "t.parquet")
    docs, stats = corpus.load_corpus([{"kind": "parquet", "path": str(tmp_path / "t.parquet"), "name": "p"}])
    assert [d.doc_id for d in docs] == ["p/t.parquet:0", "p/t.parquet:1"]
    assert stats.skipped == {"empty": 1}
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "u.parquet")
    with pytest.raises(UserError, match="no 'text' or 'messages' column"):
        corpus.load_corpus([{"kind": "parquet", "path": str(tmp_path / "u.parquet")}])


def test_render_uses_chat_template(real):
    tok = real.tok
    chat = corpus.Document("c", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}))
    ids = chat.render(tok)
    text = tok.decode(ids, skip_special=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.rstrip().endswith("Yo<|im_end|>")
    assert ids.count(tok.bos_id) == text.count("<|im_start|>")  # BOS id 1 is <|im_start|>; never doubled
    plain = corpus.Document("p", text="Just prose.")
    assert tok.decode(plain.render(tok)) == "Just prose."

"""The split loader: order is a pure function of (seed, step); resume and process count don't matter."""
import os

import numpy as np
import pytest

from nla_jax.data import loader, store as store_lib

D, N = 8, 203


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader") / "store")
    meta = {"fingerprint": "t", "split_names": ["a", "b"]}
    rng = np.random.default_rng(0)
    for part, rows in enumerate([120, N - 120]):  # two parts, as two processes would write
        with store_lib.PartWriter.create_or_resume(root, part, d=D, dtype="float32", capacity=rows, ctx_len=4,
                                                   chunk_rows=32, meta=meta) as w:
            base = part * 1000
            doc = base + np.arange(rows) // 3
            pos = np.arange(rows) % 3 + 1
            toks = np.full((rows, 4), -1)
            for i, p in enumerate(pos):
                toks[i, :p + 1] = 5
            w.append(rng.standard_normal((rows, D)).astype(np.float32), doc, pos,
                     (np.arange(rows) % 4 == 0).astype(np.uint8), toks, cursor={})
    store_lib.finalize_manifest(root, meta)
    return root


def test_batches_cover_the_split_each_epoch(store_root):
    s = store_lib.open_store(store_root)
    order = loader.SplitOrder(s, "a", batch=10, seed=3)
    per_epoch = order.n // 10
    seen = np.concatenate([order.global_rows(t) for t in range(per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == per_epoch * 10
    assert set(seen.tolist()) <= set(s.rows_of_split("a").tolist())
    e1 = np.concatenate([order.global_rows(t) for t in range(per_epoch, 2 * per_epoch)])
    assert not np.array_equal(seen, e1)  # reshuffled each epoch
    other = loader.SplitOrder(s, "a", batch=10, seed=4)
    assert not np.array_equal(order.global_rows(0), other.global_rows(0))


def test_resume_equals_uninterrupted(store_root):
    a = [b for _, b in zip(range(12), loader.iterate(store_root, "a", batch=8, seed=1, process=0, num_processes=1))]
    resumed = loader.iterate(store_root, "a", batch=8, seed=1, start_step=7, process=0, num_processes=1)
    for (step, b), want in zip(resumed, a[7:]):
        assert step == want[0]
        for k in want[1]:
            np.testing.assert_array_equal(b[k], want[1][k])


def test_one_or_two_processes_same_global_batches(store_root):
    one = loader.iterate(store_root, "a", batch=8, seed=2, process=0, num_processes=1)
    p0 = loader.iterate(store_root, "a", batch=8, seed=2, process=0, num_processes=2)
    p1 = loader.iterate(store_root, "a", batch=8, seed=2, process=1, num_processes=2)
    for _ in range(5):
        (s, g), (_, x0), (_, x1) = next(one), next(p0), next(p1)
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([x0[k], x1[k]]))


def test_order_ignores_part_layout(store_root, tmp_path):
    # the same rows written as one part give the same batches
    s = store_lib.open_store(store_root)
    rows = s.read(None, np.arange(s.num_rows))
    root = str(tmp_path / "one")
    meta = {"fingerprint": "t", "split_names": ["a", "b"]}
    with store_lib.PartWriter.create_or_resume(root, 0, d=D, dtype="float32", capacity=s.num_rows, ctx_len=4,
                                               chunk_rows=32, meta=meta) as w:
        perm = np.random.default_rng(9).permutation(s.num_rows)  # any physical order
        w.append(rows["acts"][perm], rows["doc_id"][perm], rows["position"][perm], rows["split"][perm],
                 rows["tokens"][perm], cursor={})
    store_lib.finalize_manifest(root, meta)
    a = loader.iterate(store_root, "b", batch=4, seed=0, process=0, num_processes=1)
    b = loader.iterate(root, "b", batch=4, seed=0, process=0, num_processes=1)
    for _ in range(6):
        x, y = next(a)[1], next(b)[1]
        assert set(x) == set(y) and "row" in x
        for k in x:
            if k != "row":  # physical row ids differ by layout; the rows' contents must not
                np.testing.assert_array_equal(x[k], y[k])


def test_to_global_places_batches_on_the_mesh(store_root):
    import jax
    from nla_jax import sharding
    mesh = sharding.make_mesh((-1, 1, 1))
    _, local = next(loader.iterate(store_root, "a", batch=4, seed=0, process=0, num_processes=1))
    g = loader.to_global(local, mesh, sharding.DEFAULT_RULES)
    for k, v in local.items():
        assert isinstance(g[k], jax.Array) and g[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(g[k]), v)

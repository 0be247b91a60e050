"""On-disk activation store: one crash-safe writer per part, parts joined by a manifest.

Layout of a store directory ROOT::

    ROOT/manifest.json          finalize_manifest: meta, part row counts + checksums, split stats
    ROOT/stats.npz              summed norm statistics of all parts (referenced by the manifest)
    ROOT/part-00000/            one per writer process
        acts/ doc_id/ position/ split/ tokens/     zarr3 arrays, sharding_indexed codec
        top_ids/ top_probs/     with top_k > 0: the target's top_k next tokens per row (data.top_k)
        ledger.json             committed row count, caller cursor, per-commit sha256, config
        stats-<ncommits>.npz    per-split running sums (referenced by the ledger with its sha256)

Crash safety: `append` writes the rows past the committed count first and waits for them, then
writes a fresh stats sidecar under a new name, then atomically replaces ledger.json (temp file,
fsync, rename, fsync dir). The ledger is the only commit point, so a kill -9 anywhere leaves the
old or the new ledger; rows past it are garbage the next append overwrites. tensorstore's file
kvstore replaces each shard file by rename, so committed rows sharing a shard with the rows being
written are never torn.

Rows are global in part order: global row = part offset + local row.

Modules: `arrays` (the zarr3 arrays of a part: specs, dtypes, shard files, row checks),
`ledger` (a part's ledger.json), `normstats` (per-split norm sums and their sidecars),
`writer` (PartWriter and the commit protocol), `manifest` (finalize_manifest, verify),
`reader` (Store, open_store). The names below are the package's public interface.
"""
from __future__ import annotations

from nla_jax.data.store.arrays import ARRAYS, DTYPES, INT_DTYPES, PAD, PREDICTIONS, part_name
from nla_jax.data.store.ledger import LEDGER
from nla_jax.data.store.manifest import MANIFEST, finalize_manifest, verify
from nla_jax.data.store.normstats import add_stats, empty_stats, summarize_stats
from nla_jax.data.store.reader import Store, open_store
from nla_jax.data.store.writer import PartWriter

__all__ = ["ARRAYS", "DTYPES", "INT_DTYPES", "LEDGER", "MANIFEST", "PAD", "PREDICTIONS", "PartWriter", "Store",
           "add_stats", "empty_stats", "finalize_manifest", "open_store", "part_name", "summarize_stats",
           "verify"]

"""Optimizers for the AV and AR: parameter groups, schedules, frozen parts, gradient masks.

Each model's parameters carry a label: "body" (transformer blocks and norms), "head" (the AR's
linear head), "proj" (the AV's input projection) or "frozen" (embeddings unless trained; no
optimizer state at all, which matters at 70B). Blocks outside `train_blocks` keep their Adam
state but get exactly zero gradients (a [L]-mask), so Adam leaves them unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nla_jax.errors import UserError


def schedule(lr: float, warmup: int, total: int, kind: str) -> optax.Schedule:
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [max(warmup, 1)]) if warmup else optax.constant_schedule(lr)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total, warmup + 1), lr * 0.1)
    raise UserError(f"learning-rate schedule {kind!r}: expected 'constant' or 'cosine'")


def labels(params: dict, train_embed: bool) -> dict:
    """Label pytree matching params (see module docstring)."""
    def lab(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "head" in keys:
            return "head"
        if "proj" in keys:
            return "proj"
        if keys[-1] in ("embed", "lm_head"):
            return "body" if train_embed else "frozen"
        return "body"
    return jax.tree_util.tree_map_with_path(lab, params)


def make(ocfg, total_steps: int, params: dict) -> optax.GradientTransformation:
    """AdamW per label group with global-norm clipping. ocfg: lr, lr_head, lr_proj, warmup, schedule, clip,
    weight_decay, b1, b2, train_embed."""
    def adam(lr):
        return optax.adamw(schedule(lr, ocfg.warmup, total_steps, ocfg.schedule), b1=ocfg.b1, b2=ocfg.b2,
                           weight_decay=ocfg.weight_decay)
    groups = {"body": adam(ocfg.lr), "head": adam(ocfg.lr_head), "proj": adam(ocfg.lr_proj),
              "frozen": optax.set_to_zero()}
    tx = optax.multi_transform(groups, labels(params, ocfg.train_embed))
    return optax.chain(optax.clip_by_global_norm(ocfg.clip), tx) if ocfg.clip > 0 else tx


def block_mask(n_layers: int, train_blocks) -> jnp.ndarray:
    """[L] float mask of the blocks that train: train_blocks = (start, stop), stop -1 = all."""
    start, stop = int(train_blocks[0]), int(train_blocks[1])
    stop = n_layers if stop < 0 else stop
    if not 0 <= start < stop <= n_layers:
        raise UserError(f"train_blocks={tuple(train_blocks)} is not a block range within 0..{n_layers}")
    return (jnp.arange(n_layers) >= start) & (jnp.arange(n_layers) < stop)


def mask_grads(grads: dict, mask: jnp.ndarray | None) -> dict:
    """Zero the gradients of frozen blocks (any "layers" subtree with a leading [L] axis)."""
    if mask is None:
        return grads

    def f(path, g):
        keys = [getattr(k, "key", None) for k in path]
        if "layers" in keys and g.ndim >= 1 and g.shape[0] == mask.shape[0]:
            return g * mask.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
        return g
    return jax.tree_util.tree_map_with_path(f, grads)


def apply(tx: optax.GradientTransformation, grads, opt_state, params, mask=None):
    """(new_params, new_opt_state, grad_norm) for one update."""
    grads = mask_grads(grads, mask)
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, gnorm


def keep_if(ok: jax.Array, new, old):
    """Non-finite guard inside a compiled step: take `new` only where the step was finite."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def stop_frozen(params: dict, label_tree: dict) -> dict:
    """stop_gradient on "frozen" leaves, so their gradients are never computed (XLA prunes them)."""
    return jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, label_tree)

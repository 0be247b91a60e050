"""Building blocks the files in configs/ share (mesh, sharding rules, sampler defaults)."""
import ml_collections

from nla_jax.sharding import DEFAULT_RULES


def mesh(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
    """Mesh axes (data, fsdp, tensor); one -1 takes the remaining devices."""
    return ml_collections.ConfigDict({"shape": tuple(shape), "axes": ("data", "fsdp", "tensor")})


def rules(**overrides) -> tuple:
    """The logical-axis -> mesh-axis table. Override a name with rules(embed=None, ...)."""
    table = dict(DEFAULT_RULES)
    table.update(overrides)
    return tuple((k, v) for k, v in table.items())


def sample(**kw) -> ml_collections.ConfigDict:
    base = dict(max_new_tokens=128, temperature=0.7, top_k=0, top_p=0.9, greedy=False, seed=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)

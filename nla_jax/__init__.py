"""nla_jax: Natural Language Autoencoders in JAX."""
__version__ = "0.1.0"

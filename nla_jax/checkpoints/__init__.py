"""Importing real weights (GGUF, Hugging Face safetensors) and tokenizers."""

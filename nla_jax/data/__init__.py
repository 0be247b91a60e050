"""Corpus -> positions/splits -> activation store -> loader."""

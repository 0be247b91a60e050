"""The NLA pair: activation verbalizer (av), activation reconstructor (ar), and their metrics (stats)."""

"""Training and evaluation of UniCT on generated chest-CT phantoms (or real datasets)."""

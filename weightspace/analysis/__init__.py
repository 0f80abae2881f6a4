"""Analyses built on the weight-space core: one concept per module (``align``: Git Re-Basin permutation alignment)."""

__all__: list[str] = []

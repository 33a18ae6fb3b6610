"""Helpers shared across ``quark.torch`` (model loading, sizes)."""

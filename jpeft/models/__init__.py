"""Flax models that consume jpeft nodes: :mod:`jpeft.models.phi` (Phi-1.5)."""

"""Emergent properties of an embedding space: intra-species variance ratio ρ, Fisher discriminant ratio in the
orthogonal complement, and Mantel alignment of species means with attributes (definitions: docs/emergent.md)."""
from bioclip_fast.analysis.emergent import inter_species_alignment, intra_species_metrics, mantel

__all__ = ["inter_species_alignment", "intra_species_metrics", "mantel"]

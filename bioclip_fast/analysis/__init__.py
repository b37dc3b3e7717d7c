"""Emergent properties of an embedding space. Our metrics (not the paper's): intra-species variance ratio ρ, Fisher
discriminant ratio in the orthogonal complement, and Mantel alignment of species means with attributes; plus the
BioCLIP 2 paper's visual protocols (:mod:`.visual`). Definitions and the paper's claims: docs/emergent.md."""
from bioclip_fast.analysis.emergent import inter_species_alignment, intra_species_metrics, mantel

__all__ = ["inter_species_alignment", "intra_species_metrics", "mantel"]

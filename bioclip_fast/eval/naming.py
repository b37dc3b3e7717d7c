"""Class names for zero-shot evaluation, by the rules of the BioCLIP 2 reference evaluation.

The reference (``src/imageomics/naming_eval.py`` + ``src/evaluation/data.py`` of the public bioclip-2 repository)
reads one metadata CSV per benchmark:

* ``filepath``: the image path relative to the benchmark folder;
* ``kingdom, phylum, cls, order, family, genus, species[, subspecies]``: the taxonomy, with the *class rank in a
  ``cls`` column* (``class`` is a Python keyword in its dataclass);
* ``common_name``;
* ``class``: the label, used **as is** with ``--text_type asis`` (NABirds, Meta-Album: labels that are not taxa).
* a leading unnamed index column (pandas ``to_csv``), ignored.

Naming rules (``Taxon`` in ``naming_eval.py``), reproduced by :class:`ReferenceTaxon`:

* ranks are ``str.capitalize()``-d (``"nymphalidae"`` → ``"Nymphalidae"``), the epithet lower-cased;
* ``sci`` = ``"Genus epithet"`` (plus a lower-cased subspecies when given), else the genus;
* ``taxon`` = all seven ranks joined by spaces, or only ``"Genus epithet"`` when the kingdom is empty;
* ``com`` = the common name as given (empty when there is none: the reference has no fallback);
* ``sci_com`` / ``taxon_com`` = ``"<sci|taxon> with common name <common>"``, without the suffix when the common
  name is empty.

Our text-type names map onto the reference's: ``as_is`` = ``asis``, ``taxonomic`` = ``taxon``, ``scientific`` =
``sci``, ``common`` = ``com``, ``scientific_common`` = ``sci_com``, ``taxonomic_common`` = ``taxon_com``.

Deviation, on purpose: a class without any rank (a NABirds or Meta-Album label) is named by its label for every
text type (the reference would build an empty string from the missing ranks for any type but ``asis``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# reference name -> ours
REFERENCE_TEXT_TYPES = {
    "asis": "as_is",
    "taxon": "taxonomic",
    "sci": "scientific",
    "com": "common",
    "sci_com": "scientific_common",
    "taxon_com": "taxonomic_common",
}
EVAL_TEXT_TYPES = ("as_is", "taxonomic", "scientific", "common", "scientific_common", "taxonomic_common")
RANK_FIELDS = ("kingdom", "phylum", "cls", "order", "family", "genus", "species")


def canonical_text_type(name: str) -> str:
    """Our name of a text type, accepting the reference's spellings (``asis``, ``taxon_com``, ...)."""
    name = str(name).strip()
    name = REFERENCE_TEXT_TYPES.get(name, name)
    if name == "asis":
        name = "as_is"
    if name not in EVAL_TEXT_TYPES:
        raise ValueError(f"unknown text type {name!r}; choose from {EVAL_TEXT_TYPES} "
                         f"(or the reference's {tuple(REFERENCE_TEXT_TYPES)})")
    return name


def _s(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return " ".join(str(v).split())


def _cap(s: str) -> str:
    return s.capitalize()


@dataclasses.dataclass(frozen=True)
class ReferenceTaxon:
    """One class as the reference names it; ``label`` is the as-is label (the CSV's label column)."""

    kingdom: str = ""
    phylum: str = ""
    cls: str = ""
    order: str = ""
    family: str = ""
    genus: str = ""
    species: str = ""
    subspecies: str = ""
    common_name: str = ""
    label: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any], *, label: str = "", class_is_rank: bool | None = None) -> "ReferenceTaxon":
        """From a metadata row. ``cls`` is the class rank; ``class`` is the rank only when the row has no ``cls``
        column and ``class_is_rank`` (our own CSVs, the bundled butterflies) — in the reference layout it is the
        label. A ``species`` holding the binomial ("Danaus plexippus") is reduced to its epithet."""
        if class_is_rank is None:
            class_is_rank = "cls" not in row
        values = {f: _s(row.get(f)) for f in RANK_FIELDS if f != "cls"}
        values["cls"] = _s(row.get("cls")) if "cls" in row else (_s(row.get("class")) if class_is_rank else "")
        genus, species = values["genus"], values["species"]
        if genus and species.lower().startswith(genus.lower() + " "):
            values["species"] = species[len(genus) + 1 :]
        sci = _s(row.get("scientific_name"))
        if sci and not values["genus"]:
            parts = sci.split()
            values["genus"] = parts[0]
            if len(parts) > 1 and not values["species"]:
                values["species"] = parts[1]
        return cls(**values, subspecies=_s(row.get("subspecies")), common_name=_s(row.get("common_name")),
                   label=_s(label))

    @property
    def has_taxonomy(self) -> bool:
        return any(getattr(self, f) for f in RANK_FIELDS)

    @property
    def scientific_name(self) -> str:
        if self.subspecies:
            return f"{_cap(self.genus)} {self.species.lower()} {self.subspecies.lower()}"
        if self.species:
            return f"{_cap(self.genus)} {self.species.lower()}"
        return _cap(self.genus)

    @property
    def taxonomic_name(self) -> str:
        tail = [_cap(self.genus), self.species.lower()] + ([self.subspecies.lower()] if self.subspecies else [])
        if not self.kingdom:
            return " ".join(tail)
        head = [_cap(getattr(self, f)) for f in RANK_FIELDS[:5]]
        return " ".join(head + tail)

    def text(self, text_type: str = "taxonomic_common", template: bool = False) -> str:
        tt = canonical_text_type(text_type)
        if tt == "as_is" or not self.has_taxonomy:
            body = self.label or self.scientific_name
        elif tt == "scientific":
            body = self.scientific_name
        elif tt == "taxonomic":
            body = self.taxonomic_name
        elif tt == "common":
            body = self.common_name
        elif tt == "scientific_common":
            body = f"{self.scientific_name} with common name {self.common_name}" if self.common_name \
                else self.scientific_name
        else:
            body = f"{self.taxonomic_name} with common name {self.common_name}" if self.common_name \
                else self.taxonomic_name
        return f"a photo of {body}." if template else body

    def __str__(self) -> str:
        return self.label or self.scientific_name

"""Taxa and the BioCLIP / TreeOfLife text types.

Strings follow the TreeOfLife-10M/200M webdataset conventions (BioCLIP `make_wds.py`, TreeOfLife toolbox):

- taxonomic: the known ranks kingdom → species joined by spaces, the species as its epithet
  ("Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus"); missing ranks are dropped.
- scientific: "Genus epithet" ("Danaus plexippus"), else the most specific known rank.
- common: the vernacular name, falling back to the scientific name when there is none.
- scientific_common / taxonomic_common: "<scientific|taxonomic> with common name <common>".
- taxonomic_tag (`taxonTag`): every known rank prefixed by its rank name ("kingdom Animalia ... species plexippus").

Templated forms are "a photo of {text}." exactly as in the shards' `.sci.txt`, `.taxon.txt`, ... members.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
# The five text types BioCLIP 2 mixes during training.
TEXT_TYPES = ("taxonomic", "scientific", "common", "scientific_common", "taxonomic_common")
# Every text type, including the rank-tagged ones stored in TreeOfLife shards.
ALL_TEXT_TYPES = TEXT_TYPES + ("taxonomic_tag", "taxonomic_tag_common")

# TreeOfLife-200M webdataset member -> (text type, templated?)
SHARD_TEXT_KEYS: dict[str, tuple[str, bool]] = {
    "taxonomic_name.txt": ("taxonomic", False),
    "scientific_name.txt": ("scientific", False),
    "common_name.txt": ("common", False),
    "sci.txt": ("scientific", True),
    "com.txt": ("common", True),
    "taxon.txt": ("taxonomic", True),
    "taxonTag.txt": ("taxonomic_tag", True),
    "sci_com.txt": ("scientific_common", True),
    "taxon_com.txt": ("taxonomic_common", True),
    "taxonTag_com.txt": ("taxonomic_tag_common", True),
}
# The templated member holding each text type (what a training caption is read from).
TEXT_TYPE_KEYS = {tt: key for key, (tt, templated) in SHARD_TEXT_KEYS.items() if templated}

_MISSING = {"", "none", "nan", "null", "unknown", "na", "n/a"}
_FIELDS = ("kingdom", "phylum", "cls", "order", "family", "genus", "species")


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas
        return ""
    text = " ".join(str(value).split())
    return "" if text.lower() in _MISSING else text


@dataclasses.dataclass(frozen=True, order=True)
class Taxon:
    """One taxon: Linnaean ranks (species as the epithet) and an optional common name. Empty string = unknown."""

    kingdom: str = ""
    phylum: str = ""
    cls: str = ""
    order: str = ""
    family: str = ""
    genus: str = ""
    species: str = ""
    common_name: str = ""

    def __post_init__(self) -> None:
        for name in _FIELDS + ("common_name",):
            object.__setattr__(self, name, _clean(getattr(self, name)))
        # "Danaus plexippus" in the species field -> epithet "plexippus" (ToL stores epithets)
        if self.species and self.genus and self.species.startswith(self.genus + " "):
            object.__setattr__(self, "species", self.species[len(self.genus) + 1 :])
        if not any(getattr(self, f) for f in _FIELDS):
            raise ValueError(f"a Taxon needs at least one rank (kingdom ... species); got {self!r}")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Taxon":
        """From a metadata row (keys kingdom ... species, `class` or `cls`, optional scientific_name, common_name).

        When genus/species are missing but `scientific_name` is given ("Danaus plexippus"), they are taken from it.
        """
        values = {f: _clean(row.get(f if f != "cls" else "class", row.get(f))) for f in _FIELDS}
        sci = _clean(row.get("scientific_name"))
        if sci and not values["genus"]:
            parts = sci.split()
            values["genus"] = parts[0]
            if len(parts) > 1 and not values["species"]:
                values["species"] = " ".join(parts[1:])
        elif sci and not values["species"] and values["genus"]:
            parts = sci.split()
            if len(parts) > 1 and parts[0] == values["genus"]:
                values["species"] = " ".join(parts[1:])
        try:
            return cls(**values, common_name=_clean(row.get("common_name")))
        except ValueError:
            raise ValueError(f"row has no taxonomic rank and no scientific_name: {dict(row)!r}") from None

    @classmethod
    def from_tagged(cls, tagged: str, common_name: str = "") -> "Taxon":
        """Parse a `taxonTag` string ("a photo of kingdom Animalia ... species plexippus." or bare)."""
        text = tagged.strip()
        text = re.sub(r"^a photo of\s+", "", text).rstrip(".")
        text = re.split(r"\s+with common name\s+", text)[0]
        pattern = re.compile(r"\b(kingdom|phylum|class|order|family|genus|species)\s+")
        matches = list(pattern.finditer(text))
        if not matches:
            raise ValueError(f"not a rank-tagged taxonomy string: {tagged!r}")
        values: dict[str, str] = {}
        for m, nxt in zip(matches, matches[1:] + [None]):
            value = text[m.end() : nxt.start() if nxt else len(text)].strip()
            values["cls" if m.group(1) == "class" else m.group(1)] = value
        return cls(**values, common_name=common_name)

    def to_dict(self) -> dict[str, str]:
        """Plain dict with the CSV column names (`class`, not `cls`)."""
        d = dataclasses.asdict(self)
        d["class"] = d.pop("cls")
        return {k: d[k] for k in ("kingdom", "phylum", "class", "order", "family", "genus", "species", "common_name")}

    # ---- names --------------------------------------------------------------------------------------------------
    def ranks(self) -> list[tuple[str, str]]:
        """Known (rank, value) pairs, kingdom first."""
        return [(r, getattr(self, f)) for r, f in zip(RANKS, _FIELDS) if getattr(self, f)]

    @property
    def taxonomic_name(self) -> str:
        return " ".join(v for _, v in self.ranks())

    @property
    def scientific_name(self) -> str:
        if self.genus and self.species:
            return f"{self.genus} {self.species}"
        return self.ranks()[-1][1]

    @property
    def common(self) -> str:
        """The common name, or the scientific name when there is none (TreeOfLife convention)."""
        return self.common_name or self.scientific_name

    @property
    def tagged_name(self) -> str:
        return " ".join(f"{r} {v}" for r, v in self.ranks())

    @property
    def label(self) -> str:
        """Stable class id: the taxonomic string (two taxa with the same ranks are one class)."""
        return self.taxonomic_name

    def text(self, text_type: str = "taxonomic_common", template: bool = True) -> str:
        """Caption of one text type (see `ALL_TEXT_TYPES`), as "a photo of {...}." or bare."""
        if text_type == "taxonomic":
            body = self.taxonomic_name
        elif text_type == "scientific":
            body = self.scientific_name
        elif text_type == "common":
            body = self.common
        elif text_type == "scientific_common":
            body = f"{self.scientific_name} with common name {self.common}"
        elif text_type == "taxonomic_common":
            body = f"{self.taxonomic_name} with common name {self.common}"
        elif text_type == "taxonomic_tag":
            body = self.tagged_name
        elif text_type == "taxonomic_tag_common":
            body = f"{self.tagged_name} with common name {self.common}"
        else:
            raise ValueError(f"unknown text_type {text_type!r}; choose one of {ALL_TEXT_TYPES}")
        return f"a photo of {body}." if template else body

    def shard_texts(self) -> dict[str, str]:
        """The ten TreeOfLife-200M text members of one sample (`{"sci.txt": "a photo of ...", ...}`)."""
        return {key: self.text(tt, template=templated) for key, (tt, templated) in SHARD_TEXT_KEYS.items()}

    def __str__(self) -> str:
        return self.text("taxonomic_common", template=False)


def validate_text_types(text_types: Sequence[str], *, name: str = "text_types") -> tuple[str, ...]:
    if isinstance(text_types, str):
        text_types = (text_types,)
    text_types = tuple(text_types)
    if not text_types:
        raise ValueError(f"{name} is empty; choose from {ALL_TEXT_TYPES}")
    bad = [t for t in text_types if t not in ALL_TEXT_TYPES]
    if bad:
        raise ValueError(f"{name} has unknown text types {bad}; choose from {ALL_TEXT_TYPES}")
    return text_types


def text_type_for_step(
    step: int,
    seed: int = 0,
    types: Sequence[str] = TEXT_TYPES,
    weights: Sequence[float] | None = None,
) -> str:
    """The text type used for all samples of optimizer step `step`.

    A pure function of (seed, step), so every rank picks the same type without communication, and a resumed run
    continues the same sequence.
    """
    types = validate_text_types(types, name="types")
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    p = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(types),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(types)} non-negative numbers with a positive sum, got {weights!r}")
        p = w / w.sum()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 0x7E47])
    return types[int(rng.choice(len(types), p=p))]


def taxon_from_texts(texts: Mapping[str, str]) -> Taxon | None:
    """Recover the Taxon of a sample from its text members (taxonTag + common name), or None."""
    common = texts.get("common_name.txt", "")
    tagged = texts.get("taxonTag.txt") or texts.get("taxonTag_com.txt")
    try:
        if tagged:
            taxon = Taxon.from_tagged(tagged, common_name=common)
        elif texts.get("scientific_name.txt"):
            taxon = Taxon.from_row({"scientific_name": texts["scientific_name.txt"], "common_name": common})
        else:
            return None
    except ValueError:
        return None
    if taxon.common_name == taxon.scientific_name:
        taxon = dataclasses.replace(taxon, common_name="")  # ToL stores the scientific name as fallback common name
    return taxon

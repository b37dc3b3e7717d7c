from collections import Counter

import pytest

from bioclip_fast.taxonomy import ALL_TEXT_TYPES, SHARD_TEXT_KEYS, TEXT_TYPES, Taxon, text_type_for_step

MONARCH = Taxon("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus", "Monarch")
TAXONOMIC = "Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus"


def test_full_taxonomy_text_types():
    expected = {
        "taxonomic": TAXONOMIC,
        "scientific": "Danaus plexippus",
        "common": "Monarch",
        "scientific_common": "Danaus plexippus with common name Monarch",
        "taxonomic_common": f"{TAXONOMIC} with common name Monarch",
        "taxonomic_tag": "kingdom Animalia phylum Arthropoda class Insecta order Lepidoptera family Nymphalidae "
                         "genus Danaus species plexippus",
    }
    for tt, text in expected.items():
        assert MONARCH.text(tt, template=False) == text
        assert MONARCH.text(tt) == f"a photo of {text}."
    assert MONARCH.label == TAXONOMIC
    assert set(TEXT_TYPES) < set(ALL_TEXT_TYPES)


def test_shard_texts_match_treeoflife_members():
    texts = MONARCH.shard_texts()
    assert set(texts) == set(SHARD_TEXT_KEYS) and len(texts) == 10
    assert texts["taxonomic_name.txt"] == TAXONOMIC
    assert texts["scientific_name.txt"] == "Danaus plexippus"
    assert texts["common_name.txt"] == "Monarch"
    assert texts["sci.txt"] == "a photo of Danaus plexippus."
    assert texts["com.txt"] == "a photo of Monarch."
    assert texts["taxon.txt"] == f"a photo of {TAXONOMIC}."
    assert texts["sci_com.txt"] == "a photo of Danaus plexippus with common name Monarch."
    assert texts["taxon_com.txt"] == f"a photo of {TAXONOMIC} with common name Monarch."
    assert texts["taxonTag_com.txt"].startswith("a photo of kingdom Animalia phylum Arthropoda")
    assert texts["taxonTag_com.txt"].endswith("species plexippus with common name Monarch.")


@pytest.mark.parametrize(
    "row, taxonomic, scientific, common",
    [
        # no family, no common name: rank dropped, common falls back to the scientific name
        ({"kingdom": "Plantae", "phylum": "Tracheophyta", "class": "Magnoliopsida", "order": "Rosales",
          "family": "", "genus": "Rosa", "species": "canina"},
         "Plantae Tracheophyta Magnoliopsida Rosales Rosa canina", "Rosa canina", "Rosa canina"),
        # genus-level label: scientific is the genus
        ({"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Strigiformes",
          "family": "Strigidae", "genus": "Bubo", "species": None, "common_name": "horned owls"},
         "Animalia Chordata Aves Strigiformes Strigidae Bubo", "Bubo", "horned owls"),
        # only kingdom, with pandas-style missing markers
        ({"kingdom": "Fungi", "phylum": "nan", "class": "None", "order": float("nan"), "family": "unknown",
          "genus": "", "species": ""},
         "Fungi", "Fungi", "Fungi"),
        # species given as a binomial, class under the dataclass name
        ({"kingdom": "Animalia", "cls": "Insecta", "genus": "Vanessa", "species": "Vanessa atalanta",
          "common_name": "Red Admiral"},
         "Animalia Insecta Vanessa atalanta", "Vanessa atalanta", "Red Admiral"),
        # only a scientific name
        ({"scientific_name": "Pieris rapae", "common_name": "Cabbage White"},
         "Pieris rapae", "Pieris rapae", "Cabbage White"),
    ],
)
def test_partial_taxonomies(row, taxonomic, scientific, common):
    t = Taxon.from_row(row)
    assert t.text("taxonomic", template=False) == taxonomic
    assert t.text("scientific", template=False) == scientific
    assert t.text("common", template=False) == common
    assert t.text("taxonomic_common") == f"a photo of {taxonomic} with common name {common}."
    assert t.text("scientific_common") == f"a photo of {scientific} with common name {common}."
    for tt in ALL_TEXT_TYPES:
        text = t.text(tt)
        assert "None" not in text and "nan" not in text and "  " not in text
    # tagged form names exactly the known ranks
    tags = t.text("taxonomic_tag", template=False).split()[::2]
    assert len(tags) == len(taxonomic.split())


def test_tagged_round_trip_and_errors():
    partial = Taxon(kingdom="Animalia", order="Lepidoptera", genus="Pieris", species="rapae")
    for t in (MONARCH, partial):
        assert Taxon.from_tagged(t.text("taxonomic_tag_common"), common_name=t.common_name) == t
    with pytest.raises(ValueError, match="at least one rank"):
        Taxon(common_name="mystery")
    with pytest.raises(ValueError, match="no taxonomic rank"):
        Taxon.from_row({"common_name": "mystery", "genus": "None"})
    with pytest.raises(ValueError, match="unknown text_type"):
        MONARCH.text("latin")
    with pytest.raises(ValueError, match="rank-tagged"):
        Taxon.from_tagged("a photo of a cat.")


def test_text_type_for_step_is_a_function_of_seed_and_step():
    seq = [text_type_for_step(s, seed=3) for s in range(400)]
    assert seq == [text_type_for_step(s, seed=3) for s in range(400)]  # same on every rank / after resume
    assert seq != [text_type_for_step(s, seed=4) for s in range(400)]
    counts = Counter(seq)
    assert set(counts) == set(TEXT_TYPES)
    assert min(counts.values()) > 400 / 5 * 0.6  # roughly uniform
    weighted = Counter(text_type_for_step(s, weights=[0, 1, 0, 0, 3]) for s in range(400))
    assert set(weighted) == {"scientific", "taxonomic_common"}
    assert weighted["taxonomic_common"] > 2 * weighted["scientific"]
    assert {text_type_for_step(s, types=("common",)) for s in range(20)} == {"common"}
    with pytest.raises(ValueError, match="weights"):
        text_type_for_step(0, weights=[1, 2])
    with pytest.raises(ValueError, match="unknown text types"):
        text_type_for_step(0, types=("taxonomic", "binomial"))
    with pytest.raises(ValueError, match="step"):
        text_type_for_step(-1)

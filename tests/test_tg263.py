"""Structure names -> TG-263 standard names -> card classes (organseg.io.tg263): one test per rule."""

from __future__ import annotations

import pytest

from organseg.io.tg263 import StructureNames, non_organ_reason, standard_name, standard_names


@pytest.mark.parametrize(
    "name",
    [
        "Parotid_L",
        "L Parotid",
        "PAROTID LT",
        "Lt_Parotid",
        "parotid left",
        "Left Parotid",
        "Parotid-Lft",
        "ParotidLt",
        "LParotid",
        "parotidl",
        "parotid gland L",
        "Sin Parotid",
    ],
)
def test_side_markers_case_and_separators_all_reach_parotid_l(name):
    assert standard_name(name) == "Parotid_L"


@pytest.mark.parametrize(
    "name", ["Parotid_R", "R Parotid", "PAROTID RT", "Rt_Parotid", "parotid right", "Dx Parotid"]
)
def test_right_side_markers(name):
    assert standard_name(name) == "Parotid_R"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BrainStem", "Brainstem"),  # camel case
        ("BRAIN STEM", "Brainstem"),  # upper case, space
        ("brain_stem", "Brainstem"),  # underscore
        ("Spinal-Cord", "SpinalCord"),  # hyphen
        ("nerve optic L", "OpticNrv_L"),  # word order
        ("OpticNrv_L", "OpticNrv_L"),  # TG-263's own abbreviation
    ],
)
def test_case_spaces_underscores_camel_case_and_word_order(name, expected):
    assert standard_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SMG_Lt", "Glnd_Submand_L"),
        ("ON_R", "OpticNrv_R"),
        ("BP_L", "BrachialPlex_L"),
        ("Myelon", "SpinalCord"),
        ("Hypophysis", "Pituitary"),
        ("Oesophagus", "Esophagus"),
        ("Chiasm", "OpticChiasm"),
        ("thyroid", "Glnd_Thyroid"),
        ("Mandible", "Bone_Mandible"),
        ("Temporal Lobe L", "Lobe_Temporal_L"),
        ("Globe Right", "Eye_R"),
    ],
)
def test_common_abbreviations_and_synonyms(name, expected):
    assert standard_name(name) == expected


def test_table_covers_the_label_spaces_used_here_and_the_required_organs():
    from organseg.phantom import ABDOMEN_CLASSES, HN_CLASSES

    for organ in HN_CLASSES[1:] + ABDOMEN_CLASSES[1:]:
        assert standard_name(organ) is not None, organ
    required = {
        "Cochlea_L",
        "Cochlea_R",
        "BrachialPlex_L",
        "BrachialPlex_R",
        "Cavity_Oral",
        "Larynx",
        "Esophagus",
        "Glnd_Thyroid",
    }
    assert required <= set(standard_names())
    for name in ["cochlea left", "Brachial Plexus R", "oral cavity", "LARYNX", "esophagus", "Thyroid Gland"]:
        assert standard_name(name) in required


@pytest.mark.parametrize("name", ["Parotid", "Parotids", "Parotid L R", "OC", "Cochlear", "Brainstem_L"])
def test_missing_or_conflicting_sides_and_ambiguous_names_are_not_guessed(name):
    assert standard_name(name) is None


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("Brainstem_PRV03", "", "PRV"),
        ("PRV5_Cord", "", "PRV"),
        ("PTV_7000", "", "target"),
        ("CTVn_5400", "", "target"),
        ("GTVp", "", "target"),
        ("z_opt_parotid", "", "helper"),
        ("_Parotid_L", "", "helper"),
        ("zzCord", "", "helper"),
        ("opt PTV", "", "target"),
        ("optCord", "", "optimisation"),
        ("Ring_5mm", "", "ring"),
        ("CouchSurface", "", "couch"),
        ("External", "", "external"),
        ("BODY", "", "external"),
        ("Cord+5mm", "", "expanded"),
        ("Parotid_L~", "", "partial"),
        ("Bolus", "", "not an organ"),
        ("Parotid_L", "PTV", "interpreted type PTV"),
        ("Outline", "EXTERNAL", "interpreted type EXTERNAL"),
    ],
)
def test_derived_and_non_organ_structures_are_never_organs(name, kind, reason):
    found = non_organ_reason(name, kind)
    assert found is not None and reason.lower() in found.lower()
    match = StructureNames(["background", "parotid_l", "spinal_cord"]).match(name, kind)
    assert match.status == "ignored" and match.cls is None


@pytest.mark.parametrize("name", ["OpticNrv_L", "Optic Chiasm", "Parotid_L", "Cord", "Brainstem"])
def test_organs_are_not_mistaken_for_helpers(name):
    assert non_organ_reason(name) is None


def test_card_classes_in_tg263_or_organseg_names_and_class_map():
    names = StructureNames(["background", "parotid_l", "Glnd_Submand_R", "cord"], {"SpinalCord": "cord"})
    assert names.problems(["parotid_l", "Glnd_Submand_R", "cord"]) == []
    assert names.match("PAROTID LT").cls == "parotid_l"
    assert names.match("SMG R").cls == "Glnd_Submand_R"
    assert names.match("Myelon").cls == "cord"
    assert (
        names.match("Cochlea_L").status == "ignored"
        and "not one of the card's classes" in names.match("Cochlea_L").reason
    )
    assert names.match("Parotids").status == "unmatched"
    # an exact structure name in class_map wins over every rule (a clinic's own helper-looking name)
    assert (
        StructureNames(["background", "cord"], {"z_cord_clean": "cord"}).match("Z_CORD_CLEAN").cls == "cord"
    )


def test_card_problems_name_unreachable_and_clashing_classes():
    assert "not TG-263 names" in StructureNames(["background", "blob"]).problems(["blob"])[0]
    assert "both TG-263 Parotid_L" in StructureNames(["background", "parotid_l", "Parotid_L"]).problems([])[0]
    assert "unknown class" in StructureNames(["background", "x"], {"Liver": "liver"}).problems([])[0]


def test_dicom_rt_card_is_checked_when_loaded():
    from organseg.io.card import CardError, DatasetCard

    base = {"name": "c", "layout": "dicom_rt", "path": "p", "classes": ["background", "parotid_l"]}
    assert DatasetCard.from_dict(base).rtstruct_conflict == "newest"
    with pytest.raises(CardError, match="not TG-263 names"):
        DatasetCard.from_dict({**base, "classes": ["background", "blob"]})
    with pytest.raises(CardError, match="rtstruct_conflict"):
        DatasetCard.from_dict({**base, "rtstruct_conflict": "oldest"})

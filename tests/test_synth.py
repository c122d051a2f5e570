"""The bundled dataset: the abbreviation table, the generator, and the committed JSON files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data import synth
from data.abbreviations import (ABBREVIATIONS, GENERAL, HEADERS, INVENTORY_EXCEPTIONS, SPECIALTIES,
                                expand_text, find_abbreviations)
from data.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
INVENTORY = ROOT.parent / "shared" / "datasets" / "abbreviations"
FIELDS = ["id", "specialty", "patient_history", "diagnosis", "treatment_plan", "summary", "expansions"]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    """The committed files, parsed."""
    return {name: json.loads((DATA / file).read_text(encoding="utf-8"))
            for name, file in synth.SPLIT_FILES.items()}


@pytest.fixture(scope="module")
def records(splits) -> list[dict]:
    return [r for recs in splits.values() for r in recs]


def source_fields(record: dict) -> str:
    return " ".join(record[f] for f in ("patient_history", "diagnosis", "treatment_plan"))


def has_token(text: str, token: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", text) is not None


# ------------------------------------------------------------------------------ reproducibility


def test_committed_files_equal_a_regeneration_with_the_default_seed_byte_for_byte():
    for name, text in synth.render_all().items():
        assert (DATA / name).read_bytes() == text.encode("utf-8"), \
            f"data/{name} is stale: run python -m data.synth --force"


def test_generation_ignores_hash_seed_and_depends_on_the_seed():
    code = ("import hashlib, sys; from data.synth import SynthConfig, render_all; "
            "t = render_all(SynthConfig(seed=int(sys.argv[1]), per_specialty=10, ood_per_specialty=2)); "
            "print(hashlib.sha256(''.join(t[k] for k in sorted(t)).encode()).hexdigest())")
    digests = []
    for hash_seed, seed in (("1", "0"), ("2", "0"), ("3", "1")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code, seed], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1]  # set/dict order under another hash seed changes nothing
    assert digests[0] != digests[2]


def test_files_are_indent_1_utf8_arrays_with_a_trailing_newline():
    texts = synth.render_all(synth.SynthConfig(per_specialty=10, ood_per_specialty=1))
    for text in texts.values():
        assert text.startswith('[\n {\n  "id": "synth-') and text.endswith("\n]\n")
        assert synth.render(json.loads(text)) == text


def test_cli_writes_then_check_passes_and_catches_an_edit(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--per-specialty", "10", "--ood-per-specialty", "2"]
    assert synth.main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(synth.SPLIT_FILES.values())
    assert "never occur in training" in capsys.readouterr().out
    assert synth.main(args + ["--check"]) == 0
    assert synth.main(args + ["--check", "--seed", "1"]) == 1
    path = tmp_path / "val.json"
    path.write_text(path.read_text(encoding="utf-8").replace("synth-", "synth_", 1), encoding="utf-8")
    assert synth.main(args + ["--check"]) == 1
    assert "val.json: differs" in capsys.readouterr().err
    path.unlink()
    assert synth.main(args + ["--check"]) == 1
    assert "val.json: missing" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_without_force_and_exits_2(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--per-specialty", "10", "--ood-per-specialty", "1"]
    synth.main(args)
    before = (tmp_path / "train.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        synth.main(args + ["--seed", "5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err and "Traceback" not in err
    assert (tmp_path / "train.json").read_bytes() == before
    assert synth.main(args + ["--seed", "5", "--force"]) == 0
    assert (tmp_path / "train.json").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ size and splits


def test_table_has_at_least_150_abbreviations_over_at_least_8_specialties_all_used(records):
    assert len(ABBREVIATIONS) >= 150
    assert len(SPECIALTIES) >= 10
    used = Counter(a for r in records for a in r["expansions"])
    assert set(used) == set(ABBREVIATIONS)  # every table entry occurs in the data
    assert len({r["specialty"] for r in records}) >= 10
    assert {a.specialty for a in ABBREVIATIONS.values()} == set(SPECIALTIES) | {GENERAL}
    assert set(SPECIALTIES) == set(synth.IN_DOMAIN) | set(synth.OUT_OF_DOMAIN)


def test_splits_are_80_10_10_within_every_in_domain_specialty(splits):
    counts = {name: Counter(r["specialty"] for r in recs) for name, recs in splits.items()}
    total = sum(len(splits[n]) for n in ("train", "val", "test"))
    assert total == 3200 and len(splits["test_ood"]) == 300
    sizes = (len(splits["train"]), len(splits["val"]), len(splits["test"]))
    assert sizes == (total * 8 // 10, total // 10, total // 10)
    for specialty in synth.IN_DOMAIN:
        assert [counts[n][specialty] for n in ("train", "val", "test")] == [320, 40, 40]


def test_out_of_domain_specialties_and_their_abbreviations_never_appear_in_train_val_test(splits):
    in_domain = [r for n in ("train", "val", "test") for r in splits[n]]
    assert {r["specialty"] for r in in_domain} == set(synth.IN_DOMAIN)
    assert {r["specialty"] for r in splits["test_ood"]} == set(synth.OUT_OF_DOMAIN)
    ood_homes = set(synth.OUT_OF_DOMAIN)
    leaked = {a for r in in_domain for a in r["expansions"] if ABBREVIATIONS[a].specialty in ood_homes}
    assert not leaked
    unseen, total = synth.ood_coverage(splits)
    own = {a for a in ABBREVIATIONS.values() if a.specialty in ood_homes}
    assert unseen == len(own) >= 50 and total > unseen  # general ones are shared, by design


def test_no_record_repeats_within_or_across_splits(records):
    keys = Counter((synth.source_text(r), r["summary"]) for r in records)
    assert max(keys.values()) == 1
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"synth-\d{6}", i) for i in ids)


def test_records_load_through_the_data_layer_as_the_model_will_see_them(splits):
    from data.records import find_leakage, load_records

    loaded = {}
    for name, file in synth.SPLIT_FILES.items():
        result = load_records(DATA / file)
        assert not result.skipped and not result.duplicates and not result.repeated_ids
        assert [e.source for e in result.examples] == [synth.source_text(r) for r in splits[name]]
        loaded[name] = result.examples
    assert find_leakage(loaded) == []


# ------------------------------------------------------------------------------ the task itself


def test_every_record_has_the_schema_in_order(records):
    for r in records:
        assert list(r) == FIELDS, r["id"]
        assert all(isinstance(r[f], str) and r[f].strip() == r[f] and r[f] for f in FIELDS[:-1])
        assert isinstance(r["expansions"], dict) and r["expansions"]


def test_summary_contains_expansion_with_abbreviation_for_each_listed_one(records):
    for r in records:
        source = source_fields(r)
        for abbr, expansion in r["expansions"].items():
            assert expansion == ABBREVIATIONS[abbr].expansion
            assert f"{expansion} ({abbr})" in r["summary"], (r["id"], abbr)
            assert has_token(source, abbr), (r["id"], abbr)


def test_expansions_list_every_table_abbreviation_in_the_source(records):
    for r in records:
        assert find_abbreviations(source_fields(r)) == list(r["expansions"]), r["id"]


# Capitalised tokens in sources that are not abbreviations: units (C, L), names (penicillin G,
# T wave, ST segment, H. pylori, E. coli, Guillain-Barre) and roman numerals.
NOT_ABBREVIATIONS = {"C", "L", "G", "T", "H", "E", "I", "II", "III", "II-XII", "ST", "Guillain-Barre"}


def test_sources_hold_no_abbreviation_missing_from_the_table(records):
    unknown = Counter()
    for r in records:
        headers = "|".join(map(re.escape, HEADERS))
        rest = re.sub(rf"(?<![A-Za-z0-9])(?:{headers}):", " ", source_fields(r))
        for abbr in r["expansions"]:
            rest = re.sub(rf"(?<![A-Za-z0-9]){re.escape(abbr)}(?![A-Za-z0-9])", " ", rest)
        for token in re.findall(r"[A-Za-z0-9][A-Za-z0-9/-]*", rest):
            capitals = sum(c.isupper() for c in token)
            looks_abbreviated = capitals >= 2 or (capitals == 1 and (len(token) == 1 or token[0].isdigit()
                                                                     or any(c.isdigit() for c in token)))
            if looks_abbreviated and token.strip("-/") not in NOT_ABBREVIATIONS:
                unknown[token] += 1
    assert not unknown, unknown.most_common(10)


def test_summary_is_the_deterministic_expansion_of_the_source(records):
    for r in records:
        assert r["summary"] == synth.summarise(r["patient_history"], r["diagnosis"], r["treatment_plan"])
        assert r["summary"].startswith(expand_text(r["patient_history"]) + " Diagnosis: ")
        assert " Treatment: " in r["summary"] and " Follow-up: " in r["summary"]


def contract(text: str) -> str:
    """Undo expand_text: 'shortness of breath (SOB)' -> 'SOB', 'Chief complaint:' -> 'CC:'."""
    for abbr in sorted(ABBREVIATIONS, key=len, reverse=True):
        text = text.replace(ABBREVIATIONS[abbr].expanded(), abbr)
    for header, words in HEADERS.items():
        if header not in ("Rx", "Tx", "F/u"):  # plan labels are dropped, not rewritten
            text = text.replace(words + ":", header + ":")
    return text


def test_words_other_than_abbreviations_are_copied_verbatim(records):
    for r in records:
        for field in ("patient_history", "diagnosis"):
            assert contract(expand_text(r[field])) == r[field], r["id"]
        treatment, follow_up = synth.split_plan(r["treatment_plan"])
        assert contract(r["summary"]).endswith(f"Treatment: {treatment} Follow-up: {follow_up}"), r["id"]


def test_plan_labels_become_section_headers_and_verbs_stay():
    assert synth.summarise("56 yo M.", "CAD.", "Rx: ASA 81 mg PO QD. F/u: ECG, LDL in 2 weeks.") == (
        "56 years old (yo) male (M). Diagnosis: coronary artery disease (CAD). "
        "Treatment: aspirin (ASA) 81 mg by mouth (PO) daily (QD). "
        "Follow-up: electrocardiogram (ECG), low-density lipoprotein (LDL) in 2 weeks.")
    assert synth.split_plan("Start NTG 0.4 mg SL PRN. Recheck BMP in 1 week. Admit to the ICU.") == (
        "Start NTG 0.4 mg SL PRN.", "Recheck BMP in 1 week. Admit to the ICU.")
    with pytest.raises(DataError, match="no follow-up sentence"):
        synth.split_plan("ASA 81 mg PO QD.")


def test_word_counts_stay_small_enough_for_a_tiny_model(records):
    for r in records:
        assert 30 <= len(synth.source_text(r).split()) <= 90, r["id"]
        assert 40 <= len(r["summary"].split()) <= 140, r["id"]


def test_records_vary_widely(records):
    n = len(records)
    first_sentences = {r["summary"].split(". ")[0] for r in records}
    assert len(first_sentences) > 0.8 * n
    assert len({r["diagnosis"] for r in records}) > 0.5 * n
    plan_shapes = {re.sub(r"\d+(\.\d+)?", "#", r["treatment_plan"]) for r in records}
    assert len(plan_shapes) > 0.8 * n
    ages = [int(m.group(1) or m.group(2)) for r in records
            for m in [re.search(r"\b(\d+) (?:yo|y/o)\b|\b(\d+)-year-old", r["patient_history"])]]
    assert len(ages) == n and min(ages) <= 20 and max(ages) >= 93 and len(set(ages)) >= 70
    male = sum(bool(re.search(r"\b(?:yo|y/o) M\b|-year-old (?:man|male)\b", r["patient_history"]))
               for r in records)
    female = sum(bool(re.search(r"\b(?:yo|y/o) F\b|-year-old (?:woman|female)\b", r["patient_history"]))
                 for r in records)
    assert male + female == n and min(male, female) > 0.4 * n
    negated = sum(bool(re.search(r"\b(?:Denies|denies|No|neg for|Negative for|w/o|Has not had)\b",
                                 r["patient_history"])) for r in records)
    assert negated > 0.5 * n
    dosed = sum(bool(re.search(r"\d+(?:\.\d+)? (?:mg|mcg|g|units)\b", r["treatment_plan"])) for r in records)
    assert dosed > 0.5 * n
    pressures = {m for r in records for m in re.findall(r"BP (\d+/\d+)", r["patient_history"])}
    assert len(pressures) > 500


def test_choices_and_number_ranges_draw_within_their_bounds():
    import random

    rng = random.Random(0)
    drawn = [synth.resolve("{1.5..2.5} mg {PO|IV} x{3..4}", rng) for _ in range(200)]
    for text in drawn:
        m = re.fullmatch(r"(\d\.\d) mg (PO|IV) x([34])", text)
        assert m and 1.5 <= float(m.group(1)) <= 2.5
    assert {t.split()[2] for t in drawn} == {"PO", "IV"}
    assert synth.fill("$age yo {M|M}", rng, age="40") == "40 yo M"


# ------------------------------------------------------------------------------ the table


def test_abbreviations_match_only_as_whole_tokens():
    assert find_abbreviations("HDL 35, SpO2 90%, OK, ICS/LABA, 5-FU-based chemo, anti-CCP") == \
        ["HDL", "SpO2", "ICS", "LABA", "5-FU", "chemo", "CCP"]
    assert expand_text("CC: HD, no HDL.") == \
        "Chief complaint: hemodialysis (HD), no high-density lipoprotein (HDL)."


def _inventories() -> list[tuple[str, dict[str, tuple[str, float]]]]:
    """(file, abbreviation -> its dominant sense and share), in order of precedence."""
    if not INVENTORY.is_dir():
        pytest.skip(f"sense inventories not found at {INVENTORY}")
    out = []
    for name, columns in (("sense_distribution_448.txt", (0, 1, 2)),
                          ("vanderbilt_clinic_notes.txt", (0, 1, 4)),
                          ("vanderbilt_discharge_sums.txt", (0, 1, 4))):
        lines = (INVENTORY / name).read_text(encoding="utf-8").splitlines()
        best: dict[str, tuple[str, float]] = {}
        for line in lines[1 if name.startswith("vanderbilt") else 0:]:
            cells = line.split("\t")
            abbr, sense, share = cells[columns[0]], cells[columns[1]], float(cells[columns[2]])
            if re.match(r"not an? (abbreviation|acronym)", sense):
                continue
            if abbr not in best or share > best[abbr][1]:
                best[abbr] = (sense, share)
        out.append((name, best))
    return out


def dominant_sense(abbr: str, inventories) -> tuple[str, str] | None:
    """(file, sense) from the first inventory listing `abbr` (keys are lower case; the Vanderbilt
    files write '/' as '_')."""
    keys = (abbr.lower(), re.sub(r"[^a-z0-9]", "_", abbr.lower()))
    for name, best in inventories:
        for key in keys:
            if key in best:
                return name, best[key][0]
    return None


def normalise(text: str) -> str:
    """Lower case, punctuation and hyphens as spaces, 'and'/'or' dropped."""
    return " ".join(w for w in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if w not in ("and", "or"))


def matches_sense(ours: str, sense: str) -> bool:
    """Our expansion contains the sense, or one of its '/'-alternatives or parenthesised glosses
    ('per os (by mouth)', 'pro re nata/as needed'); a match starts at a word boundary."""
    variants = {sense}
    gloss = re.fullmatch(r"(.*?)\((.*)\)\s*", sense)
    if gloss:
        variants |= {gloss.group(1), gloss.group(2)}
    variants |= {part for v in list(variants) for part in v.split("/")}
    padded = f" {normalise(ours)} "
    return any(f" {normalise(v)}" in padded for v in variants if normalise(v))


def test_sense_matching_normalises_case_punctuation_and_alternatives():
    assert matches_sense("low-density lipoprotein", "low density lipoprotein")
    assert matches_sense("nausea and vomiting", "nausea/vomiting")
    assert matches_sense("as needed", "pro re nata/as needed")
    assert matches_sense("total iron binding capacity", "total iron binding capacit")
    assert matches_sense("Methicillin-resistant Staphylococcus aureus",
                         "methicillin resistant staphylococcus aureus")
    assert not matches_sense("coronary artery disease", "chest pain")
    assert not matches_sense("rheumatoid arthritis", "room air")


def test_expansions_agree_with_the_dominant_sense_of_the_shared_inventories():
    inventories = _inventories()
    checked, wrong = 0, []
    for abbr, expansion in [(a.abbr, a.expansion) for a in ABBREVIATIONS.values()] + list(HEADERS.items()):
        found = dominant_sense(abbr, inventories)
        if found is None or abbr in INVENTORY_EXCEPTIONS:
            continue
        checked += 1
        if not matches_sense(expansion, found[1]):
            wrong.append(f"{abbr}: ours {expansion!r}, {found[0]} says {found[1]!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 150  # the check covers most of the table, not a handful


def test_each_listed_exception_is_a_real_disagreement_with_a_reason():
    inventories = _inventories()
    for abbr, reason in INVENTORY_EXCEPTIONS.items():
        assert abbr in ABBREVIATIONS and len(reason) > 30, abbr
        found = dominant_sense(abbr, inventories)
        assert found is not None and not matches_sense(ABBREVIATIONS[abbr].expansion, found[1]), \
            f"{abbr} agrees with the inventory now; drop the exception"

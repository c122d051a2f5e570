import json
import subprocess
import sys
from pathlib import Path

import pytest

from data import import_meqsum, import_mts_dialog
from data.records import RecordFormat, find_leakage, load_records

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
MTS = DATASETS / "mts-dialog"
MTS_FILES = [MTS / "MTS-Dialog-TrainingSet.csv", MTS / "MTS-Dialog-ValidationSet.csv",
             MTS / "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv"]
MEQSUM = DATASETS / "meqsum" / "MeQSum.csv"

needs_mts = pytest.mark.skipif(not all(p.exists() for p in MTS_FILES), reason=f"MTS-Dialog CSVs not found in {MTS}")
needs_meqsum = pytest.mark.skipif(not MEQSUM.exists(), reason=f"MeQSum.csv not found at {MEQSUM}")


def run(module, capsys, *argv):
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def mts_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("mts") / "mts.json"
    import_mts_dialog.main([*map(str, MTS_FILES), "--out", str(out)])
    return out, {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))}


@needs_mts
def test_mts_dialog_import_keeps_every_row_with_file_scoped_ids(mts_records):
    _, records = mts_records
    assert len(records) == 1201 + 100 + 200
    train0 = records["MTS-Dialog-TrainingSet:0"]
    assert list(train0) == ["id", "section_header", "dialogue", "summary"]
    assert train0["section_header"] == "GENHX"
    assert train0["summary"].startswith("The patient is a 76-year-old white female who presents to the clinic today")
    assert train0["dialogue"].startswith("Doctor: What brings you back into the clinic today, miss? \nPatient: I came")
    assert records["MTS-Dialog-TestSet-1-MEDIQA-Chat-2023:1"] == {
        "id": "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023:1",
        "section_header": "FAM/SOCHX",
        "dialogue": "Doctor: Any medical issues running in your families? \nPatient: Oh yes, stroke. \n"
                    "Doctor: Anything else? \nPatient: Sleep apnea.",
        "summary": "Positive for stroke and sleep apnea.",
    }
    assert records["MTS-Dialog-ValidationSet:99"]["section_header"] == "ASSESSMENT"
    assert "aspirin 81 mg" in records["MTS-Dialog-ValidationSet:99"]["summary"]


@needs_mts
def test_mts_dialog_import_normalises_line_endings(mts_records):
    _, records = mts_records
    assert not any("\r" in r["dialogue"] or "\r" in r["summary"] for r in records.values())
    assert sum("\n" in r["dialogue"] for r in records.values()) > 1400


@needs_mts
def test_mts_dialog_output_loads_with_its_preset_and_reports_the_known_duplicate(mts_records):
    path, _ = mts_records
    result = load_records(path, RecordFormat.preset("mts-dialog"))
    assert len(result.examples) == 1501 and not result.skipped and not result.repeated_ids
    assert [(d.example.id, d.first.id) for d in result.duplicates] == [
        ("MTS-Dialog-TrainingSet:1109", "MTS-Dialog-TrainingSet:256")]
    ex = next(e for e in result.examples if e.id == "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023:1")
    assert ex.source.startswith("Doctor: Any medical issues") and ex.target == "Positive for stroke and sleep apnea."
    by_file = {}
    for e in result.examples:
        by_file.setdefault(e.id.split(":")[0], []).append(e)
    assert find_leakage(by_file) == []  # the published train/validation/test files do not overlap


@needs_mts
def test_mts_dialog_deidentify_masks_dates_and_keeps_doses(tmp_path, capsys):
    out = tmp_path / "mts.json"
    code, stdout, stderr = run(import_mts_dialog, capsys, MTS_FILES[1], MTS_FILES[2], "--out", out, "--deidentify")
    assert code == 0 and "wrote 300 records from 2 file(s)" in stdout
    assert "de-identified: DATE" in stdout
    records = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))}
    test0 = records["MTS-Dialog-TestSet-1-MEDIQA-Chat-2023:0"]["summary"]
    assert "last seen in clinic on [DATE] with diagnosis" in test0 and "07/29/2008" not in test0
    assert "aspirin 81 mg" in records["MTS-Dialog-ValidationSet:99"]["summary"]


@needs_mts
def test_mts_dialog_import_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "mts.json"
    out.write_text("keep")
    code, _, err = run(import_mts_dialog, capsys, MTS_FILES[1], "--out", out)
    assert code == 2 and "already exists; pass --force" in err and out.read_text() == "keep"
    code, _, _ = run(import_mts_dialog, capsys, MTS_FILES[1], "--out", out, "--force")
    assert code == 0 and len(json.loads(out.read_text())) == 100


@needs_meqsum
def test_meqsum_import_maps_chq_to_question_and_keeps_every_row(tmp_path, capsys):
    out = tmp_path / "meqsum.json"
    code, stdout, _ = run(import_meqsum, capsys, MEQSUM, "--out", out)
    assert code == 0 and "wrote 1000 records" in stdout and "--format meqsum" in stdout
    records = json.loads(out.read_text(encoding="utf-8"))
    assert len(records) == 1000 and len({r["id"] for r in records}) == 1000
    assert records[0]["id"] == "MeQSum:1-131188152.xml.txt"
    assert records[0]["question"].startswith("SUBJECT: who and where to get cetirizine - D\nMESSAGE: I need/want")
    assert records[0]["summary"] == "Who manufactures cetirizine?"
    assert records[-1] == {
        "id": "MeQSum:1-131296355.xml.txt",
        "question": "SUBJECT: Home resources for AMD people\nMESSAGE: What specific resources are available for "
                    "an elderly male living by himself at home?  My father in law is 85 years old, lives alone and "
                    "has macular degeneration.  Looking for visual aids to assist him around the house.",
        "summary": "What resources are available for elderly with age-related macular degeneration?",
    }
    result = load_records(out, RecordFormat.preset("meqsum"))
    assert len(result.examples) == 1000 and not result.duplicates
    assert result.examples[0].source == records[0]["question"]


@needs_meqsum
def test_meqsum_deidentify_masks_dates_and_urls_in_a_known_question(tmp_path, capsys):
    out = tmp_path / "meqsum.json"
    code, stdout, _ = run(import_meqsum, capsys, MEQSUM, "--out", out, "--deidentify")
    assert code == 0 and "URL" in stdout and "DATE" in stdout
    record = next(r for r in json.loads(out.read_text()) if r["id"] == "MeQSum:1-133488182.xml.txt")
    assert "Sent: Thursday, [DATE] 3:18 AM" in record["question"]
    assert "[URL]\nwaiting for your reply" in record["question"]
    assert record["summary"] == "Is lincomycin still prescribed for human use?"


# ---------------------------------------------------------------------- bad CSVs (no dataset needed)


def test_csv_missing_a_column_stops_naming_it(tmp_path, capsys):
    bad = tmp_path / "MeQSum.csv"
    bad.write_text("File,Question,Summary\na,b,c\n", encoding="utf-8")
    code, _, err = run(import_meqsum, capsys, bad, "--out", tmp_path / "o.json")
    assert code == 2 and err.startswith(f"error: {bad}: missing column(s) 'CHQ'")
    assert not (tmp_path / "o.json").exists()


def test_csv_row_with_empty_text_is_skipped_with_row_and_line(tmp_path, capsys):
    csv_path = tmp_path / "mts.csv"
    csv_path.write_text('ID,section_header,section_text,dialogue\n'
                        '0,CC,Cough.,"Doctor: Why are you here?\nPatient: Cough."\n'
                        '1,CC,,"Doctor: Hi."\n'
                        '2,CC,Fever.,"Doctor: Fever?\r\nPatient: Yes."\n', encoding="utf-8")
    out = tmp_path / "o.json"
    code, stdout, err = run(import_mts_dialog, capsys, csv_path, "--out", out)
    assert code == 0 and "wrote 2 records" in stdout
    assert f"warning: {csv_path}: row 1 (line 4): field 'section_text': empty (row skipped)" in err
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == ["mts:0", "mts:2"]
    assert records[1]["dialogue"] == "Doctor: Fever?\nPatient: Yes."


def test_csv_that_is_not_utf8_stops(tmp_path, capsys):
    bad = tmp_path / "m.csv"
    bad.write_bytes("File,CHQ,Summary\na,caf\xe9,c\n".encode("latin-1"))
    code, _, err = run(import_meqsum, capsys, bad, "--out", tmp_path / "o.json")
    assert code == 2 and "line 2: not UTF-8 text" in err


def test_importer_cli_runs_as_a_module_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.import_meqsum", str(tmp_path / "missing.csv"),
                           "--out", str(tmp_path / "o.json")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'missing.csv'}: no such file\n"

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import DataError, exit_on_data_error
from data.records import (
    Example,
    RecordFormat,
    add_format_args,
    dedupe,
    find_leakage,
    format_from_args,
    load_records,
    read_json_records,
    refuse_to_overwrite,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]


def record(**fields):
    base = {"patient_history": "Cough for 3 days.", "diagnosis": "Bronchitis.",
            "treatment_plan": "Rest and fluids.", "summary": "Bronchitis; rest."}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------------ building the source


def test_default_source_labels_fields_in_listed_order():
    rec = {"treatment_plan": "Rest.", "diagnosis": "Flu.", "patient_history": "Fever.", "summary": "Flu."}
    assert RecordFormat().source_of(rec) == "Patient history: Fever. Diagnosis: Flu. Treatment plan: Rest."


def test_default_source_skips_empty_and_absent_fields_and_strips_values():
    rec = {"patient_history": "  Fever.\n", "diagnosis": "   ", "summary": "x"}
    assert RecordFormat().source_of(rec) == "Patient history: Fever."


def test_label_capitalises_first_letter_only_so_acronyms_survive():
    fmt = RecordFormat(source_fields=("HPI", "lab_results"))
    assert fmt.source_of({"HPI": "a", "lab_results": "b"}) == "HPI: a Lab results: b"


def test_template_names_the_source_fields_and_overrides_labels():
    fmt = RecordFormat(template="question: {question} context: {context}", target_field="answer")
    assert fmt.source_fields == ("question", "context")
    ex = fmt.to_example({"question": "Dose?", "context": "81 mg daily.", "answer": "81 mg"}, "x")
    assert ex.source == "question: Dose? context: 81 mg daily." and ex.target == "81 mg"


def test_qa_preset_is_question_and_context_to_answer():
    fmt = RecordFormat.qa()
    assert (fmt.source_fields, fmt.target_field) == (("question", "context"), "answer")


def test_template_renders_an_absent_field_as_empty():
    assert RecordFormat.qa().source_of({"question": "Why?"}) == "question: Why? context:"


def test_template_disagreeing_with_source_fields_is_rejected():
    with pytest.raises(DataError, match="differ from the fields the template names"):
        RecordFormat(source_fields=("question",), template="{question} {context}")


@pytest.mark.parametrize("template", ["{} and {}", "{0}", "{a.b}", "no fields", "{unclosed"])
def test_bad_templates_are_rejected_with_the_template_in_the_message(template):
    with pytest.raises(DataError, match="template"):
        RecordFormat(template=template)


def test_target_field_cannot_also_be_a_source_field():
    with pytest.raises(DataError, match="both a source field and the target"):
        RecordFormat(source_fields=("summary", "diagnosis"))


def test_mts_dialog_and_meqsum_presets_use_the_raw_text_as_source():
    assert RecordFormat.preset("mts-dialog").source_of({"dialogue": "Doctor: Hi."}) == "Doctor: Hi."
    assert RecordFormat.preset("meqsum").source_of({"question": " Why? "}) == "Why?"
    with pytest.raises(DataError, match="unknown record format 'nope'"):
        RecordFormat.preset("nope")


def test_absent_source_fields_message_lists_fields_looked_for_and_keys_present():
    with pytest.raises(DataError) as err:
        RecordFormat().source_of({"id": "a", "dialogue": "Doctor: hi", "summary": "s"})
    message = str(err.value)
    assert "['patient_history', 'diagnosis', 'treatment_plan']" in message
    assert "'dialogue'" in message and "--source-fields" in message
    assert "--format mts-dialog" in message  # the preset that fits the keys


# ------------------------------------------------------------------------ loading files


def test_load_array_builds_examples_with_ids_and_keeps_raw_record(tmp_path):
    path = write(tmp_path, "notes.json", [record(id="n1", specialty="cardiology"), record(diagnosis="Asthma."),
                                           record(id=7, diagnosis="Flu.")])
    result = load_records(path)
    assert [ex.id for ex in result.examples] == ["n1", "notes:1", "7"]
    first = result.examples[0]
    assert first.source == "Patient history: Cough for 3 days. Diagnosis: Bronchitis. Treatment plan: Rest and fluids."
    assert first.target == "Bronchitis; rest."
    assert first.record["specialty"] == "cardiology"
    assert result.total == 3 and not result.skipped and not result.duplicates


def test_json_lines_give_the_same_examples_as_an_array(tmp_path):
    recs = [record(id="a"), record(id="b", diagnosis="Asthma.")]
    array = write(tmp_path, "a.json", recs)
    lines = tmp_path / "a.jsonl"
    lines.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n", encoding="utf-8")
    assert load_records(array).examples == load_records(lines).examples


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(record(diagnosis="a\u2028b"), ensure_ascii=False) + "\n", encoding="utf-8")
    assert "a\u2028b" in load_records(path).examples[0].source


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([record()]).encode())
    assert len(load_records(path).examples) == 1


def test_array_records_report_the_line_they_start_on(tmp_path):
    path = write(tmp_path, "t.json", [record(), record(summary="")])
    (issue,) = load_records(path).skipped
    assert issue.line == json.dumps([record(), record(summary="")], indent=2).split("\n").index("  {", 2) + 1
    assert str(issue) == f"{path}: record 1 (line {issue.line}): field 'summary': empty target"


BAD_RECORDS = [
    (["not an object"], None, "expected a JSON object, got string"),
    ([record(summary=...)], "summary", "missing target"),
    ([record(summary=None)], "summary", "missing target"),
    ([record(summary="  ")], "summary", "empty target"),
    ([record(summary=["a"])], "summary", "expected a string, got array"),
    ([record(diagnosis=3)], "diagnosis", "expected a string, got number"),
    ([record(patient_history="", diagnosis=" ", treatment_plan="")], None, "are all empty"),
    ([record(patient_history=..., diagnosis=..., treatment_plan=...)], None, "none of the source fields"),
    ([record(id={"x": 1})], "id", "expected a string or integer id, got object"),
]


@pytest.mark.parametrize("bad,field,problem", BAD_RECORDS)
def test_bad_record_is_skipped_with_a_located_warning(tmp_path, bad, field, problem):
    path = write(tmp_path, "d.json", [record(id="good")] + bad)
    result = load_records(path)
    assert [ex.id for ex in result.examples] == ["good"]
    (issue,) = result.skipped
    assert (issue.index, issue.field) == (1, field) and problem in issue.problem
    warnings = "\n".join(result.warnings())
    assert f"{path}: record 1" in warnings and "skipped 1 of 2 records" in warnings


@pytest.mark.parametrize("bad,field,problem", BAD_RECORDS)
def test_bad_record_stops_loading_when_asked(tmp_path, bad, field, problem):
    path = write(tmp_path, "d.json", [record()] + bad)
    with pytest.raises(DataError, match=f"^{path}: record 1 .*{problem}"):
        load_records(path, on_bad="stop")


def test_all_records_skipped_stops_with_the_first_reason(tmp_path):
    path = write(tmp_path, "qa.json", [{"question": "q", "context": "c", "answer": "a"}] * 2)
    expected = r"no usable records: all 2 skipped; first: record 0 .*none of the source fields.*--format qa"
    with pytest.raises(DataError, match=expected):
        load_records(path)


FILE_ERRORS = [
    (b"", "file is empty"),
    (b"  \n\n", "file is empty"),
    (b"[]", "no records"),
    (b'[{"summary": "a",}]', r"invalid JSON at line 1, column 18: Expecting property name"),
    (b'[\n {"summary": "a"}\n {"summary": "b"}\n]', r"invalid JSON at line 3, column 2: Expecting ',' delimiter"),
    (b'{"summary": "a"}\n{"summary": \n', r"invalid JSON at line 2, column 13"),
    (b'{\n "summary": "a"\n}\n', "expected a JSON array of records or JSON Lines .*, found a single JSON object"),
    (b'[{"summary": "caf\xe9"}]', r"line 1: not UTF-8 text \(byte 0xe9\)"),
    (b'[\n{"summary": "a"},\n{"summary": "\xff"}]', r"line 3: not UTF-8"),
]


@pytest.mark.parametrize("content,message", FILE_ERRORS)
def test_unusable_file_stops_with_a_message_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        load_records(path)


def test_missing_file_and_directory_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_json_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="cannot read"):
        read_json_records(tmp_path)


def test_duplicates_are_reported_but_kept(tmp_path):
    path = write(tmp_path, "d.json", [record(id="a"), record(id="b", diagnosis="Bronchitis.\n  "),
                                      record(id="c", diagnosis="Other.")])
    result = load_records(path)
    assert len(result.examples) == 3
    assert [(d.example.id, d.first.id) for d in result.duplicates] == [("b", "a")]
    assert any("record 'b' repeats record 'a'" in w for w in result.warnings())


def test_whitespace_differences_do_not_hide_a_duplicate():
    a = Example("a", "Diagnosis: Flu.  Plan: rest.", "Flu", {})
    b = Example("b", "Diagnosis: Flu.\nPlan: rest.", "Flu ", {})
    c = Example("c", "Diagnosis: flu. Plan: rest.", "Flu", {})  # case differs: a different record
    kept, dropped = dedupe([a, b, c])
    assert kept == [a, c] and [(d.example, d.first) for d in dropped] == [(b, a)]


def test_repeated_ids_are_reported(tmp_path):
    path = write(tmp_path, "d.json", [record(id="x"), record(id="x", diagnosis="Other.")])
    result = load_records(path)
    assert result.repeated_ids == ["x"]
    assert any("ids used by more than one record: 'x'" in w for w in result.warnings())


def test_find_leakage_reports_records_shared_between_splits_only():
    ex = lambda i, s: Example(i, s, "t", {})
    splits = {
        "train": [ex("t1", "shared"), ex("t2", "only train"), ex("t3", "twice in train"), ex("t4", "twice in train")],
        "val": [ex("v1", "other")],
        "test": [ex("x1", "shared  ")],
    }
    leaks = find_leakage(splits)
    assert [leak.places for leak in leaks] == [(("train", "t1"), ("test", "x1"))]
    assert str(leaks[0]) == "same source and target in train ('t1'), test ('x1')"


# ------------------------------------------------------------------------ writing and CLI glue


def test_write_json_is_pretty_utf8_with_trailing_newline(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, [{"summary": "café – 5 µg"}])
    text = path.read_text(encoding="utf-8")
    assert text == '[\n  {\n    "summary": "café – 5 µg"\n  }\n]\n'


def test_failed_write_leaves_the_old_file_and_no_temp_files(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, [1])
    with pytest.raises(TypeError):
        write_json(path, [object()])
    assert json.loads(path.read_text()) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_refuse_to_overwrite_names_existing_files_unless_forced(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(DataError, match=r"a\.json: already exists; pass --force"):
        refuse_to_overwrite([tmp_path / "a.json", tmp_path / "b.json"], force=False)
    refuse_to_overwrite([tmp_path / "a.json"], force=True)


def test_exit_on_data_error_prints_message_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_data_error():
            raise DataError("data/x.json: record 3: field 'summary': empty target")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/x.json: record 3: field 'summary': empty target\n"


def test_exit_on_data_error_lets_bugs_keep_their_traceback():
    @exit_on_data_error()
    def buggy():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        buggy()


def parse_format(*argv):
    parser = argparse.ArgumentParser()
    add_format_args(parser)
    return format_from_args(parser.parse_args(list(argv)))


def test_format_flags_start_from_a_preset_and_override_it():
    assert parse_format() == RecordFormat()
    assert parse_format("--format", "qa") == RecordFormat.qa()
    fmt = parse_format("--format", "qa", "--source-fields", "question", "--target-field", "reply")
    assert (fmt.source_fields, fmt.template, fmt.target_field) == (("question",), None, "reply")
    fmt = parse_format("--template", "Q: {q}", "--target-field", "a", "--id-field", "uid")
    assert (fmt.source_fields, fmt.id_field) == (("q",), "uid")


def test_cli_reports_bad_data_with_exit_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"summary": "a"', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "data.split", str(bad), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {bad}: invalid JSON at line 1, column 17")
    assert "Traceback" not in proc.stderr

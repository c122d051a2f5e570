import json

import pytest

from data.errors import DataError
from data.records import Example, RecordFormat, find_leakage, load_records
from data.split import main, split_examples, split_sizes


def examples(n):
    return [Example(f"r{i}", f"source {i}", f"target {i}", {}) for i in range(n)]


def write_records(path, n, duplicates=0):
    recs = [{"diagnosis": f"Diagnosis {i}.", "summary": f"Summary {i}."} for i in range(n)]
    recs += [dict(recs[i % n], note="copy") for i in range(duplicates)]  # same source/target, other keys
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("n,sizes", [(10, (8, 1, 1)), (100, (80, 10, 10)), (1500, (1200, 150, 150)),
                                     (3, (1, 1, 1)), (25, (19, 3, 3))])
def test_sizes_are_80_10_10_with_at_least_one_per_split(n, sizes):
    assert tuple(split_sizes(n).values()) == sizes


def test_too_few_records_to_split_is_a_data_error():
    with pytest.raises(DataError, match="need at least 3 distinct records"):
        split_sizes(2)


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    a, b, c = (split_examples(examples(50), seed) for seed in (0, 0, 1))
    assert a == b
    assert a["test"] != c["test"]


def test_splits_partition_the_input_and_keep_its_order():
    data = examples(37)
    splits = split_examples(data, seed=3)
    ids = [ex.id for part in splits.values() for ex in part]
    assert sorted(ids) == sorted(ex.id for ex in data) and len(set(ids)) == len(data)
    for part in splits.values():
        positions = [data.index(ex) for ex in part]
        assert positions == sorted(positions)


def test_cli_writes_three_pretty_files_without_leakage(tmp_path, capsys):
    source = write_records(tmp_path / "all.json", 40, duplicates=10)
    code, out, _ = run(capsys, source, "--out", tmp_path / "split", "--seed", 0, "--format", "summarisation")
    assert code == 0
    assert "wrote 32 train, 4 val, 4 test" in out and "10 duplicates dropped" in out
    loaded = {name: load_records(tmp_path / "split" / f"{name}.json").examples for name in ("train", "val", "test")}
    assert find_leakage(loaded) == []
    assert sum(len(v) for v in loaded.values()) == 40
    text = (tmp_path / "split" / "val.json").read_text(encoding="utf-8")
    assert text.startswith("[\n  {\n") and text.endswith("]\n")


def test_cli_gives_records_without_id_the_id_they_were_loaded_with(tmp_path, capsys):
    source = write_records(tmp_path / "all.json", 10)
    run(capsys, source, "--out", tmp_path / "s")
    records = json.loads((tmp_path / "s" / "train.json").read_text())
    for rec in records:
        index = int(rec["diagnosis"].split()[1].rstrip("."))
        assert rec["id"] == f"all:{index}" and list(rec)[0] == "id"


def test_cli_split_is_byte_identical_across_runs(tmp_path, capsys):
    source = write_records(tmp_path / "all.json", 30)
    run(capsys, source, "--out", tmp_path / "a", "--seed", 7)
    run(capsys, source, "--out", tmp_path / "b", "--seed", 7)
    for name in ("train.json", "val.json", "test.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_never_overwrites_without_force(tmp_path, capsys):
    source = write_records(tmp_path / "all.json", 10)
    out_dir = tmp_path / "s"
    out_dir.mkdir()
    (out_dir / "test.json").write_text("keep me")
    code, _, err = run(capsys, source, "--out", out_dir)
    assert code == 2 and "test.json: already exists; pass --force" in err
    assert (out_dir / "test.json").read_text() == "keep me"
    assert not (out_dir / "train.json").exists()  # nothing half-written
    code, _, _ = run(capsys, source, "--out", out_dir, "--force")
    assert code == 0 and len(json.loads((out_dir / "test.json").read_text())) == 1


def test_cli_refuses_to_split_a_file_onto_itself(tmp_path, capsys):
    source = write_records(tmp_path / "train.json", 10)
    code, _, err = run(capsys, source, "--out", tmp_path, "--force")
    assert code == 2 and "would be overwritten by the split" in err


def test_cli_skips_bad_records_with_warnings_and_splits_the_rest(tmp_path, capsys):
    recs = [{"diagnosis": f"D{i}", "summary": f"S{i}"} for i in range(10)] + [{"diagnosis": "D", "summary": ""}]
    (tmp_path / "all.json").write_text(json.dumps(recs))
    code, out, err = run(capsys, tmp_path / "all.json", "--out", tmp_path / "s")
    assert code == 0 and "1 bad record skipped" in out
    assert "record 10" in err and "field 'summary': empty target" in err


def test_cli_uses_the_record_format_flags(tmp_path, capsys):
    recs = [{"question": f"q{i}", "context": "c", "answer": f"a{i}"} for i in range(10)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    code, _, err = run(capsys, tmp_path / "qa.jsonl", "--out", tmp_path / "default")
    assert code == 2 and "none of the source fields" in err and "--format qa" in err
    code, out, _ = run(capsys, tmp_path / "qa.jsonl", "--out", tmp_path / "s", "--format", "qa")
    assert code == 0 and "wrote 8 train, 1 val, 1 test" in out
    test = load_records(tmp_path / "s" / "test.json", RecordFormat.qa()).examples
    assert test[0].source.startswith("question: q")

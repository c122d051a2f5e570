"""Import MeQSum (Ben Abacha & Demner-Fushman, ACL 2019) into our JSON records.

    python -m data.import_meqsum MeQSum.csv --out meqsum.json [--deidentify] [--force]

Each CSV row `File, CHQ, Summary` (consumer health question -> one-line summary) becomes
`{"id": "<csv file stem>:<File>", "question": <CHQ>, "summary": <Summary>}`. Train on it with
`--format meqsum` (source `question`, target `summary`). Line endings become "\\n" and outer
whitespace is stripped. A row with an empty CHQ or Summary is skipped with a warning; a missing
column, a file that is not UTF-8 CSV, or an existing --out (without --force) stops with exit
status 2. Duplicate question/summary pairs are reported, not dropped (`data.split` drops them).
`--deidentify` masks identifiers in the question and summary (see data/deid.py).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from data.deid import format_counts, scrub_record
from data.errors import DataError, exit_on_data_error, where
from data.records import RecordFormat, read_csv_rows, refuse_to_overwrite, write_imported

COLUMNS = ("File", "CHQ", "Summary")
TEXT_FIELDS = ("question", "summary")  # what --deidentify scrubs
FORMAT = RecordFormat.preset("meqsum")


def convert(path: Path, deidentify: bool = False) -> tuple[list[dict], list[str], Counter]:
    """Records from the MeQSum CSV, warnings for skipped rows, and de-identification counts."""
    records, warnings, counts = [], [], Counter()
    for index, (line, row) in enumerate(read_csv_rows(path, COLUMNS)):
        empty = [c for c in ("CHQ", "Summary") if not row[c]]
        if empty:
            warnings.append(f"warning: {where(path, index, empty[0], line, kind='row')}: empty (row skipped)")
            continue
        record = {"id": f"{path.stem}:{row['File'] or index}", "question": row["CHQ"], "summary": row["Summary"]}
        if deidentify:
            record, found = scrub_record(record, TEXT_FIELDS)
            counts += found
        records.append(record)
    return records, warnings, counts


@exit_on_data_error()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.import_meqsum", description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="MeQSum.csv")
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    parser.add_argument("--deidentify", action="store_true", help="mask identifiers (data/deid.py)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)

    refuse_to_overwrite([args.out], args.force)
    records, warnings, counts = convert(args.input, args.deidentify)
    if not records:
        raise DataError(f"{args.input}: no usable rows")
    write_imported(args.out, records, warnings, FORMAT, "meqsum", "")
    if args.deidentify:
        print(f"de-identified: {format_counts(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

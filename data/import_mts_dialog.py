"""Import MTS-Dialog (Ben Abacha et al., EACL 2023) CSVs into our JSON records.

    python -m data.import_mts_dialog MTS-Dialog-TrainingSet.csv [more.csv ...] --out mts.json
        [--deidentify] [--force]

Each CSV row `ID, section_header, section_text, dialogue` becomes
`{"id": "<csv file stem>:<ID>", "section_header": ..., "dialogue": ..., "summary": <section_text>}`
(ids restart at 0 in each published file, so the file stem keeps them unique). Train on it with
`--format mts-dialog` (source `dialogue`, target `summary`). Line endings become "\\n" and outer
whitespace is stripped. A row with an empty dialogue or section text is skipped with a warning;
a missing column, a file that is not UTF-8 CSV, or an existing --out (without --force) stops
with exit status 2. Duplicate dialogue/summary pairs are reported, not dropped (`data.split`
drops them). `--deidentify` masks identifiers in the dialogue and summary (see data/deid.py).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from data.deid import format_counts, scrub_record
from data.errors import DataError, exit_on_data_error, where
from data.records import RecordFormat, read_csv_rows, refuse_to_overwrite, write_imported

COLUMNS = ("ID", "section_header", "section_text", "dialogue")
TEXT_FIELDS = ("dialogue", "summary")  # what --deidentify scrubs
FORMAT = RecordFormat.preset("mts-dialog")


def convert(paths: list[Path], deidentify: bool = False) -> tuple[list[dict], list[str], Counter]:
    """Records from MTS-Dialog CSVs, warnings for skipped rows, and de-identification counts."""
    records, warnings, counts = [], [], Counter()
    for path in paths:
        for index, (line, row) in enumerate(read_csv_rows(path, COLUMNS)):
            empty = [c for c in ("dialogue", "section_text") if not row[c]]
            if empty:
                warnings.append(f"warning: {where(path, index, empty[0], line, kind='row')}: empty (row skipped)")
                continue
            record = {
                "id": f"{path.stem}:{row['ID'] or index}",
                "section_header": row["section_header"],
                "dialogue": row["dialogue"],
                "summary": row["section_text"],
            }
            if deidentify:
                record, found = scrub_record(record, TEXT_FIELDS)
                counts += found
            records.append(record)
    return records, warnings, counts


@exit_on_data_error()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.import_mts_dialog", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="MTS-Dialog CSV files")
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    parser.add_argument("--deidentify", action="store_true", help="mask identifiers (data/deid.py)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)

    refuse_to_overwrite([args.out], args.force)
    records, warnings, counts = convert(args.inputs, args.deidentify)
    if not records:
        raise DataError(f"{', '.join(map(str, args.inputs))}: no usable rows")
    write_imported(args.out, records, warnings, FORMAT, "mts-dialog", f"from {len(args.inputs)} file(s) ")
    if args.deidentify:
        print(f"de-identified: {format_counts(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Split one records file into train/val/test, 80/10/10, without leakage.

    python -m data.split ALL.json --out DIR [--seed 0] [--force] [--format ... --source-fields ...]

writes DIR/train.json, DIR/val.json and DIR/test.json as JSON arrays. Bad records are skipped
with a warning (see data/records.py); records with the same source and target as an earlier one
are dropped first, so one record cannot land in two splits. The split is a seeded shuffle: the
same file and seed give the same split. Within each split, records keep their input order.
Records without an id get the id they were known by (`"{file stem}:{index}"`), so every output
record can be traced back. Existing output files are never overwritten without --force.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from data.errors import DataError, exit_on_data_error
from data.records import (Example, RecordFormat, add_format_args, dedupe, format_from_args, load_records,
                          refuse_to_overwrite, write_json)

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def split_sizes(n: int, fractions: dict[str, float] = FRACTIONS) -> dict[str, int]:
    """Records per split: every split but the first gets round(n * fraction), at least 1; the
    first takes the rest."""
    names = list(fractions)
    if n < len(names):
        raise DataError(f"need at least {len(names)} distinct records to split into "
                        f"{'/'.join(names)}, got {n}")
    sizes = {name: max(1, int(n * fractions[name] + 0.5)) for name in names[1:]}
    sizes = {names[0]: n - sum(sizes.values()), **sizes}
    if sizes[names[0]] < 1:
        raise DataError(f"{n} records are too few for the split {fractions}")
    return sizes


def split_examples(examples: list[Example], seed: int,
                   fractions: dict[str, float] = FRACTIONS) -> dict[str, list[Example]]:
    """Shuffle with `seed` and cut into splits; each split keeps the input order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    splits, start = {}, 0
    for name, size in split_sizes(len(examples), fractions).items():
        splits[name] = [examples[i] for i in sorted(order[start:start + size])]
        start += size
    return splits


def with_id(example: Example, fmt: RecordFormat) -> dict:
    if example.record.get(fmt.id_field) not in (None, ""):
        return example.record
    return {fmt.id_field: example.id, **example.record}


@exit_on_data_error()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.split", description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="JSON array or JSON Lines file of records")
    parser.add_argument("--out", required=True, type=Path, help="directory for train/val/test.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite existing split files")
    add_format_args(parser)
    args = parser.parse_args(argv)
    fmt = format_from_args(args)

    outputs = {name: args.out / f"{name}.json" for name in FRACTIONS}
    if any(args.input.resolve() == p.resolve() for p in outputs.values()):
        raise DataError(f"{args.input}: would be overwritten by the split; choose another --out")
    refuse_to_overwrite(outputs.values(), args.force)

    loaded = load_records(args.input, fmt)
    for line in loaded.warnings():
        print(line, file=sys.stderr)
    unique, dropped = dedupe(loaded.examples)
    splits = split_examples(unique, args.seed)
    for name, examples in splits.items():
        write_json(outputs[name], [with_id(ex, fmt) for ex in examples])

    counts = ", ".join(f"{len(splits[n])} {n}" for n in splits)
    notes = [f"{len(dropped)} duplicate{'s' * (len(dropped) != 1)} dropped"] if dropped else []
    notes += [f"{len(loaded.skipped)} bad record{'s' * (len(loaded.skipped) != 1)} skipped"] if loaded.skipped else []
    print(f"wrote {counts} to {args.out} (seed {args.seed}; {fmt.describe()})"
          + (f"; {', '.join(notes)}" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

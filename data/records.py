"""Records: the JSON input format, its validation, and the source/target text built from it.

Input is a JSON array of objects, or JSON Lines (one object per line; blank lines are ignored).
A record holds text fields; a `RecordFormat` says which are the source, which is the target and
how the source text is built:

- default (`RecordFormat.summarisation()`): source fields `patient_history`, `diagnosis`,
  `treatment_plan`, target `summary`. For each non-empty source field, in the listed order,
  `"{Label}: {value}"`, joined by one space; Label is the field name with `_` as spaces and the
  first letter capitalised: `Patient history: ... Diagnosis: ... Treatment plan: ...`.
- a template such as `"question: {question} context: {context}"` replaces that rule; the fields
  it names are the source fields (an absent or null field renders as "").
- presets: `summarisation`, `qa` (question + context -> answer), `mts-dialog` (dialogue ->
  summary, as written by `data.import_mts_dialog`), `meqsum` (question -> summary, as written by
  `data.import_meqsum`).
Other keys (`id`, `specialty`, `expansions`, ...) are carried along untouched in
`Example.record`. A record's id is its `id` field (a string or integer) if present, else
`"{file stem}:{index}"`. Values are stripped of surrounding whitespace.

What stops and what skips. Problems with the file as a whole raise `DataError` (CLIs print
`error: ...` and exit 2):
  file missing or unreadable, not UTF-8 (with the line of the bad byte), empty, invalid JSON
  (with line and column), top level not an array or JSON Lines, and no usable record left.
Problems with one record skip that record with a warning and a count (`LoadResult.skipped`), or
stop at the first one with `on_bad="stop"`:
  record is not an object; target missing, null or empty; source fields all absent or all empty
  (the message lists the fields looked for and the keys the record has); a non-string value in a
  source or target field; an id that is neither a string nor an integer.
Reported, records kept: duplicates (same source and target after collapsing whitespace;
`LoadResult.duplicates`), repeated ids (`LoadResult.repeated_ids`), and, across files,
records shared between splits (`find_leakage`). `data.split` drops duplicates before splitting.

Messages name the place: `data/train.json: record 17 (line 230): field 'summary': empty target`.
Record indexes count from 0, line numbers from 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from data.errors import DataError, where
from models.atomic import atomic_write_text

DEFAULT_SOURCE_FIELDS = ("patient_history", "diagnosis", "treatment_plan")


class RecordError(DataError):
    """One record that cannot become an example; `load_records` adds the file and index."""

    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{where(field=field)}: {problem}" if field else problem)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def template_fields(template: str) -> tuple[str, ...]:
    """The field names a template uses, in order of first use; rejects positional `{}`."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"template {template!r}: {e}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or any(c in name for c in ".[]"):
            raise DataError(f"template {template!r}: use field names like {{question}}, not {{{name}}}")
        if name not in names:
            names.append(name)
    if not names:
        raise DataError(f"template {template!r} names no fields")
    return tuple(names)


def _label(name: str) -> str:
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class RecordFormat:
    # None: the template's fields if a template is given, else DEFAULT_SOURCE_FIELDS.
    source_fields: tuple[str, ...] | None = None
    target_field: str = "summary"
    template: str | None = None
    id_field: str = "id"

    def __post_init__(self):
        fields = tuple(self.source_fields) if self.source_fields is not None else None
        if self.template is not None:
            named = template_fields(self.template)
            if fields is not None and set(fields) != set(named):
                raise DataError(
                    f"source fields {list(fields)} differ from the fields the template names "
                    f"{list(named)}; give one or make them agree")
            fields = fields or named
        fields = fields if fields is not None else DEFAULT_SOURCE_FIELDS
        if not fields or any(not f for f in fields):
            raise DataError(f"source fields {list(fields)}: need at least one non-empty name")
        if self.target_field in fields:
            raise DataError(f"field {self.target_field!r} is both a source field and the target")
        object.__setattr__(self, "source_fields", fields)

    @classmethod
    def summarisation(cls) -> RecordFormat:
        return cls()

    @classmethod
    def qa(cls) -> RecordFormat:
        return cls(template="question: {question} context: {context}", target_field="answer")

    @classmethod
    def preset(cls, name: str) -> RecordFormat:
        if name not in PRESETS:
            raise DataError(f"unknown record format {name!r}; choose from {', '.join(PRESETS)}")
        return PRESETS[name]

    def describe(self) -> str:
        how = f"template {self.template!r}" if self.template else "labelled fields"
        return f"source {list(self.source_fields)} ({how}) -> target {self.target_field!r}"

    def source_of(self, record: dict) -> str:
        """The source text of one record (raises RecordError naming the field at fault)."""
        if all(record.get(f) is None for f in self.source_fields):
            raise RecordError(None, self._absent_sources_message(record))
        values = {}
        for name in self.source_fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise RecordError(name, f"expected a string, got {json_type(value)}")
            values[name] = (value or "").strip()
        if not any(values.values()):
            raise RecordError(None, f"source fields {list(self.source_fields)} are all empty")
        if self.template is not None:
            return self.template.format_map(values).strip()
        return " ".join(f"{_label(name)}: {text}" for name, text in values.items() if text)

    def target_of(self, record: dict) -> str:
        value = record.get(self.target_field)
        if value is None:
            raise RecordError(self.target_field, "missing target")
        if not isinstance(value, str):
            raise RecordError(self.target_field, f"expected a string, got {json_type(value)}")
        if not value.strip():
            raise RecordError(self.target_field, "empty target")
        return value.strip()

    def id_of(self, record: dict, default: str) -> str:
        value = record.get(self.id_field)
        if value is None or value == "":
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise RecordError(self.id_field, f"expected a string or integer id, got {json_type(value)}")
        return str(value).strip() or default

    def to_example(self, record: Any, default_id: str) -> Example:
        if not isinstance(record, dict):
            raise RecordError(None, f"expected a JSON object, got {json_type(record)}")
        return Example(self.id_of(record, default_id), self.source_of(record), self.target_of(record), record)

    def _absent_sources_message(self, record: dict) -> str:
        keys = ", ".join(repr(k) for k in record) or "none"
        hint = ""
        fits = [name for name, fmt in PRESETS.items() if fmt != self and _fits(fmt, record)]
        if fits:
            hint = f" (the record fits --format {fits[0]})"
        return (f"none of the source fields {list(self.source_fields)} is present; the record has "
                f"keys {keys}; choose the source with --source-fields or --template{hint}")


def _fits(fmt: RecordFormat, record: dict) -> bool:
    return fmt.target_field in record and any(f in record for f in fmt.source_fields)


PRESETS: dict[str, RecordFormat] = {
    "summarisation": RecordFormat.summarisation(),
    "qa": RecordFormat.qa(),
    "mts-dialog": RecordFormat(template="{dialogue}", target_field="summary"),
    "meqsum": RecordFormat(template="{question}", target_field="summary"),
}


@dataclass(frozen=True)
class Example:
    id: str
    source: str
    target: str
    record: dict  # the raw record: evaluation needs extra keys such as `expansions`


@dataclass(frozen=True)
class Issue:
    """A record skipped on load, and why."""

    path: str
    index: int
    field: str | None
    problem: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{where(self.path, self.index, self.field, self.line)}: {self.problem}"


@dataclass(frozen=True)
class Duplicate:
    example: Example
    first: Example  # the earlier example with the same source and target

    def __str__(self) -> str:
        return f"record {self.example.id!r} repeats record {self.first.id!r} (same source and target)"


@dataclass
class LoadResult:
    path: Path
    examples: list[Example]
    skipped: list[Issue] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    repeated_ids: list[str] = field(default_factory=list)
    total: int = 0  # records in the file, skipped ones included

    def warnings(self, limit: int = 10) -> list[str]:
        """Human-readable warning lines (at most `limit` of each kind), for CLIs to print."""
        lines = [f"warning: {issue} (record skipped)" for issue in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"warning: ... and {len(self.skipped) - limit} more skipped records")
        if self.skipped:
            lines.append(f"warning: {self.path}: skipped {len(self.skipped)} of {self.total} records")
        lines += [f"warning: {self.path}: {dup}" for dup in self.duplicates[:limit]]
        if len(self.duplicates) > limit:
            lines.append(f"warning: {self.path}: {len(self.duplicates)} duplicate records in all")
        if self.repeated_ids:
            shown = ", ".join(repr(i) for i in self.repeated_ids[:limit])
            lines.append(f"warning: {self.path}: ids used by more than one record: {shown}"
                         + (" ..." if len(self.repeated_ids) > limit else ""))
        return lines


# ---------------------------------------------------------------------------------- reading


def read_text(path: str | Path) -> str:
    """A file's text, decoded as UTF-8 (a leading BOM is dropped), or a DataError saying why not."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "save the file as UTF-8") from None


def read_json_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line, value) for each record of a JSON array or JSON Lines file, file-level checks done."""
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: file is empty")
    if stripped.startswith("["):
        return _read_array(path, text)
    return _read_lines(path, text)


def _read_array(path, text: str) -> list[tuple[int, Any]]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    # Walk the array again to learn where each record starts, so messages can give its line.
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos, line, out = text.index("[") + 1, 1 + text.count("\n", 0, text.index("[")), []
    for value in values:
        start = skip.match(text, pos).end()
        line += text.count("\n", pos, start)
        _, end = decoder.raw_decode(text, start)
        out.append((line, value))
        line += text.count("\n", start, end)
        pos = end
    return out


def _read_lines(path, text: str) -> list[tuple[int, Any]]:
    out = []
    # Split on "\n" only: JSON strings may hold U+2028 and friends, which splitlines() splits on.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            out.append((number, json.loads(raw)))
        except json.JSONDecodeError as e:
            if not out:
                _reject_single_document(path, text)
            raise DataError(f"{path}: invalid JSON at line {number}, column {e.colno}: {e.msg}") from None
    return out


def _reject_single_document(path, text: str) -> None:
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    raise DataError(f"{path}: expected a JSON array of records or JSON Lines (one record per line), "
                    f"found a single JSON {json_type(whole)} spanning several lines")


def content_key(example: Example) -> tuple[str, str]:
    """What makes two examples the same: source and target, whitespace runs collapsed."""
    return " ".join(example.source.split()), " ".join(example.target.split())


def dedupe(examples: Iterable[Example]) -> tuple[list[Example], list[Duplicate]]:
    """The first example of each (source, target), and the later copies that were dropped."""
    first: dict[tuple[str, str], Example] = {}
    kept, dropped = [], []
    for ex in examples:
        key = content_key(ex)
        if key in first:
            dropped.append(Duplicate(ex, first[key]))
        else:
            first[key] = ex
            kept.append(ex)
    return kept, dropped


def load_records(
    path: str | Path,
    fmt: RecordFormat | None = None,
    on_bad: Literal["skip", "stop"] = "skip",
) -> LoadResult:
    """Read and validate a records file; see the module docstring for what skips and what stops."""
    if on_bad not in ("skip", "stop"):
        raise ValueError(f"on_bad must be 'skip' or 'stop', not {on_bad!r}")
    fmt = fmt or RecordFormat()
    path = Path(path)
    values = read_json_records(path)
    if not values:
        raise DataError(f"{path}: no records")
    examples, skipped = [], []
    for index, (line, value) in enumerate(values):
        try:
            examples.append(fmt.to_example(value, default_id=f"{path.stem}:{index}"))
        except RecordError as e:
            issue = Issue(str(path), index, e.field, e.problem, line)
            if on_bad == "stop":
                raise DataError(str(issue)) from None
            skipped.append(issue)
    if not examples:
        raise DataError(f"{path}: no usable records: all {len(values)} skipped; first: "
                        f"{where(index=skipped[0].index, field=skipped[0].field, line=skipped[0].line)}: "
                        f"{skipped[0].problem}")
    counts = Counter(ex.id for ex in examples)
    return LoadResult(
        path=path,
        examples=examples,
        skipped=skipped,
        duplicates=dedupe(examples)[1],
        repeated_ids=[i for i, n in counts.items() if n > 1],
        total=len(values),
    )


@dataclass(frozen=True)
class Leak:
    """One (source, target) found in more than one split: (split name, example id) pairs."""

    places: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return "same source and target in " + ", ".join(f"{split} ({i!r})" for split, i in self.places)


def find_leakage(splits: dict[str, list[Example]]) -> list[Leak]:
    """Records whose (source, target) appear in more than one split, in order of first sight."""
    places: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for name, examples in splits.items():
        for ex in examples:
            places.setdefault(content_key(ex), []).append((name, ex.id))
    return [Leak(tuple(p)) for p in places.values() if len({split for split, _ in p}) > 1]


def read_csv_rows(path: str | Path, columns: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    """(line, row) for each data row of a UTF-8 CSV with a header, for importers.

    Checks that `columns` exist; values get "\\r\\n" turned into "\\n" and outer whitespace stripped;
    `line` is where the row starts in the file.
    """
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    # newline="": csv sees the raw line endings, as with open(newline=""); quoted fields span lines.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                            f"the header has {', '.join(map(repr, header))}")
        rows, start = [], reader.line_num + 1
        for row in reader:
            cleaned = {k: (v or "").replace("\r\n", "\n").replace("\r", "\n").strip()
                       for k, v in row.items() if k is not None}
            rows.append((start, cleaned))
            start = reader.line_num + 1
        return rows
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: bad CSV: {e}") from None


# ---------------------------------------------------------------------------------- writing


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: UTF-8, indent 2, non-ASCII kept, trailing newline."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def refuse_to_overwrite(paths: Iterable[str | Path], force: bool) -> None:
    """DataError naming the paths that exist, unless `force`; nothing is written either way."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise DataError(f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; "
                        "pass --force to overwrite")


# ---------------------------------------------------------------------------------- CLI glue


def add_format_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a RecordFormat, shared by every CLI that reads records."""
    group = parser.add_argument_group("record format")
    group.add_argument("--format", choices=list(PRESETS), default="summarisation",
                       help="preset source/target fields (default: summarisation)")
    group.add_argument("--source-fields", help="comma-separated source fields, e.g. question,context")
    group.add_argument("--target-field", help="the field holding the target text")
    group.add_argument("--template", help="source template, e.g. 'question: {question} context: {context}'")
    group.add_argument("--id-field", help="the field holding the record id (default: id)")


def format_from_args(args: argparse.Namespace) -> RecordFormat:
    """The preset named by --format, with any field flags overriding it."""
    base = RecordFormat.preset(args.format)
    sources = tuple(f.strip() for f in args.source_fields.split(",") if f.strip()) if args.source_fields else None
    template = args.template
    if template is None and sources is None:
        sources, template = base.source_fields, base.template
    return RecordFormat(
        source_fields=sources,
        target_field=args.target_field or base.target_field,
        template=template,  # --source-fields alone drops the preset's template
        id_field=args.id_field or base.id_field,
    )


def write_imported(out: Path, records: list[dict], warnings: list[str], fmt: RecordFormat, format_name: str,
                   what: str) -> None:
    """The end of every importer: report duplicates and skipped rows, write `out`, say how to train."""
    duplicates = dedupe(fmt.to_example(r, default_id=r["id"]) for r in records)[1]
    for line in warnings + [f"warning: {out}: {dup}" for dup in duplicates]:
        print(line, file=sys.stderr)
    write_json(out, records)
    print(f"wrote {len(records)} records {what}to {out}; train with --format {format_name}")

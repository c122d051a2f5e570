"""Summarise medical records with a trained model (deployment).

    python summarize.py --model runs/medsum/best record.json
    cat records.jsonl | python summarize.py --model DIR --out summaries.jsonl

Input: one JSON record, a JSON array of records, or JSON Lines, from a file or stdin (`-`).
The source text is built exactly as in training (same --format flags). Prints one summary per
record, or writes JSON Lines {id, summary} with --out.
"""

from __future__ import annotations

import argparse
import json
import sys

from data.errors import DataError, where
from data.records import RecordError, add_format_args, format_from_args, json_type
from engine.allocator import keep_freed_memory
from engine.inference import DTYPES, load_for_inference, summarize_ids
from engine.setup import add_weight_packs_flag, apply_weight_packs_flag, pick_device
from models.atomic import atomic_write_text
from models.errors import ModelError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", default="-", help="records file, or - for stdin (default)")
    p.add_argument("--model", default="runs/medsum/best", help="trained model dir, run dir or hub id")
    p.add_argument("--out", help="write JSON Lines {id, summary} here instead of printing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-source-len", type=int, default=512)
    p.add_argument("--num-beams", type=int, help="default: the checkpoint's generation settings")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--device", default="auto")
    add_weight_packs_flag(p)
    add_format_args(p)
    return p.parse_args(argv)


def read_records(name: str, text: str) -> list:
    """A single object, an array, or JSON Lines."""
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        pass
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{name}: invalid JSON at line {number}, column {e.colno}: {e.msg}") from None
    if not records:
        raise DataError(f"{name}: no records")
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # steps re-allocate the same big buffers: keep them (engine/allocator.py)
    apply_weight_packs_flag(args)
    try:
        name = "<stdin>" if args.input == "-" else args.input
        try:
            text = sys.stdin.read() if args.input == "-" else open(args.input, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{name}: cannot read: {exc}") from None
        fmt = format_from_args(args)
        records = read_records(name, text)
        sources, ids = [], []
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{where(name, index)}: expected an object, found {json_type(record)}")
            try:
                sources.append(fmt.source_of(record))
            except RecordError as exc:
                raise DataError(f"{where(name, index, exc.field)}: {exc.problem}") from None
            ids.append(fmt.id_of(record, f"{index}"))

        device = pick_device(args.device)
        model, tokenizer, _ = load_for_inference(args.model, device, args.dtype)
        overrides = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
                     if v is not None}
        summaries = summarize_ids(model, tokenizer, tokenizer.encode_batch(sources, args.max_source_len),
                                  args.batch_size, device, progress=args.out is not None, **overrides)
    except (DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps({"id": i, "summary": s}, ensure_ascii=False) + "\n"
                                            for i, s in zip(ids, summaries)))
    else:
        for summary in summaries:
            print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

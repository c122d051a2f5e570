"""Examples -> token ids (tokenised once, cached) -> length-grouped, dynamically padded batches.

Labels are the target ids `<s> ... </s>` padded with -100 (ignored by the loss); decoder inputs
are the labels shifted right behind `decoder_start_token_id`, as BART was trained. Batches are
padded only to their own longest member, and the sampler puts similar lengths together so little
of each batch is padding.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.bart import shift_right

IGNORE_INDEX = -100


@dataclass
class TokenizedSplit:
    """Token ids of one split, in record order, and how many sources/targets were truncated."""

    sources: list[list[int]]
    targets: list[list[int]]
    sources_truncated: int = 0
    targets_truncated: int = 0

    def __len__(self) -> int:
        return len(self.sources)

    def lengths(self) -> list[int]:
        """Per-example cost used for grouping: source plus target tokens."""
        return [len(s) + len(t) for s, t in zip(self.sources, self.targets)]


def tokenize(sources: Sequence[str], targets: Sequence[str], tokenizer, max_source_len: int,
             max_target_len: int) -> TokenizedSplit:
    source_ids, cut_sources = tokenizer.encode_batch_with_stats(sources, max_source_len)
    target_ids, cut_targets = tokenizer.encode_batch_with_stats(targets, max_target_len)
    return TokenizedSplit(source_ids, target_ids, cut_sources, cut_targets)


def tokenize_cached(sources: Sequence[str], targets: Sequence[str], tokenizer, max_source_len: int,
                    max_target_len: int, cache_dir: str | Path | None, content_key: str) -> TokenizedSplit:
    """`tokenize`, reusing the ids from an earlier run with the same tokenizer, data and limits.

    `content_key` identifies the data (e.g. a hash of the file's bytes and the record format); the
    tokenizer's fingerprint and the length limits complete the key. The cache is plain numpy
    arrays (no pickle), written atomically.
    """
    if cache_dir is None:
        return tokenize(sources, targets, tokenizer, max_source_len, max_target_len)
    key = hashlib.sha256(json.dumps(
        [content_key, tokenizer.fingerprint, max_source_len, max_target_len]).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"tokens-{key}.npz"
    if path.exists():
        try:
            return _read_cache(path)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt, never trusted
    split = tokenize(sources, targets, tokenizer, max_source_len, max_target_len)
    _write_cache(path, split)
    return split


def _flatten(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    ids = flat.tolist()
    return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _write_cache(path: Path, split: TokenizedSplit) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    source_flat, source_offsets = _flatten(split.sources)
    target_flat, target_offsets = _flatten(split.targets)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, source_flat=source_flat, source_offsets=source_offsets, target_flat=target_flat,
                     target_offsets=target_offsets,
                     truncated=np.array([split.sources_truncated, split.targets_truncated]))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> TokenizedSplit:
    with np.load(path, allow_pickle=False) as arrays:
        truncated = arrays["truncated"].tolist()
        return TokenizedSplit(_unflatten(arrays["source_flat"], arrays["source_offsets"]),
                              _unflatten(arrays["target_flat"], arrays["target_offsets"]),
                              truncated[0], truncated[1])


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    decoder_input_ids: Tensor
    labels: Tensor
    indices: list[int]  # positions of these examples in their split

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.decoder_input_ids),
                     move(self.labels), self.indices)


def _pad(rows: list[list[int]], value: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pad_sources(sources: Sequence[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), right-padded to the longest source given."""
    return _pad(list(sources), pad_token_id), _pad([[1] * len(s) for s in sources], 0)


def collate(split: TokenizedSplit, indices: Sequence[int], pad_token_id: int,
            decoder_start_token_id: int) -> Batch:
    """Pad the chosen examples to their own longest source and target (right padding)."""
    input_ids, attention_mask = pad_sources([split.sources[i] for i in indices], pad_token_id)
    labels = _pad([split.targets[i] for i in indices], IGNORE_INDEX)
    return Batch(input_ids, attention_mask, shift_right(labels, pad_token_id, decoder_start_token_id), labels,
                 list(indices))


class LengthGroupedSampler:
    """Batches of similar length, in an order that is random but fixed by (seed, epoch).

    Each epoch: shuffle all examples, cut the order into mega-batches of `batch_size *
    mega_batch_factor`, sort each mega-batch by length and cut it into batches, then shuffle the
    batches. Randomness comes from the shuffle across mega-batches; padding stays low because each
    batch is drawn from a sorted run. Without `shuffle` (evaluation) all examples are sorted by
    length, longest first, so an out-of-memory batch shows up at once.

    With several processes each global batch of `batch_size * num_replicas` examples is dealt out
    to the ranks, so N ranks at batch size B see exactly what one process sees at batch size N*B.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 mega_batch_factor: int = 50, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.mega_batch_factor = mega_batch_factor
        self.num_replicas = num_replicas
        self.rank = rank

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full + (rest >= self.num_replicas)  # a last batch too small to give every rank one is dropped

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, as lists of example positions."""
        size = self.global_batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            global_batches = [order[i:i + size] for i in range(0, len(order), size)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))
            mega = size * self.mega_batch_factor
            global_batches = []
            for start in range(0, len(order), mega):
                chunk = order[start:start + mega]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                global_batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
            global_batches = [global_batches[i] for i in rng.permutation(len(global_batches))]
        # Every rank must take the same number of steps, so a global batch that cannot give each
        # rank an example (only ever the last, short one) is dropped on all of them.
        return [batch[self.rank::self.num_replicas].tolist() for batch in global_batches
                if len(batch) >= self.num_replicas]


def padding_fraction(split: TokenizedSplit, batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions among all source and target positions of the batches."""
    real = padded = 0
    for batch in batches:
        sources = [len(split.sources[i]) for i in batch]
        targets = [len(split.targets[i]) for i in batch]
        real += sum(sources) + sum(targets)
        padded += len(batch) * (max(sources) + max(targets))
    return 1 - real / padded if padded else 0.0


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Plain shuffled batches, the baseline the grouped sampler is measured against."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]

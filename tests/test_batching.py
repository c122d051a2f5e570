"""Tokenising once, padding, label shifting and the length-grouped sampler."""

import csv
from pathlib import Path

import pytest

from data.batching import (IGNORE_INDEX, LengthGroupedSampler, TokenizedSplit, collate, padding_fraction,
                           random_batches, tokenize, tokenize_cached)
from models.tokenizer import train_bart_tokenizer

MTS_DIALOG = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mts-dialog" / \
    "MTS-Dialog-TrainingSet.csv"

CORPUS = [
    "Pt c/o SOB and CP x 2 days. BP 150/90, HR 98.",
    "Patient presented with shortness of breath and chest pain for two days.",
    "DX: CAD. Rx: ASA 81 mg PO daily, NTG SL PRN.",
    "Diagnosis: coronary artery disease. Treatment: aspirin, nitroglycerin.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bart_tokenizer(CORPUS, vocab_size=400, min_frequency=1)


def test_collate_pads_labels_with_ignore_index_and_shifts_decoder_inputs(tokenizer):
    split = tokenize(["short", "a much longer source text here"], ["one two three four", "x"], tokenizer, 64, 64)
    batch = collate(split, [0, 1], tokenizer.pad_token_id, decoder_start_token_id=2)
    long_target, short_target = split.targets
    assert batch.labels[0].tolist() == long_target
    assert batch.labels[1].tolist() == short_target + [IGNORE_INDEX] * (len(long_target) - len(short_target))
    # Decoder inputs: start token, then the labels without their last, pad where labels are ignored.
    assert batch.decoder_input_ids[0].tolist() == [2] + long_target[:-1]
    assert IGNORE_INDEX not in batch.decoder_input_ids.tolist()[1]
    assert batch.decoder_input_ids[1, len(short_target) + 1:].eq(tokenizer.pad_token_id).all()
    # Sources padded to the longest source in this batch only, with a matching mask.
    assert batch.input_ids.shape[1] == max(len(s) for s in split.sources)
    assert batch.attention_mask.sum(1).tolist() == [len(s) for s in split.sources]
    assert batch.input_ids[batch.attention_mask == 0].eq(tokenizer.pad_token_id).all()
    assert batch.num_target_tokens == len(long_target) + len(short_target)


def test_truncation_is_counted_and_keeps_eos_last(tokenizer):
    sources = [CORPUS[0], "ok"]
    split = tokenize(sources, ["short", CORPUS[1]], tokenizer, max_source_len=6, max_target_len=5)
    assert (split.sources_truncated, split.targets_truncated) == (1, 1)
    assert len(split.sources[0]) == 6 and split.sources[0][-1] == tokenizer.eos_token_id
    assert split.sources[1] == tokenizer.encode("ok")


def test_tokenization_is_cached_and_keyed_on_tokenizer_and_content(tokenizer, tmp_path, monkeypatch):
    first = tokenize_cached(CORPUS[:4], CORPUS[4:8], tokenizer, 32, 32, tmp_path, content_key="file-a")
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again despite a cache hit")

    monkeypatch.setattr(type(tokenizer), "encode_batch_with_stats", fail)
    again = tokenize_cached(CORPUS[:4], CORPUS[4:8], tokenizer, 32, 32, tmp_path, content_key="file-a")
    assert (again.sources, again.targets) == (first.sources, first.targets)
    monkeypatch.undo()
    # Other content, other limits, or another tokenizer: a new entry, never the old ids.
    tokenize_cached(CORPUS[:4], CORPUS[4:8], tokenizer, 32, 32, tmp_path, content_key="file-b")
    tokenize_cached(CORPUS[:4], CORPUS[4:8], tokenizer, 16, 32, tmp_path, content_key="file-a")
    other = train_bart_tokenizer(CORPUS, vocab_size=300, min_frequency=1)
    tokenize_cached(CORPUS[:4], CORPUS[4:8], other, 32, 32, tmp_path, content_key="file-a")
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 4


def test_damaged_cache_is_rebuilt(tokenizer, tmp_path):
    first = tokenize_cached(CORPUS[:3], CORPUS[3:6], tokenizer, 32, 32, tmp_path, content_key="k")
    [path] = tmp_path.glob("tokens-*.npz")
    path.write_bytes(b"not an npz file")
    again = tokenize_cached(CORPUS[:3], CORPUS[3:6], tokenizer, 32, 32, tmp_path, content_key="k")
    assert again.sources == first.sources


def _split_of_lengths(lengths):
    return TokenizedSplit([[5] * n for n in lengths], [[6] * (n // 2 + 1) for n in lengths])


def test_sampler_is_deterministic_per_seed_and_epoch_and_covers_every_example_once():
    lengths = [(i * 37) % 101 + 1 for i in range(250)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_factor=4)
    epoch0 = sampler.epoch_batches(0)
    assert epoch0 == LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_factor=4).epoch_batches(0)
    assert epoch0 != sampler.epoch_batches(1)
    assert epoch0 != LengthGroupedSampler(lengths, batch_size=8, seed=4, mega_batch_factor=4).epoch_batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(250))
    assert len(epoch0) == len(sampler) == 32


def test_ranks_together_see_exactly_the_single_process_global_batches():
    lengths = [(i * 13) % 50 + 1 for i in range(64)]
    single = LengthGroupedSampler(lengths, batch_size=8, seed=0).epoch_batches(2)
    ranks = [LengthGroupedSampler(lengths, batch_size=4, seed=0, num_replicas=2, rank=r).epoch_batches(2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, global_batch in enumerate(single):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(global_batch)


def test_evaluation_order_is_longest_first_without_shuffling():
    lengths = [3, 9, 1, 7, 5]
    batches = LengthGroupedSampler(lengths, batch_size=2, shuffle=False).epoch_batches(0)
    assert batches == [[1, 3], [4, 0], [2]]


def test_grouping_pads_less_than_random_batches():
    lengths = [(i * 37) % 200 + 5 for i in range(400)]
    split = _split_of_lengths(lengths)
    grouped = padding_fraction(split, LengthGroupedSampler(split.lengths(), 16, seed=0).epoch_batches(0))
    shuffled = padding_fraction(split, random_batches(len(lengths), 16, seed=0))
    assert grouped < shuffled / 3


@pytest.mark.skipif(not MTS_DIALOG.exists(), reason="../shared/datasets is not beside the project")
def test_grouping_pads_less_than_random_batches_on_mts_dialog():
    with open(MTS_DIALOG, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    sources, targets = [r["dialogue"] for r in rows], [r["section_text"] for r in rows]
    tokenizer = train_bart_tokenizer(sources + targets, vocab_size=2000)
    split = tokenize(sources, targets, tokenizer, max_source_len=1024, max_target_len=512)
    grouped = padding_fraction(split, LengthGroupedSampler(split.lengths(), 8, seed=0).epoch_batches(0))
    shuffled = padding_fraction(split, random_batches(len(split), 8, seed=0))
    print(f"MTS-Dialog padding at batch size 8: grouped {grouped:.1%}, random {shuffled:.1%}")
    assert grouped < shuffled / 2

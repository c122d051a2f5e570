"""The same random weights in Transformers' BART and ours, and the same batches for both.

Transformers builds the model from a fixed seed; ours is built from the same config and then
`load_state_dict(strict=True)` from Transformers' state dict, so the two hold equal values in
separate tensors. (Separate, not shared: if our code casts or merges its weights
in place, Transformers' side must not silently get the same treatment.)
"""

from __future__ import annotations

import torch
import transformers

from bench.shapes import Shapes
from data.batching import Batch, TokenizedSplit, collate
from models.bart import BartForConditionalGeneration
from models.config import BartConfig

SEED = 0
FIRST_ID = 4  # random ids avoid the specials <s> <pad> </s> <unk>


def hf_model(shapes: Shapes) -> transformers.BartForConditionalGeneration:
    torch.manual_seed(SEED)
    config = transformers.BartConfig(**shapes.hf_config_kwargs())
    return transformers.BartForConditionalGeneration(config)


def our_twin(theirs: transformers.BartForConditionalGeneration) -> BartForConditionalGeneration:
    # built normally (its own init, then overwritten): the constructor's tying stays the product's
    ours = BartForConditionalGeneration(BartConfig.from_hf_dict(theirs.config.to_dict()))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def synthetic_split(shapes: Shapes, n: int | None = None, seed: int = 1) -> TokenizedSplit:
    """`n` samples of exactly source_len / target_len ids, `<s> ... </s>` (no padding)."""
    n = n or shapes.batch_size
    g = torch.Generator().manual_seed(seed)

    def rows(length: int) -> list[list[int]]:
        body = torch.randint(FIRST_ID, shapes.vocab_size, (n, length - 2), generator=g).tolist()
        return [[0, *row, 2] for row in body]

    return TokenizedSplit(rows(shapes.source_len), rows(shapes.target_len))


def batch_of(split: TokenizedSplit, config: BartConfig) -> Batch:
    return collate(split, range(len(split)), config.pad_token_id, config.decoder_start_token_id)


def real_tokens(batch: Batch) -> int:
    """Unpadded source plus target tokens."""
    return int(batch.attention_mask.sum()) + batch.num_target_tokens

"""Loading a trained model for inference and summarising texts in batches (evaluate.py, summarize.py)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from data.batching import LengthGroupedSampler, pad_sources
from models.checkpoint import load_pretrained
from models.errors import ModelError
from models.generate import cast_for_inference, generate
from models.hub import resolve_model_dir
from models.tokenizer import load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_for_inference(name_or_path: str, device: torch.device, dtype: str = "fp32"):
    """(model, tokenizer, directory) with the weights frozen, as inference needs them: generation
    then keeps its prepacked decoder weights between batches (models/packed_weights.py). A
    training run directory means its `best/` checkpoint."""
    directory = resolve_model_dir(name_or_path)
    if not (directory / "config.json").exists() and (directory / "best" / "config.json").exists():
        directory = directory / "best"
    model = load_pretrained(directory, device=device)
    try:
        tokenizer = load_tokenizer(directory)
    except FileNotFoundError:
        raise ModelError(f"{directory}: has model weights but no tokenizer files "
                         "(tokenizer.json or vocab.json + merges.txt)") from None
    if dtype != "fp32":
        cast_for_inference(model, DTYPES[dtype])  # frozen, and in bf16 packed for oneDNN
    return model.requires_grad_(False).eval(), tokenizer, directory


def decode_generated(tokenizer, ids: torch.Tensor) -> list[str]:
    """Text of generated rows. Ids the tokenizer lacks (a model vocabulary larger than the
    tokenizer's, as in some checkpoints) are dropped rather than crashing the decoder."""
    rows = [[i for i in row if i < tokenizer.vocab_size] for row in ids.tolist()]
    return [text.strip() for text in tokenizer.decode_batch(rows)]


def summarize_ids(model, tokenizer, sources: list[list[int]], batch_size: int, device, progress: bool = True,
                  **generation) -> list[str]:
    """Generated summaries for every tokenised source, in their order (batched longest first)."""
    predictions: list[str | None] = [None] * len(sources)
    batches = LengthGroupedSampler([len(s) for s in sources], batch_size, shuffle=False).epoch_batches(0)
    for indices in tqdm(batches, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
        input_ids, attention_mask = pad_sources([sources[i] for i in indices], tokenizer.pad_token_id)
        ids = generate(model, input_ids.to(device), attention_mask.to(device), **generation)
        for index, text in zip(indices, decode_generated(tokenizer, ids)):
            predictions[index] = text
    return predictions

"""Shared oracle fixtures: small random Transformers BARTs and a padded batch of uneven lengths."""

import torch
import transformers

from models.bart import BartForConditionalGeneration
from models.config import BartConfig

# Small configs that differ where loaders and BART implementations go wrong.
PARITY_CONFIGS = {
    "gelu-2-3": dict(encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=2),
    "scaled-relu-1-1": dict(encoder_layers=1, decoder_layers=1, scale_embedding=True, activation_function="relu"),
    "gelu_new-3-1": dict(encoder_layers=3, decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8,
                         activation_function="gelu_new", encoder_ffn_dim=48, decoder_ffn_dim=24),
}


def hf_config(**overrides) -> transformers.BartConfig:
    base = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40)
    return transformers.BartConfig(**{**base, **overrides})


def hf_model(config: transformers.BartConfig | None = None, seed: int = 0):
    """A random Transformers BART in eval mode with a non-zero logits bias (zeros would hide a lost bias)."""
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration(config or hf_config()).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def twin_models(config: transformers.BartConfig, seed: int = 0):
    """A random Transformers model and ours holding the same weights (loaded in memory)."""
    theirs = hf_model(config, seed)
    ours = BartForConditionalGeneration(BartConfig.from_hf_dict(config.to_dict())).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def padded_batch(vocab_size: int, seed: int = 1):
    """Uneven source lengths (right padding) and uneven targets (-100 padding)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (3, 13), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([13, 8, 4]):
        attention_mask[row, length:] = 0
    input_ids[attention_mask == 0] = 1
    labels = torch.randint(3, vocab_size, (3, 9), generator=g)
    labels[1, 5:] = -100
    labels[2, 2:] = -100
    return input_ids, attention_mask, labels

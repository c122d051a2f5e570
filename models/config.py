"""BART configuration: the architecture and the generation defaults a checkpoint carries.

`BartConfig.from_hf_dict` reads a Hugging Face `config.json` (unknown keys ignored) and
`generation_config.json` (its values win, as in Transformers). `to_hf_dict` writes a config that
Transformers' `BartConfig` reads back. Presets give the shapes of the published checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ModelError

# Keys that belong in generation_config.json; they live on the config so one object travels.
GENERATION_KEYS = (
    "num_beams",
    "length_penalty",
    "min_length",
    "max_length",
    "no_repeat_ngram_size",
    "early_stopping",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "decoder_start_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass
class BartConfig:
    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    # Generation defaults (Transformers' defaults where a checkpoint says nothing).
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    num_beams: int = 1
    length_penalty: float = 1.0
    min_length: int = 0
    max_length: int = 20
    no_repeat_ngram_size: int = 0
    early_stopping: bool = False
    # Keys we do not model but must write back so the exported config.json stays what it was.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def encoder_head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    def __post_init__(self) -> None:
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise ModelError(f"d_model {self.d_model} is not divisible by {heads} attention heads")

    @classmethod
    def from_hf_dict(cls, config: dict, generation: dict | None = None, source: str = "config") -> BartConfig:
        """Build from the contents of config.json (+ generation_config.json); unknown keys are kept aside."""
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "bart" and not (model_type is None and any("Bart" in a for a in architectures)):
            raise ModelError(
                f"{source}: model_type is {model_type!r}, not 'bart'; medsum runs BART-family "
                "encoder-decoders (BART, DistilBART) only"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in config.items() if k in names}
        for k, v in (generation or {}).items():
            if k in GENERATION_KEYS:
                values[k] = v
        # Some configs write eos/forced-eos as a list; the model needs the single id.
        for k in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(values.get(k), list):
                values[k] = values[k][0] if values[k] else None
        extra = {k: v for k, v in config.items() if k not in names}
        try:
            return cls(**values, extra=extra)
        except TypeError as exc:  # a value of the wrong type for a field
            raise ModelError(f"{source}: {exc}") from None

    @classmethod
    def from_dir(cls, directory: str | Path) -> BartConfig:
        directory = Path(directory)
        config = _read_json(directory / "config.json")
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.exists() else None
        return cls.from_hf_dict(config, generation, source=str(directory / "config.json"))

    def to_hf_dict(self) -> dict:
        out = dict(self.extra)
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k != "extra" and k not in GENERATION_KEYS})
        out.update({k: getattr(self, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                   "decoder_start_token_id", "forced_eos_token_id")})
        out["model_type"] = "bart"
        out["architectures"] = ["BartForConditionalGeneration"]
        out["is_encoder_decoder"] = True
        return out

    def generation_dict(self) -> dict:
        return {k: getattr(self, k) for k in GENERATION_KEYS}

    def replace(self, **changes) -> BartConfig:
        return dataclasses.replace(self, **changes)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


# The generation settings of the summarisation checkpoints, as their hub configs state them.
_CNN_GENERATION = dict(num_beams=4, length_penalty=2.0, min_length=56, max_length=142,
                       no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0)
_XSUM_GENERATION = dict(num_beams=6, length_penalty=1.0, min_length=11, max_length=62,
                        no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0)
_LARGE = dict(d_model=1024, encoder_attention_heads=16, decoder_attention_heads=16,
              encoder_ffn_dim=4096, decoder_ffn_dim=4096)

PRESETS: dict[str, BartConfig] = {
    "distilbart-cnn-12-6": BartConfig(vocab_size=50264, encoder_layers=12, decoder_layers=6, **_LARGE, **_CNN_GENERATION),
    "distilbart-cnn-6-6": BartConfig(vocab_size=50264, encoder_layers=6, decoder_layers=6, **_LARGE, **_CNN_GENERATION),
    "distilbart-xsum-12-3": BartConfig(vocab_size=50264, encoder_layers=12, decoder_layers=3, **_LARGE, **_XSUM_GENERATION),
    "distilbart-xsum-12-1": BartConfig(vocab_size=50264, encoder_layers=12, decoder_layers=1, **_LARGE, **_XSUM_GENERATION),
    "bart-large": BartConfig(vocab_size=50265, encoder_layers=12, decoder_layers=12, **_LARGE,
                             num_beams=4, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0),
    "bart-base": BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12,
                            encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                            num_beams=4, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0),
    # Small enough to train from scratch on 2 CPU cores in minutes; vocab_size is replaced by the
    # size of the tokenizer trained for it.
    "tiny": BartConfig(vocab_size=4096, max_position_embeddings=512, d_model=256, encoder_layers=3,
                       decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=1024, decoder_ffn_dim=1024, dropout=0.1,
                       num_beams=4, max_length=256, no_repeat_ngram_size=0, forced_bos_token_id=0),
}

# The published ids of the presets, for messages that tell an offline user what to download.
HUB_IDS = {
    "distilbart-cnn-12-6": "sshleifer/distilbart-cnn-12-6",
    "distilbart-cnn-6-6": "sshleifer/distilbart-cnn-6-6",
    "distilbart-xsum-12-3": "sshleifer/distilbart-xsum-12-3",
    "distilbart-xsum-12-1": "sshleifer/distilbart-xsum-12-1",
    "bart-large": "facebook/bart-large",
    "bart-base": "facebook/bart-base",
}


def preset(name: str) -> BartConfig:
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])

"""BART's byte-level BPE tokenizer, built on the `tokenizers` library.

Same ids as Transformers' BartTokenizerFast: byte-level pre-tokenizer without a prefix space,
RoBERTa post-processor (`<s> ... </s>`), and the BART special-token layout
`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=last id.
Loads from `tokenizer.json` or from `vocab.json` + `merges.txt`; saves both forms plus the
Transformers config files, so `AutoTokenizer.from_pretrained(dir)` reads what we write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from models.atomic import atomic_write_text
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
LEADING_SPECIALS = (BOS, PAD, EOS, UNK)  # ids 0..3, in this order; <mask> takes the last id
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(len(LEADING_SPECIALS))
DEFAULT_MODEL_MAX_LENGTH = 1024  # BART's learned position table

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class TokenizerError(ValueError):
    """A tokenizer file is corrupt or breaks BART's conventions, or an argument is invalid."""


class TokenizerFilesNotFoundError(TokenizerError, FileNotFoundError):
    """Neither tokenizer.json nor vocab.json + merges.txt exist where we looked."""


def _special_token(content: str) -> AddedToken:
    # BART's <mask> swallows the space before it, so "a <mask>" predicts " word" (as in HF).
    return AddedToken(content, lstrip=content == MASK, rstrip=False, normalized=False, special=True)


def _set_bart_pipeline(tok: Tokenizer) -> None:
    """Pre-tokenizer, decoder and post-processor are fixed by BART; only vocab and merges vary."""
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # positional: (sep, cls, trim_offsets, add_prefix_space); the binding takes no keywords
    tok.post_processor = processors.RobertaProcessing((EOS, EOS_ID), (BOS, BOS_ID), True, False)


class BartTokenizer:
    """Encode text to BART ids and back. Wraps a `tokenizers.Tokenizer`; holds no other state."""

    def __init__(self, tokenizer: Tokenizer, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                 source: str = "<in memory>"):
        _check_special_ids(tokenizer, source)
        if not isinstance(model_max_length, int) or model_max_length < 2:
            raise TokenizerError(f"{source}: model_max_length must be an int >= 2, got {model_max_length!r}")
        self._tok = tokenizer
        self.model_max_length = model_max_length
        self._fingerprint = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BartTokenizer:
        return load_tokenizer(directory)

    # Special ids are fixed by the BART layout and verified on load.
    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def pad_token_id(self) -> int:
        return PAD_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_ID

    @property
    def unk_token_id(self) -> int:
        return UNK_ID

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: a cache key that changes whenever ids could."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"BartTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    # --- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`<s> ... </s>` ids; beyond max_length the text is cut and `</s>` kept last."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._tok.encode(text).ids
        return self._truncate(ids, _check_max_length(max_length))[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Unpadded id lists, one per text (Rust batch encoder, parallel across texts)."""
        return self.encode_batch_with_stats(texts, max_length)[0]

    def encode_batch_with_stats(self, texts: Sequence[str],
                                max_length: int | None = None) -> tuple[list[list[int]], int]:
        """(ids, n_truncated): n_truncated counts texts that lost tokens to max_length."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"encode_batch: item {i} is {type(text).__name__}, expected str")
        max_length = _check_max_length(max_length)
        # encode_batch_fast skips offset tracking; the ids are identical
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        batch, n_truncated = [], 0
        for encoding in encode(texts):
            ids, cut = self._truncate(encoding.ids, max_length)
            batch.append(ids)
            n_truncated += cut
        return batch, n_truncated

    def _truncate(self, ids: list[int], max_length: int | None) -> tuple[list[int], bool]:
        # Same as HF truncation=True: the text is cut to max_length - 2, then <s> ... </s> wrap it.
        if max_length is None or len(ids) <= max_length:
            return ids, False
        return ids[: max_length - 1] + [EOS_ID], True

    # --- decoding -------------------------------------------------------------------------------

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Byte-level BPE pieces, as Transformers names them ('Ġ' marks a leading space)."""
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ids. -100 (ignored label) and pad ids are dropped, even with skip_special_tokens=False."""
        return self._tok.decode(self._drop_non_text(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        if hasattr(batch, "tolist"):  # a 2-D tensor or array
            batch = batch.tolist()
        return self._tok.decode_batch([self._drop_non_text(ids) for ids in batch],
                                      skip_special_tokens=skip_special_tokens)

    def _drop_non_text(self, ids: Sequence[int]) -> list[int]:
        # Labels carry -100 where the loss ignores a position and batches carry pad: neither is
        # text, and the Rust decoder rejects negative ids outright (HF's well-known crash).
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return [i for i in map(int, ids) if i >= 0 and i != PAD_ID]

    # --- saving ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, vocab.json, merges.txt and the Transformers configs, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        serialized = self._tok.to_str()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        merges = json.loads(serialized)["model"]["merges"]
        # tokenizers >= 0.20 stores merges as pairs, older versions as "a b" strings
        merge_lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
        files = {
            VOCAB_FILE: json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False),
            MERGES_FILE: "#version: 0.2\n" + "".join(line + "\n" for line in merge_lines),
            CONFIG_FILE: json.dumps(self._transformers_config(), indent=2, ensure_ascii=False) + "\n",
            SPECIAL_TOKENS_MAP_FILE: json.dumps(self._special_tokens_map(), indent=2) + "\n",
            TOKENIZER_FILE: serialized,  # last: loaders prefer it, so it appears only once the rest exist
        }
        for name, text in files.items():
            atomic_write_text(directory / name, text)

    def _special_tokens_map(self) -> dict:
        return {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "sep_token": EOS,
                "pad_token": PAD, "cls_token": BOS, "mask_token": MASK}

    def _transformers_config(self) -> dict:
        added = self._tok.get_added_tokens_decoder()
        return {
            "tokenizer_class": "BartTokenizer",
            "model_max_length": self.model_max_length,
            "add_prefix_space": False,
            "trim_offsets": True,
            "errors": "replace",
            # the byte-level decoder is lossless; HF's cleanup would turn "a ." into "a."
            "clean_up_tokenization_spaces": False,
            **self._special_tokens_map(),
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                         "normalized": t.normalized, "single_word": t.single_word, "special": t.special}
                for i, t in sorted(added.items())
            },
        }


# --- loading --------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike) -> BartTokenizer:
    """Load from a directory (tokenizer.json preferred, else vocab.json + merges.txt) or a tokenizer.json."""
    path = Path(path)
    if path.is_file():  # a tokenizer.json itself; its config, if any, sits beside it
        return BartTokenizer(_read_tokenizer_json(path), source=str(path),
                             model_max_length=_read_model_max_length(path.parent / CONFIG_FILE))
    if not path.is_dir():
        raise TokenizerFilesNotFoundError(f"tokenizer directory {path} does not exist")
    model_max_length = _read_model_max_length(path / CONFIG_FILE)
    if (path / TOKENIZER_FILE).is_file():
        tok, source = _read_tokenizer_json(path / TOKENIZER_FILE), path / TOKENIZER_FILE
    elif (path / VOCAB_FILE).is_file() and (path / MERGES_FILE).is_file():
        tok, source = _read_vocab_and_merges(path / VOCAB_FILE, path / MERGES_FILE), path / VOCAB_FILE
    else:
        raise TokenizerFilesNotFoundError(
            f"no tokenizer in {path}: looked for {TOKENIZER_FILE}, or {VOCAB_FILE} together with {MERGES_FILE}")
    return BartTokenizer(tok, model_max_length=model_max_length, source=str(source))


def _read_tokenizer_json(file: Path) -> Tokenizer:
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got {type(spec).__name__}")
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE":
        raise TokenizerError(f"{file}: field model.type is {model_type!r}; BART needs a byte-level 'BPE' model")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space", False) or not pre.get("use_regex", True):
        raise TokenizerError(f"{file}: field pre_tokenizer must be ByteLevel with add_prefix_space false "
                             f"and use_regex true, got {json.dumps(pre)[:200]}")
    try:
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{file}: corrupt tokenizer ({e})") from e
    _set_bart_pipeline(tok)
    return tok


def _read_vocab_and_merges(vocab_file: Path, merges_file: Path) -> Tokenizer:
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_file}: not valid JSON ({e})") from e
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_file}: expected a JSON object mapping token -> int id")
    try:
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{merges_file}: not UTF-8 text ({e})") from e
    merges = []
    for n, line in enumerate(lines, start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{merges_file}, line {n}: expected two tokens separated by a space, "
                                 f"got {line!r}")
        merges.append(tuple(pair))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False)
    except Exception as e:  # e.g. a merge that names a token missing from the vocab
        raise TokenizerError(f"{merges_file}: does not fit {vocab_file.name} ({e})") from e
    tok = Tokenizer(bpe)
    _set_bart_pipeline(tok)
    # Tokens already in the vocab keep their ids; a missing <mask> is appended (HF does the same).
    tok.add_special_tokens([_special_token(t) for t in (*LEADING_SPECIALS, MASK)])
    return tok


def _read_model_max_length(config_file: Path) -> int:
    if not config_file.is_file():
        return DEFAULT_MODEL_MAX_LENGTH
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{config_file}: not valid JSON ({e})") from e
    value = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH) if isinstance(config, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise TokenizerError(f"{config_file}: field model_max_length must be an int >= 2, got {value!r}")
    return value


def _check_special_ids(tok: Tokenizer, source: str) -> None:
    size = tok.get_vocab_size(with_added_tokens=True)
    expected = {t: i for i, t in enumerate(LEADING_SPECIALS)} | {MASK: size - 1}
    added = tok.get_added_tokens_decoder()
    for token, want in expected.items():
        got = tok.token_to_id(token)
        if got != want:
            raise TokenizerError(f"{source}: BART needs {token} at id {want} (vocab size {size}), found "
                                 f"{'no such token' if got is None else f'id {got}'}")
        if want not in added or not added[want].special:
            raise TokenizerError(f"{source}: {token} (id {want}) is not registered as a special token")


def _check_max_length(max_length: int | None) -> int | None:
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise TokenizerError(f"max_length must be an int >= 2 (room for <s> and </s>), got {max_length!r}")
    return max_length


# --- training -------------------------------------------------------------------------------------

def train_bart_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                         model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> BartTokenizer:
    """Train a byte-level BPE with BART's special-token layout; same corpus -> same tokenizer."""
    if vocab_size < 256 + len(LEADING_SPECIALS) + 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the byte alphabet and the 5 specials "
                             f"need {256 + len(LEADING_SPECIALS) + 1}")
    tok = Tokenizer(models.BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    _set_bart_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is reserved for <mask>
        min_frequency=min_frequency,
        special_tokens=[_special_token(t) for t in LEADING_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([_special_token(MASK)])
    return BartTokenizer(tok, model_max_length=model_max_length, source="trained tokenizer")

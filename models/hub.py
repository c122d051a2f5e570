"""`--model` names: a local model directory, or a Hugging Face hub id fetched through the hub's cache.

`huggingface_hub` is optional and imported only when a hub id is given. Once a model is in its
cache it loads offline; `HF_HUB_OFFLINE=1` (read when called, not when huggingface_hub was
imported) keeps every lookup local. When a model cannot be had, the error says how to get it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.config import HUB_IDS, PRESETS
from models.errors import ModelError

# What a BART checkpoint needs; the hub repos also hold TF/Flax/Rust weights we never read.
CONFIG_PATTERNS = ["config.json", "generation_config.json"]
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json"]
SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]

# "name" or "org/name" with the hub's characters; anything else is meant as a local path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model_dir(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory holding the model `name_or_path` names.

    An existing directory is itself. A short preset name such as "distilbart-cnn-12-6" stands for
    its hub id. Any other hub id is looked up in (and, online, downloaded into) the hub cache,
    `cache_dir` or huggingface_hub's default; safetensors weights are fetched when the repo has
    them, `.bin` weights only when it has no safetensors.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{name_or_path}: is a file; --model takes a model directory or a hub id")
    if not _looks_like_repo_id(name_or_path):
        raise ModelError(f"{name_or_path}: no such model directory")
    if name_or_path in PRESETS and name_or_path not in HUB_IDS:
        raise ModelError(f"{name_or_path!r} is a preset that is trained from scratch; it has no checkpoint to load")
    repo_id = HUB_IDS.get(name_or_path, name_or_path)

    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(
            f"{name_or_path!r} is not a local directory, and fetching hub id {repo_id!r} needs "
            "huggingface_hub: `pip install huggingface_hub` (then `hf download "
            f"{repo_id}` while online), or pass a local model directory, or use `--model tiny` "
            "for the offline demo"
        ) from None

    # As huggingface_hub reads it, but now rather than at its import.
    offline_flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    offline = offline_flag.strip().upper() in ("1", "ON", "YES", "TRUE")

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=CONFIG_PATTERNS + TOKENIZER_PATTERNS + patterns,
                                          cache_dir=cache_dir, local_files_only=offline))
        # Whatever stopped it (offline, no network, unknown repo, no access, incomplete cache), the
        # user's remedy is the same; the network errors' types differ between hub versions.
        except Exception as exc:
            raise ModelError(_how_to_download(name_or_path, repo_id, offline, exc)) from None

    directory = fetch(SAFETENSORS_PATTERNS)
    if not any((directory / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        directory = fetch(BIN_PATTERNS)
    return directory


def _looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and len(name) <= 96


def _how_to_download(name: str, repo_id: str, offline: bool, exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else \
        f"it could not be fetched from the Hugging Face hub ({type(exc).__name__}: {first_line})"
    return (f"cannot load model {name!r}: it is not a local directory and {reason}. "
            f"While online, download it with `hf download {repo_id}` (or `huggingface-cli download "
            f"{repo_id}`), or pass a local model directory, or use `--model tiny` for the offline demo")

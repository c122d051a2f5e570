"""Hugging Face model directories: read their weights into our BART and write them back.

A model directory holds config.json (+ generation_config.json) and its weights as
model.safetensors, a sharded model.safetensors.index.json, pytorch_model.bin or a sharded
pytorch_model.bin.index.json; safetensors wins when several are present. `.bin` files are read
with `weights_only=True`: a checkpoint is data, never code to run.

The model is built on the meta device and the loaded tensors are assigned into it, so loading a
300M-parameter model holds one copy of its weights, not two. `save_pretrained` writes what
Transformers writes (the tied embedding once, as `model.shared.weight`) into a fresh directory
beside the target and swaps it into place (models/atomic.py), so a crash leaves the old model or
the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from models.atomic import atomic_directory
from models.bart import BartForConditionalGeneration
from models.config import BartConfig
from models.errors import ModelError
from models.hub import resolve_model_dir

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)  # in order of preference

# One tensor, four names: checkpoints store any one of them.
EMBEDDING = "model.shared.weight"
EMBEDDING_ALIASES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
LM_HEAD = "lm_head.weight"
LOGITS_BIAS = "final_logits_bias"
# fairseq bookkeeping that converted checkpoints still carry; Transformers ignores it too.
IGNORED_KEYS = ("model.encoder.version", "model.decoder.version")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None) -> BartForConditionalGeneration:
    """A model from a local Hugging Face directory or a hub id, in eval mode (as Transformers returns it).

    Tensors keep the checkpoint's dtype unless `dtype` is given.
    """
    directory = resolve_model_dir(str(name_or_path))
    config = read_config(directory)
    state = load_state_dict_from_dir(directory, device=device, dtype=dtype)
    return model_from_state_dict(config, state, source=str(directory)).eval()


def read_config(directory: str | os.PathLike) -> BartConfig:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: no config.json; a Hugging Face model directory holds config.json "
                         f"and its weights ({' or '.join(WEIGHT_FILES)})")
    return BartConfig.from_dir(directory)


def find_weights(directory: str | os.PathLike) -> Path:
    """The weights file (or shard index) to read, safetensors first."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    foreign = sorted(p.name for p in directory.glob("*") if p.suffix in (".h5", ".msgpack", ".ot", ".ckpt"))
    hint = f" (it holds {', '.join(foreign)}, which medsum does not read)" if foreign else ""
    raise ModelError(f"{directory}: no model weights found; looked for {', '.join(WEIGHT_FILES)}{hint}")


def load_state_dict_from_dir(directory: str | os.PathLike, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str | None = None, only: set[str] | None = None
                             ) -> dict[str, Tensor]:
    """Every tensor in the directory's weights (or those named in `only`), under the names the
    files give them.

    Tensors move to `device` (and `dtype`) one at a time, so peak memory stays near one copy.
    """
    path = find_weights(directory)
    read = _read_safetensors if "safetensors" in path.name else _read_bin
    dtype = _as_dtype(dtype)

    def place(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    if not path.name.endswith(".index.json"):
        return read(path, place, only)
    state: dict[str, Tensor] = {}
    for shard, names in _read_index(path).items():
        tensors = read(path.parent / shard, place, only)
        absent = sorted((names if only is None else names & only) - tensors.keys())
        if absent:
            raise ModelError(f"{path}: the index places {', '.join(absent)} in {shard}, which does not hold them")
        state.update(tensors)
    return state


def read_tensors(directory: str | os.PathLike, names: list[str]) -> dict[str, Tensor]:
    """Only the named tensors of a model directory, by our state-dict names (files saved from
    BartModel, without the `model.` prefix, match too), read one at a time."""
    # file name -> our name, for both spellings
    wanted = {alias: name for name in names for alias in (name, name.removeprefix("model."))}
    found: dict[str, Tensor] = {}
    for file_name, tensor in load_state_dict_from_dir(directory, only=set(wanted)).items():
        found.setdefault(wanted[file_name], tensor)
    absent = sorted(set(names) - found.keys())
    if absent:
        raise ModelError(f"{find_weights(directory)}: does not hold {', '.join(absent[:5])}"
                         f"{f' and {len(absent) - 5} more' if len(absent) > 5 else ''}")
    return found


def model_from_state_dict(config: BartConfig, state: dict[str, Tensor], source: str = "checkpoint"
                          ) -> BartForConditionalGeneration:
    """Assign checkpoint tensors into a model built on the meta device (no second copy, no random init)."""
    with torch.device("meta"):
        model = BartForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = _complete_state(state, config, expected, source)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        # assign=True gives lm_head a Parameter of its own over the same storage; share the object
        # so the optimizer sees one tensor and its gradient.
        model.lm_head.weight = model.model.shared.weight
    return model


def _complete_state(state: dict[str, Tensor], config: BartConfig, expected: dict[str, tuple],
                    source: str) -> dict[str, Tensor]:
    """Fill in the tied aliases and the default logits bias, then list everything that does not fit."""
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    # Checkpoints saved from BartModel (no LM head) name their tensors without the `model.` prefix.
    if not any(k.startswith("model.") for k in state) and any(k.startswith(("shared.", "encoder.")) for k in state):
        state = {k if k in (LM_HEAD, LOGITS_BIAS) else f"model.{k}": v for k, v in state.items()}

    problems = {"missing": [], "unexpected": [], "wrong shape": []}
    tied = (EMBEDDING, *EMBEDDING_ALIASES) + ((LM_HEAD,) if config.tie_word_embeddings else ())
    stored = [name for name in tied if name in state]
    if stored:
        embedding = state[stored[0]]
        for name in stored[1:]:
            if state[name].shape != embedding.shape:
                problems["wrong shape"].append(f"{name}: {_shape(state[name].shape)}, but its tied "
                                               f"{stored[0]} is {_shape(embedding.shape)}")
            elif not config.tie_word_embeddings and not torch.equal(state[name], embedding):
                # Transformers unties encoder/decoder embeddings too when tie_word_embeddings is
                # false; our BART always shares them, so silently picking one would change outputs.
                raise ModelError(f"{source}: tie_word_embeddings is false and {name} differs from "
                                 f"{stored[0]}; medsum's BART shares one token embedding between "
                                 "encoder and decoder and cannot load separate ones")
        state.update({name: embedding for name in tied})
    else:
        problems["missing"].append(f"{EMBEDDING} {_shape(expected[EMBEDDING])} (or any of its tied names "
                                   f"{', '.join(tied[1:])})")
    if LOGITS_BIAS not in state and stored:
        state[LOGITS_BIAS] = embedding.new_zeros(expected[LOGITS_BIAS])  # Transformers' default too

    for name, shape in expected.items():
        if name not in state:
            if name not in tied and name != LOGITS_BIAS:  # both reported (or defaulted) above
                problems["missing"].append(f"{name} {_shape(shape)}")
        elif tuple(state[name].shape) != shape and not (name in tied and name != stored[0]):
            problems["wrong shape"].append(f"{name}: expected {_shape(shape)}, found {_shape(state[name].shape)}")
    problems["unexpected"] = [f"{name} {_shape(state[name].shape)}" for name in state if name not in expected]

    if any(problems.values()):
        lines = [f"{source}: the weights do not fit the model its config.json describes"]
        for kind, entries in problems.items():
            if entries:
                lines.append(f"  {kind} ({len(entries)}):")
                lines.extend(f"    {entry}" for entry in entries)
        raise ModelError("\n".join(lines))
    return state


def save_pretrained(model: BartForConditionalGeneration, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json, generation_config.json, model.safetensors (and the tokenizer's files) atomically.

    An existing model directory at `directory` is replaced as a whole; any other existing,
    non-empty directory is refused rather than deleted.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ModelError(f"{target}: exists and is not a directory; cannot save a model there")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").exists():
        raise ModelError(f"{target}: exists and is not a model directory (no config.json); "
                         "refusing to replace it, choose another output directory")
    with atomic_directory(target) as staging:
        write_model_files(staging, model.state_dict(), model.config)
        if tokenizer is not None:
            tokenizer.save(staging)
    return target


def write_model_files(directory: str | os.PathLike, state: dict[str, Tensor], config: BartConfig) -> None:
    """config.json, generation_config.json and model.safetensors in `directory`, as Transformers writes them.

    Not atomic on its own: callers write into a directory that `atomic_directory` swaps into place.
    """
    directory = Path(directory)
    state = _state_to_save(state, config)
    hf_config = config.to_hf_dict()
    hf_config.pop("torch_dtype", None)  # the old name; Transformers 5 reads and writes "dtype"
    hf_config["dtype"] = str(state[EMBEDDING].dtype).removeprefix("torch.")
    _write_json(directory / "config.json", hf_config)
    _write_json(directory / "generation_config.json", config.generation_dict())
    save_file(state, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})


def _state_to_save(state: dict[str, Tensor], config: BartConfig) -> dict[str, Tensor]:
    """Contiguous CPU tensors with the tied embedding stored once as `model.shared.weight`.

    Untied, Transformers reads the encoder's and decoder's embeddings as tensors of their own, so
    they are written out as copies (safetensors refuses two names over one storage).
    """
    embedding_names = (EMBEDDING, *EMBEDDING_ALIASES)
    tied = embedding_names + ((LM_HEAD,) if config.tie_word_embeddings else ())
    out = {name: t.detach().to("cpu").contiguous() for name, t in state.items() if name not in tied}
    stored = next((name for name in tied if name in state), None)
    if stored is None:
        raise ValueError(f"state dict holds no token embedding (any of {', '.join(tied)})")
    embedding = state[stored].detach().to("cpu").contiguous()
    out[EMBEDDING] = embedding
    if not config.tie_word_embeddings:
        out.update({name: embedding.clone() for name in EMBEDDING_ALIASES})
    return out


def _read_safetensors(path: Path, place: Callable[[Tensor], Tensor], only=None) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: place(f.get_tensor(name)) for name in f.keys() if only is None or name in only}
    except SafetensorError as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt, "
                         "download or save it again") from None


def _read_bin(path: Path, place: Callable[[Tensor], Tensor], only=None) -> dict[str, Tensor]:
    try:
        # mmap keeps the file's pages out of the process's own memory; legacy (non-zip) files can't mmap.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise ModelError(f"{path}: holds pickled Python objects besides tensors; medsum reads .bin "
                             "checkpoints with weights_only=True and will not run them. Convert the "
                             "checkpoint to safetensors with a tool you trust") from None
        raise ModelError(f"{path}: not a readable PyTorch checkpoint; it is truncated or corrupt") from None
    except Exception as exc:  # a damaged file can fail anywhere inside torch.load's parsers
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); it is truncated or corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ModelError(f"{path}: does not hold a flat mapping of tensor names to tensors")
    return {name: place(t) for name, t in state.items() if only is None or name in only}


def _read_index(path: Path) -> dict[str, set[str]]:
    """Shard file name -> tensor names, from a Transformers shard index."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a shard index with a weight_map ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{path}: weight_map must map tensor names to shard file names")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    escaping = sorted(s for s in shards if Path(s).name != s)
    if escaping:
        raise ModelError(f"{path}: shard names must be files beside the index, got {', '.join(escaping)}")
    absent = sorted(s for s in shards if not (path.parent / s).is_file())
    if absent:
        raise ModelError(f"{path}: shard files missing: {', '.join(absent)}")
    return shards


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _shape(shape) -> str:
    return f"[{', '.join(str(d) for d in shape)}]"


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")

"""LoRA adapters in PEFT's format: write ours as PEFT's, and load PEFT's into our model.

A PEFT LoRA adapter directory holds `adapter_config.json` (a serialised `peft.LoraConfig`) and
`adapter_model.safetensors`, whose keys are the base model's module paths under
`base_model.model.` with the adapter name ("default") dropped:

    ours (engine/lora.py)          PEFT                                           shape
    <path>.lora_a                  base_model.model.<path>.lora_A.weight          [r, in]
    <path>.lora_b                  base_model.model.<path>.lora_B.weight          [out, r]
    <path>.bias  (train_biases)    base_model.model.<path>.base_layer.bias        [out]   (bias="lora_only")

PEFT scales by lora_alpha / r and applies dropout before lora_A, as LoRALinear does, so a plain
LoRA adapter means the same thing on both sides. PEFT options that change that meaning (DoRA,
rsLoRA, per-layer ranks, extra trained modules, ...) are refused with a ModelError naming the
field rather than loaded into something that computes different outputs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.lora import ADAPTER_CONFIG, ALL_LINEAR, LoRAConfig, inject_lora, lora_layers, parse_targets
from models.atomic import atomic_directory
from models.config import HUB_IDS
from models.errors import ModelError

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # what PEFT wrote before safetensors became its default
PEFT_CONFIG = ADAPTER_CONFIG  # both formats name their config adapter_config.json
PREFIX = "base_model.model."
TASK_TYPE = "SEQ_2_SEQ_LM"
# Transformers' default LoRA targets for BART, which PEFT uses when target_modules is null.
DEFAULT_BART_TARGETS = ["q_proj", "v_proj"]

# Fields PEFT writes that only matter while creating or training an adapter, or only together
# with a field that is checked below; whatever their value, the saved weights mean the same.
_IRRELEVANT = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
               "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
               "qalora_group_size", "layers_pattern", "ensure_weight_tying"}
# Fields this module interprets itself.
_INTERPRETED = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                "bias", "init_lora_weights"}
# init_lora_weights values that only initialise the adapter; pissa, olora, corda, loftq, ... also rewrite
# the base weights, so the adapter is useless on the unmodified base model.
_PLAIN_INITS = (True, False, "gaussian", "eva")


# --- ours -> PEFT --------------------------------------------------------------------------------

def to_peft_key(key: str) -> str:
    path, _, leaf = key.rpartition(".")
    if leaf == "lora_a":
        return f"{PREFIX}{path}.lora_A.weight"
    if leaf == "lora_b":
        return f"{PREFIX}{path}.lora_B.weight"
    if leaf == "bias":
        return f"{PREFIX}{path}.base_layer.bias"
    raise ModelError(f"adapter tensor {key!r} is not a LoRA tensor (lora_a, lora_b or bias)")


def peft_config_dict(config: LoRAConfig, layer_names: list[str], base_model: str | None) -> dict:
    """The adapter_config.json PEFT 0.21's LoraConfig.save_pretrained writes for this adapter.

    `peft_version` is left out: PEFT fills in its own version when it reads the file.
    """
    if parse_targets(config.targets) == [ALL_LINEAR]:
        # the suffixes of the layers themselves: PEFT's own all-linear expansion is per model class
        target_modules = sorted({name.rpartition(".")[2] for name in layer_names})
    else:
        target_modules = parse_targets(config.targets)
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "bias": "lora_only" if config.train_biases else "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "kasa_config": None,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": config.dropout, "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": config.rank,
        "rank_pattern": {}, "revision": None, "target_modules": target_modules, "target_parameters": None,
        "task_type": TASK_TYPE, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


def save_peft_adapter(directory: str | os.PathLike, config: LoRAConfig, tensors: dict[str, Tensor],
                      base_model: str | None) -> Path:
    """Write `tensors` (our adapter keys) as a PEFT adapter directory, swapped into place whole."""
    layers = sorted(k.removesuffix(".lora_a") for k in tensors if k.endswith(".lora_a"))
    peft_tensors = {to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    config_text = json.dumps(peft_config_dict(config, layers, base_model), indent=2, sort_keys=True) + "\n"
    with atomic_directory(directory) as tmp:
        save_file(peft_tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(config_text, encoding="utf-8")
    return Path(directory)


def base_model_id(name: str | None) -> str | None:
    """What PEFT should load as the base: our short checkpoint names stand for their hub ids."""
    return HUB_IDS.get(name, name) if name else None


# --- PEFT -> ours --------------------------------------------------------------------------------

@dataclass
class PeftLoRA:
    """The parts of a PEFT LoraConfig that decide what the adapter computes."""
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str] | str
    exclude_modules: list[str] | str | None
    bias: str


def is_peft_adapter(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    if not (directory / PEFT_WEIGHTS).is_file() and not (directory / PEFT_WEIGHTS_BIN).is_file():
        return False
    try:
        return "peft_type" in json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def read_peft_config(directory: str | os.PathLike) -> PeftLoRA:
    """The PEFT adapter's LoRA settings, refusing any option that LoRALinear would not reproduce."""
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        raise ModelError(f"{path}: not found; a PEFT adapter directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters (\"LORA\") are supported")
    if raw.get("task_type") not in (TASK_TYPE, None):
        raise ModelError(f"{path}: task_type is {raw['task_type']!r}; a BART summariser's adapter has "
                         f"task_type {TASK_TYPE!r}")

    problems = []
    bias = raw.get("bias", "none")
    if bias not in ("none", "lora_only"):
        problems.append(f"bias={bias!r} (the adapter replaces every bias of the model; only \"none\" and "
                        "\"lora_only\" are supported)")
    init = raw.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} (this initialisation rewrites the base weights, so the adapter "
                        "only works on the base model it was made with)")
    for field, value in sorted(raw.items()):
        if field in _IRRELEVANT or field in _INTERPRETED or not value:
            continue
        why = {"use_dora": "DoRA adds a magnitude vector", "use_rslora": "rsLoRA scales by alpha/sqrt(r), not alpha/r",
               "rank_pattern": "per-layer ranks", "alpha_pattern": "per-layer alphas",
               "fan_in_fan_out": "transposed (Conv1D) base weights", "lora_bias": "a bias on lora_B",
               "modules_to_save": "fully trained extra modules",
               "layers_to_transform": "LoRA on some layers only, chosen by index"}.get(field, "not supported here")
        problems.append(f"{field}={json.dumps(value)} ({why})")
    if problems:
        raise ModelError(f"{path}: unsupported PEFT LoRA option(s): {'; '.join(problems)}. medsum loads plain LoRA "
                         "adapters only; merge this one with PEFT (merge_and_unload) and export the merged model")

    r, alpha, dropout = raw.get("r", 8), raw.get("lora_alpha", 8), raw.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ModelError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ModelError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"{path}: lora_dropout must be in [0, 1), got {dropout!r}")
    targets = raw.get("target_modules")
    if targets is None:
        targets = DEFAULT_BART_TARGETS
    exclude = raw.get("exclude_modules")
    for name, value in (("target_modules", targets), ("exclude_modules", exclude)):
        if not (value is None or isinstance(value, str) or
                (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ModelError(f"{path}: {name} must be a list of module names or a regular expression, got {value!r}")
    return PeftLoRA(r, float(alpha), float(dropout), targets, exclude or None, bias)


def _matches_any(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule (check_target_module_exists): a string is a full-match regex, a list holds name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def peft_targeted_modules(model: nn.Module, settings: PeftLoRA, source: str) -> list[str]:
    """The names of the modules PEFT would wrap in `model`; every one must be an nn.Linear."""
    modules = {name: m for name, m in model.named_modules() if name}
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    suffixes = ", ".join(sorted({n.rpartition(".")[2] for n in linears}))
    targets = settings.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        chosen = [n for n in linears if n.rpartition(".")[2] != "lm_head"]
    else:
        if isinstance(targets, list):
            absent = [t for t in targets if not any(_matches_any(n, [t]) for n in modules)]
            if absent:
                raise ModelError(f"{source}: target_modules {', '.join(map(repr, absent))} name(s) no module of "
                                 f"{type(model).__name__}; its Linear layers are named: {suffixes}")
        chosen = [n for n in modules if _matches_any(n, targets)]
    if settings.exclude_modules:
        chosen = [n for n in chosen if not _matches_any(n, settings.exclude_modules)]
    if not chosen:
        raise ModelError(f"{source}: target_modules {targets!r} select no module of {type(model).__name__}; "
                         f"its Linear layers are named: {suffixes}")
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ModelError(f"{source}: target_modules {targets!r} select module(s) that are not Linear layers, "
                         f"which medsum's LoRA cannot wrap: {', '.join(not_linear[:5])}")
    # A LoRA on the LM head tied to the token embedding cannot be merged into a tied checkpoint: the
    # one stored matrix would change the input embeddings too.
    embeddings = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    tied = [n for n in chosen if id(modules[n].weight) in embeddings]
    if tied:
        raise ModelError(f"{source}: target_modules {targets!r} select {', '.join(tied)}, whose weight is tied to "
                         "the token embedding; LoRA on a tied output projection is not supported")
    return chosen


def read_peft_weights(directory: str | os.PathLike) -> tuple[Path, dict[str, Tensor]]:
    directory = Path(directory)
    if (directory / PEFT_WEIGHTS).is_file():
        return directory / PEFT_WEIGHTS, _read_safetensors(directory / PEFT_WEIGHTS)
    path = directory / PEFT_WEIGHTS_BIN
    if not path.is_file():
        raise ModelError(f"{directory}: no adapter weights; looked for {PEFT_WEIGHTS} and {PEFT_WEIGHTS_BIN}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # data only, never pickled code
    except Exception as exc:
        raise ModelError(f"{path}: not a readable tensor file ({type(exc).__name__}); it is damaged or holds "
                         "pickled objects besides tensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a mapping of tensor names to tensors")
    return path, state


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike,
                      lora_dtype: torch.dtype | None = None) -> LoRAConfig:
    """Load a PEFT LoRA adapter into `model` (which has no LoRA yet): inject LoRALinear layers, copy the weights.

    Everything is checked before the model is touched. Returns the equivalent LoRAConfig, so the
    adapter can be saved in our format (`save_adapter`) or trained further.
    """
    directory = Path(directory)
    settings = read_peft_config(directory)
    source = str(directory / PEFT_CONFIG)
    if any(True for _ in lora_layers(model)):
        raise ModelError(f"load_peft_adapter({directory}): the model already has LoRA layers; load into a plain model")
    chosen = peft_targeted_modules(model, settings, source)
    weights_path, tensors = read_peft_weights(directory)

    ours: dict[str, Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        path = key.removeprefix(PREFIX)
        for peft_leaf, our_leaf in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b"),
                                    (".base_layer.bias", "bias"), (".bias", "bias")):
            if key.startswith(PREFIX) and path.endswith(peft_leaf):
                ours[f"{path.removesuffix(peft_leaf)}.{our_leaf}"] = tensor
                break
        else:
            unexpected.append(key)
    layers = {name: model.get_submodule(name) for name in chosen}
    expected = {f"{n}.{leaf}" for n in layers for leaf in ("lora_a", "lora_b")}
    biases = {f"{n}.bias" for n, m in layers.items() if m.bias is not None} if settings.bias == "lora_only" else set()
    unexpected += sorted(set(ours) - expected - biases)
    missing = sorted(expected - set(ours))
    if missing or unexpected:
        raise ModelError(f"{weights_path}: the adapter does not fit {type(model).__name__} as {source} targets it; "
                         f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    for name, layer in layers.items():
        shapes = {"lora_a": (settings.r, layer.in_features), "lora_b": (layer.out_features, settings.r),
                  "bias": (layer.out_features,)}
        for leaf, shape in shapes.items():
            key = f"{name}.{leaf}"
            if key in ours and tuple(ours[key].shape) != shape:
                raise ModelError(f"{weights_path}: {key} has shape {tuple(ours[key].shape)}, expected {shape} "
                                 f"(r={settings.r}, layer {layer.in_features}->{layer.out_features})")

    inject_lora(model, chosen, settings.r, settings.lora_alpha, settings.lora_dropout, lora_dtype)
    with torch.no_grad():
        for key, tensor in ours.items():
            model.get_parameter(key).copy_(tensor)
    return LoRAConfig(rank=settings.r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                      targets=_our_targets(model, settings, chosen), train_biases=settings.bias == "lora_only")


def _our_targets(model: nn.Module, settings: PeftLoRA, chosen: list[str]) -> str:
    """The LoRAConfig.targets naming exactly `chosen`: PEFT's suffix list when it means the same, else full names."""
    targets = settings.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR and not settings.exclude_modules:
        return ALL_LINEAR
    if isinstance(targets, list) and not settings.exclude_modules:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        if sorted(n for n in linears if _matches_any(n, targets)) == sorted(chosen):
            return ",".join(targets)
    return ",".join(chosen)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc}); it is truncated or damaged") from None


def _few(items: list[str]) -> str:
    return (", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")) if items else "none"

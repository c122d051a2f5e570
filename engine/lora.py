"""LoRA (Hu et al. 2021) for nn.Linear, in torchtune's style.

`LoRALinear` keeps the base `weight`/`bias` as its own parameters, so a model's state-dict keys
for them stay exactly those of nn.Linear and base checkpoints load unchanged. The adapter adds

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,   A = lora_a [rank, in], B = lora_b [out, rank]

A starts kaiming-uniform (a=sqrt(5), as PEFT does) and B at zero, so a fresh layer equals its base.
Merging folds B A into W explicitly (in fp32); `.eval()` never merges (loralib's trap).

Key mapping to a PEFT adapter (`adapter_model.safetensors`, adapter name "default" dropped):
    <path>.lora_a  [rank, in]   ->  base_model.model.<path>.lora_A.weight
    <path>.lora_b  [out, rank]  ->  base_model.model.<path>.lora_B.weight
    <path>.bias (train_biases)  ->  base_model.model.<path>.base_layer.bias   (PEFT bias="lora_only")
and LoRAConfig -> PEFT LoraConfig: rank -> r, alpha -> lora_alpha, dropout -> lora_dropout,
targets -> target_modules (suffixes; "all-linear" excludes lm_head in both), use_rslora=False.
"""

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models import packed_weights
from models.atomic import atomic_write, atomic_write_text
from models.errors import ModelError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"


class AdapterNotFoundError(ModelError, FileNotFoundError):
    """An adapter directory without its weights or config file."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "q_proj,v_proj"  # comma-separated module-name suffixes, or "all-linear"
    train_biases: bool = False  # also train (and save) the biases of the LoRA-wrapped layers

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, str) or not parse_targets(self.targets):
            raise ValueError(f"LoRA targets must be a non-empty comma-separated string, got {self.targets!r}")
        if not isinstance(self.train_biases, bool):
            raise ValueError(f"LoRA train_biases must be true or false, got {self.train_biases!r}")

    @classmethod
    def from_dict(cls, raw: object, source: str = "LoRA config") -> "LoRAConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown LoRA config field(s): {', '.join(unknown)}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update; state-dict keys weight, bias, lora_a, lora_b."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.merged = False
        self.reset_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, lora_dtype: torch.dtype | None = None
    ) -> "LoRALinear":
        """Wrap `linear`, reusing its weight/bias Parameters (no copy, no re-init, meta stays meta)."""
        base = linear.weight
        # built on meta so the throwaway base tensors cost nothing, then the real ones are swapped in
        layer = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                    bias=linear.bias is not None, device="meta", dtype=base.dtype)
        layer.weight = base
        layer.bias = linear.bias
        factory = dict(device=base.device, dtype=lora_dtype or base.dtype)
        layer.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, **factory))
        layer.lora_b = nn.Parameter(torch.empty(linear.out_features, rank, **factory))
        layer.reset_lora_parameters()
        return layer

    def reset_parameters(self) -> None:
        # nn.Linear's own initialisation, for a layer built from scratch
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)  # B = 0: the adapted layer starts equal to the base

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, the update that merging adds to the base weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        # fp32 sum then one rounding: adding a bf16 delta to a bf16 weight loses the small update
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = packed_weights.linear(x, self.weight, self.bias)  # F.linear, on a pack of a frozen base
        if self.merged:  # B A is already inside weight
            return out
        # cast the small adapter matrices, not the activations, when they differ (fp32 adapters on a bf16 base)
        h = F.linear(self.dropout(x), self.lora_a.to(x.dtype))
        return out + self.scaling * F.linear(h, self.lora_b.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, bias={self.bias is not None}, merged={self.merged}")


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return [t.strip() for t in items if t.strip()]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _is_targeted(name: str, patterns: list[str]) -> bool:
    if patterns == [ALL_LINEAR]:
        return name.rpartition(".")[2] != "lm_head"  # the tied output projection stays frozen
    return any(_matches(name, p) for p in patterns)


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "q_proj,v_proj",
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    lora_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace the nn.Linear modules whose names end with a target by LoRALinear; returns their names.

    The base weights are reused, not copied, so this works on the meta device; there the adapters
    are uninitialised too, so call `reset_lora_parameters(model)` after materialising.
    """
    patterns = parse_targets(targets)
    if not patterns:
        raise ValueError(f"LoRA targets are empty: {targets!r}")
    if ALL_LINEAR in patterns and len(patterns) > 1:
        raise ValueError(f"LoRA targets: 'all-linear' cannot be combined with other targets ({targets!r})")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    for pattern in patterns:
        if pattern == ALL_LINEAR or any(_matches(n, pattern) for n in linears):
            continue
        if any(_matches(n, pattern) for n, _ in lora_layers(model)):
            raise ValueError(f"LoRA target {pattern!r}: the matching layers already have LoRA")
        suffixes = sorted({n.rpartition(".")[2] for n in linears})
        raise ValueError(f"LoRA target {pattern!r} matches no nn.Linear in {type(model).__name__}; "
                         f"its Linear layers are named: {', '.join(suffixes) or '(none)'}")
    chosen = [n for n in linears if _is_targeted(n, patterns)]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r}: {type(model).__name__} has no nn.Linear besides lm_head")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), rank, alpha, dropout, lora_dtype))
    return chosen


def _require_lora(model: nn.Module, action: str) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{action}: {type(model).__name__} has no LoRA layers; call inject_lora first")
    return layers


def reset_lora_parameters(model: nn.Module) -> None:
    for _, layer in _require_lora(model, "reset_lora_parameters"):
        layer.reset_lora_parameters()


def mark_only_lora_trainable(model: nn.Module, train_biases: bool = False) -> None:
    """Freeze everything except lora_a/lora_b (and, if asked, the biases of the LoRA layers)."""
    layers = _require_lora(model, "mark_only_lora_trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in layers:
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
        if train_biases and layer.bias is not None:
            layer.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, include_biases: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under the model's own state-dict keys."""
    state = {}
    for name, layer in _require_lora(model, "lora_state_dict"):
        state[f"{name}.lora_a"] = layer.lora_a.detach()
        state[f"{name}.lora_b"] = layer.lora_b.detach()
        if include_biases and layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach()
    return state


def merge_lora(model: nn.Module) -> int:
    layers = _require_lora(model, "merge_lora")
    for _, layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    layers = _require_lora(model, "unmerge_lora")
    for _, layer in layers:
        layer.unmerge()
    return len(layers)


def _check_layers_match(layers: list[tuple[str, LoRALinear]], config: LoRAConfig, source: str) -> None:
    for name, layer in layers:
        if layer.rank != config.rank or layer.alpha != config.alpha:
            raise ValueError(f"{source}: rank {config.rank} / alpha {config.alpha} do not match layer {name} "
                             f"(rank {layer.rank}, alpha {layer.alpha})")


def _check_targets_match(model: nn.Module, layers: list[tuple[str, LoRALinear]], config: LoRAConfig, source: str) -> None:
    """The saved config must re-create exactly these LoRA layers when injected into the base model."""
    patterns = parse_targets(config.targets)
    untargeted = [n for n, _ in layers if not _is_targeted(n, patterns)]
    left_plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and _is_targeted(n, patterns)]
    if untargeted or left_plain:
        raise ValueError(f"{source}: targets {config.targets!r} do not describe the model's LoRA layers "
                         f"(LoRA but not targeted: {untargeted[:3]}; targeted but plain Linear: {left_plain[:3]})")


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoRAConfig) -> Path:
    """Write adapter.safetensors and adapter_config.json into `directory` (each atomically)."""
    directory = Path(directory)
    layers = _require_lora(model, "save_adapter")
    _check_layers_match(layers, config, f"save_adapter({directory})")
    _check_targets_match(model, layers, config, f"save_adapter({directory})")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model, config.train_biases).items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(asdict(config), indent=2) + "\n"
    atomic_write_text(directory / ADAPTER_CONFIG, config_text)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Our own adapter directory (engine/lora.py's save_adapter): its config and tensors, checked for consistency."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterNotFoundError(f"{path}: not found; an adapter directory holds {ADAPTER_WEIGHTS} and "
                                       f"{ADAPTER_CONFIG}")
    try:
        config = LoRAConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")), source=str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: not valid JSON ({exc})") from None
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights_path}: not a readable safetensors file ({exc}); it is truncated or damaged") from None
    layers = sorted(k.removesuffix(".lora_a") for k in tensors if k.endswith(".lora_a"))
    expected = {f"{layer}.{leaf}" for layer in layers for leaf in ("lora_a", "lora_b")}
    if config.train_biases:
        expected |= {f"{layer}.bias" for layer in layers if f"{layer}.bias" in tensors}
    if not layers or set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise ModelError(f"{weights_path}: does not hold one lora_a and one lora_b per layer"
                         f"{' (biases only with train_biases)' if not config.train_biases else ''}; "
                         f"{'no lora_a tensors' if not layers else 'odd tensors: ' + ', '.join(odd[:5])}")
    for layer in layers:
        a, b = tensors[f"{layer}.lora_a"], tensors[f"{layer}.lora_b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise ModelError(f"{weights_path}: {layer} has lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)}, "
                             f"which do not fit rank {config.rank} from {config_path}")
    return config, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoRAConfig:
    """Load an adapter saved by save_adapter; injects LoRA first if the model has none yet."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    config, tensors = read_adapter(directory)

    if not any(True for _ in lora_layers(model)):
        inject_lora(model, config.targets, config.rank, config.alpha, config.dropout)
    layers = list(lora_layers(model))
    _check_layers_match(layers, config, str(config_path))
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"load_adapter({directory}): layer {merged[0]} is merged; unmerge_lora(model) first")

    expected = lora_state_dict(model, config.train_biases)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{weights_path}: adapter does not fit the model; "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise ValueError(f"{weights_path}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                             f"the model expects {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])  # detach() shares storage with the parameter
    return config

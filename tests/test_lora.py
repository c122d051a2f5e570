import copy
import json

import pytest
import torch
from torch import nn

from engine.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    reset_lora_parameters,
    save_adapter,
    unmerge_lora,
)
from models import packed_weights


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out_proj(weights @ v)


class DecoderLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn, self.encoder_attn = Attention(d), Attention(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.self_attn(x)
        x = x + self.encoder_attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyModel(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 11, n_layers: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([DecoderLayer(d) for _ in range(n_layers)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def perturb_lora(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: give every adapter a non-zero B (and a new A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g))
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


def tiny_ids() -> torch.Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))


def test_rank4_on_784x784_layer_trains_6272_parameters():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(784, 784))
    inject_lora(model, "fc", rank=4, alpha=8)
    mark_only_lora_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable == 6_272
    assert frozen == 614_656 + 784


def test_fresh_lora_layer_outputs_exactly_the_base_layer():
    torch.manual_seed(0)
    base = packed_weights.Linear(16, 12)  # the model's Linear: its fp32 products run on oneDNN
    layer = LoRALinear.from_linear(copy.deepcopy(base), rank=4, alpha=8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_a.abs().sum() > 0  # A is random, B is zero
    assert torch.count_nonzero(layer.lora_b) == 0


def test_lora_forward_adds_scaled_low_rank_update():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, rank=4, alpha=2)
    perturb_lora(layer)
    x = torch.randn(3, 16)
    expected = x @ layer.weight.T + layer.bias + 0.5 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), expected)


def test_merged_output_equals_unmerged_in_fp32():
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, rank=4, alpha=16)
    perturb_lora(layer)
    x = torch.randn(5, 32)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)


def test_merge_in_bf16_weights_is_computed_in_fp32():
    torch.manual_seed(0)
    layer = LoRALinear(64, 48, rank=8, alpha=16, dtype=torch.bfloat16)
    perturb_lora(layer)
    base = layer.weight.detach().clone()
    reference = base.float() + (layer.lora_b.float() @ layer.lora_a.float()) * layer.scaling
    layer.merge()
    # one rounding of the fp32 sum, not a bf16 product added to bf16 weights
    assert torch.equal(layer.weight, reference.to(torch.bfloat16))
    naive = base + (layer.lora_b @ layer.lora_a) * layer.scaling
    assert (layer.weight.float() - reference).abs().sum() < (naive.float() - reference).abs().sum()
    x = torch.randn(4, 64).bfloat16()
    y_reference = x.float() @ reference.T + layer.bias.float()
    # bf16 output rounding only; an unmerged or badly merged weight is off by ~0.5 per entry
    torch.testing.assert_close(layer(x).float(), y_reference, rtol=1.6e-2, atol=5e-2)


def test_fp32_adapters_on_a_bf16_base_train_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).bfloat16()
    layer = LoRALinear.from_linear(base, rank=4, alpha=8, lora_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    perturb_lora(layer)
    x = torch.randn(3, 16).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_b.grad.dtype == torch.float32 and layer.lora_b.grad.abs().sum() > 0
    layer.merge()
    torch.testing.assert_close(layer(x).float(), out.detach().float(), rtol=1.6e-2, atol=2e-2)


def test_lora_under_autocast_computes_in_bf16():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, rank=4, alpha=8)
    perturb_lora(layer)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), rtol=1.6e-2, atol=2e-2)


def test_unmerge_restores_base_weights():
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, rank=4, alpha=16)
    perturb_lora(layer)
    base = layer.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.weight, base, atol=1e-3)
    layer.merge()  # a second merge is a no-op, not a double add
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), base, rtol=0, atol=1e-6)


def test_eval_does_not_merge():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, rank=4, alpha=8)
    perturb_lora(layer)
    base = layer.weight.detach().clone()
    x = torch.randn(3, 16)
    train_out = layer(x)
    layer.eval()
    assert not layer.merged
    assert torch.equal(layer.weight, base)
    assert torch.equal(layer(x), train_out)


def test_dropout_touches_only_the_lora_path():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, rank=4, alpha=8, dropout=0.5)
    x = torch.randn(3, 16)
    base_out = packed_weights.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base_out)  # B = 0: dropout on the adapter input changes nothing
    perturb_lora(layer)
    assert not torch.equal(layer(x), layer(x))  # train mode: the adapter input is dropped at random
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_inject_replaces_exactly_the_targeted_modules_and_keeps_base_keys():
    model = TinyModel()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    q_weight = model.layers[0].self_attn.q_proj.weight
    replaced = inject_lora(model, "q_proj,v_proj", rank=2, alpha=4)
    assert replaced == [
        f"layers.{i}.{attn}.{proj}"
        for i in range(2) for attn in ("self_attn", "encoder_attn") for proj in ("q_proj", "v_proj")
    ]
    assert [name for name, _ in lora_layers(model)] == replaced
    for name, module in model.named_modules():
        if name.endswith(("k_proj", "out_proj", "fc1", "fc2", "lm_head")):
            assert type(module) is nn.Linear, name
    assert model.layers[0].self_attn.q_proj.weight is q_weight  # reused, not re-initialised

    state = model.state_dict()
    lora_keys = {f"{n}.lora_{ab}" for n in replaced for ab in "ab"}
    assert set(state) == set(base_state) | lora_keys
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key
    fresh = TinyModel()
    inject_lora(fresh, "q_proj,v_proj", rank=2, alpha=4)
    result = fresh.load_state_dict(base_state, strict=False)  # a base checkpoint loads unchanged
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys


def test_inject_target_with_dots_picks_one_attention():
    model = TinyModel()
    replaced = inject_lora(model, "self_attn.q_proj", rank=2, alpha=4)
    assert replaced == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]


def test_inject_all_linear_skips_lm_head():
    model = TinyModel()
    replaced = inject_lora(model, "all-linear", rank=2, alpha=4)
    assert len(replaced) == 2 * (2 * 4 + 2)
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")


def test_target_that_matches_nothing_is_an_error():
    model = TinyModel()
    with pytest.raises(ValueError, match=r"'o_proj' matches no nn.Linear.*q_proj"):
        inject_lora(model, "q_proj,o_proj")
    inject_lora(model, "q_proj")
    with pytest.raises(ValueError, match="already have LoRA"):
        inject_lora(model, "q_proj")


def test_inject_on_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = TinyModel(d=1024)
    replaced = inject_lora(model, "q_proj,v_proj", rank=8, alpha=16)
    assert all(p.is_meta for p in model.parameters())
    layer = model.get_submodule(replaced[0])
    assert layer.lora_a.shape == (8, 1024) and layer.lora_b.shape == (1024, 8)
    model.to_empty(device="cpu")
    reset_lora_parameters(model)  # meta adapters have no values; give them their init
    assert torch.count_nonzero(layer.lora_b) == 0 and layer.lora_a.abs().sum() > 0


def test_mark_only_lora_trainable_freezes_the_rest():
    model = TinyModel()
    replaced = inject_lora(model, "q_proj", rank=2, alpha=4)
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in replaced for ab in "ab"}
    mark_only_lora_trainable(model, train_biases=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in replaced for p in ("lora_a", "lora_b", "bias")}
    with pytest.raises(ValueError, match="inject_lora"):
        mark_only_lora_trainable(TinyModel())


def test_lora_gradients_flow_only_to_adapters():
    model = TinyModel()
    inject_lora(model, "q_proj,v_proj", rank=2, alpha=4)
    mark_only_lora_trainable(model)
    perturb_lora(model)
    model(tiny_ids()).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(("lora_a", "lora_b")), name


def test_merge_lora_over_a_model_keeps_its_outputs():
    model = TinyModel()
    inject_lora(model, "all-linear", rank=2, alpha=4)
    perturb_lora(model)
    model.eval()
    ids = tiny_ids()
    before = model(ids)
    assert merge_lora(model) == 20
    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)


def test_adapter_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    base = TinyModel()
    trained = copy.deepcopy(base)
    config = LoRAConfig(rank=2, alpha=4, targets="q_proj,v_proj", train_biases=True)
    inject_lora(trained, config.targets, config.rank, config.alpha)
    perturb_lora(trained)
    with torch.no_grad():
        trained.layers[0].self_attn.q_proj.bias.add_(1.0)  # a trained bias travels with the adapter
    save_adapter(trained, tmp_path / "adapter", config)

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["rank"] == 2
    loaded = copy.deepcopy(base)
    assert load_adapter(loaded, tmp_path / "adapter") == config  # injects LoRA itself
    trained.eval(), loaded.eval()
    assert torch.equal(loaded(tiny_ids()), trained(tiny_ids()))
    assert set(lora_state_dict(loaded, include_biases=True)) == set(lora_state_dict(trained, include_biases=True))


def test_load_adapter_rejects_a_mismatched_model(tmp_path):
    trained = TinyModel()
    inject_lora(trained, "q_proj,v_proj", rank=2, alpha=4)
    save_adapter(trained, tmp_path, LoRAConfig(rank=2, alpha=4, targets="q_proj,v_proj"))

    other_rank = TinyModel()
    inject_lora(other_rank, "q_proj,v_proj", rank=4, alpha=4)
    with pytest.raises(ValueError, match=r"adapter_config.json: rank 2 .* layers.0.self_attn.q_proj"):
        load_adapter(other_rank, tmp_path)

    more_targets = TinyModel()
    inject_lora(more_targets, "q_proj,k_proj,v_proj", rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"adapter.safetensors: .*missing \['layers.0.encoder_attn.k_proj.lora_a'"):
        load_adapter(more_targets, tmp_path)

    merged = TinyModel()
    inject_lora(merged, "q_proj,v_proj", rank=2, alpha=4)
    merge_lora(merged)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(merged, tmp_path)


def test_save_adapter_refuses_a_config_that_does_not_describe_the_model(tmp_path):
    model = TinyModel()
    inject_lora(model, "q_proj,v_proj", rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"targets 'q_proj' do not describe.*v_proj"):
        save_adapter(model, tmp_path, LoRAConfig(rank=2, alpha=4, targets="q_proj"))
    with pytest.raises(ValueError, match=r"targets 'all-linear' do not describe.*k_proj"):
        save_adapter(model, tmp_path, LoRAConfig(rank=2, alpha=4, targets="all-linear"))
    with pytest.raises(ValueError, match=r"alpha 8"):
        save_adapter(model, tmp_path, LoRAConfig(rank=2, alpha=8, targets="q_proj,v_proj"))
    assert not any(tmp_path.iterdir())


def test_load_adapter_names_the_bad_config_file(tmp_path):
    model = TinyModel()
    inject_lora(model, "q_proj", rank=2, alpha=4)
    save_adapter(model, tmp_path, LoRAConfig(rank=2, alpha=4, targets="q_proj"))
    config_path = tmp_path / ADAPTER_CONFIG
    config_path.write_text(json.dumps({"rank": 2, "alpha": 4, "colour": "red"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown LoRA config field\(s\): colour"):
        load_adapter(model, tmp_path)
    config_path.write_text(json.dumps({"rank": 0}))
    with pytest.raises(ValueError, match=r"adapter_config.json: LoRA rank must be a positive integer"):
        load_adapter(model, tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "missing")


def test_lora_matches_peft_under_the_documented_key_mapping():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TinyModel()
    ours = copy.deepcopy(base)
    inject_lora(ours, "q_proj,v_proj", rank=2, alpha=6)
    perturb_lora(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    peft_state = {}
    for key, value in lora_state_dict(ours).items():
        path, _, name = key.rpartition(".")
        peft_state[f"base_model.model.{path}.{'lora_A' if name == 'lora_a' else 'lora_B'}.weight"] = value
    result = peft.set_peft_model_state_dict(theirs, peft_state)
    assert not result.unexpected_keys
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(v.numel() for v in peft_state.values())
    ours.eval(), theirs.eval()
    # torch's float32 tolerances: our q and v products run on oneDNN, PEFT's on MKL
    torch.testing.assert_close(ours(tiny_ids()), theirs(tiny_ids()))


def test_lora_config_validates_its_fields():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(targets=" , ")


def test_distilbart_cnn_12_6_rank_8_on_q_and_v_trains_786432_parameters():
    from models.bart import BartForConditionalGeneration, count_parameters
    from models.config import preset

    with torch.device("meta"):
        model = BartForConditionalGeneration(preset("distilbart-cnn-12-6"))
    replaced = inject_lora(model, "q_proj,v_proj", rank=8, alpha=16)
    mark_only_lora_trainable(model)
    assert len(replaced) == 48  # q and v of 12 encoder self, 6 decoder self and 6 decoder cross blocks
    assert count_parameters(model, trainable_only=True) == 786_432
    assert count_parameters(model) == 305_510_400 + 786_432

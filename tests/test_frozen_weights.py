"""Frozen Linear weights held in bf16 during mixed-precision training: the same training, the same
saved checkpoints, the fp32 weights back at the end."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpointing import RunDir
from engine.frozen_weights import hold_frozen_linears_in
from engine.lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from engine.trainer import train
from models import packed_weights
from models.checkpoint import load_pretrained, read_tensors, save_pretrained
from models.errors import ModelError
from tests.test_trainer import config, random_split, tiny_model

CPU = torch.device("cpu")
LORA = LoRAConfig(rank=2, alpha=4, dropout=0.0, targets="q_proj,v_proj")


@pytest.fixture(scope="module")
def tokenizer():
    from models.tokenizer import train_bart_tokenizer
    return train_bart_tokenizer(["alpha beta gamma delta", "epsilon zeta eta theta"] * 10, vocab_size=300,
                                min_frequency=1)


@pytest.fixture
def base_dir(tmp_path, tokenizer):
    return save_pretrained(tiny_model(tokenizer.vocab_size), tmp_path / "base", tokenizer)


def lora_model(base_dir):
    model = load_pretrained(base_dir).train()
    inject_lora(model, LORA.targets, LORA.rank, LORA.alpha, LORA.dropout)
    mark_only_lora_trainable(model)
    return model


def run(tmp_path, name, tokenizer, base_dir, held: bool):
    torch.manual_seed(0)
    model = lora_model(base_dir)
    dtypes = []
    out = RunDir(tmp_path / name)
    out.prepare(resume=False, overwrite=False)
    result = train(model, tokenizer, random_split(24, tokenizer.vocab_size, 2), random_split(8, tokenizer.vocab_size, 3),
                   config(amp="bf16", epochs=1), out, CPU, LORA,
                   on_step_end=lambda s: dtypes.append(model.model.encoder.layers[0].fc1.weight.dtype),
                   base_dir=base_dir if held else None)
    return model, result, out, dtypes


def test_training_with_bf16_frozen_weights_equals_fp32_frozen_weights_and_saves_the_same_checkpoints(
        tmp_path, tokenizer, base_dir):
    fp32_model, fp32_result, fp32_run, fp32_dtypes = run(tmp_path, "fp32", tokenizer, base_dir, held=False)
    held_model, held_result, held_run, held_dtypes = run(tmp_path, "held", tokenizer, base_dir, held=True)
    assert set(fp32_dtypes) == {torch.float32} and set(held_dtypes) == {torch.bfloat16}  # it did hold them
    losses = lambda r: [(h["step"], h["loss"]) for h in r.history if "loss" in h]
    assert losses(held_result) == losses(fp32_result)  # autocast's cast is the same rounding
    for which in ("best", "last"):
        expected = load_file(fp32_run.path / which / "model.safetensors")
        got = load_file(held_run.path / which / "model.safetensors")
        assert expected.keys() == got.keys()
        for key in expected:  # fp32 base + adapter, bit for bit
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), (which, key)
    for (name, a), (_, b) in zip(fp32_model.state_dict().items(), held_model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # the caller gets fp32 back
    assert id(held_model.lm_head.weight) not in packed_weights._copies  # and no held copy is left


def test_only_frozen_untied_fp32_linears_are_held(base_dir):
    model = lora_model(base_dir)
    model.model.decoder.layers[0].fc2.weight.requires_grad_(True)  # trainable: stays fp32
    originals = hold_frozen_linears_in(model, torch.bfloat16, base_dir)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.encoder.layers.0.fc1.weight"] == torch.bfloat16
    assert dtypes["model.encoder.layers.0.self_attn.q_proj.weight"] == torch.bfloat16  # LoRA base
    assert dtypes["model.encoder.layers.0.self_attn.q_proj.lora_a"] == torch.float32
    assert dtypes["model.decoder.layers.0.fc2.weight"] == torch.float32
    assert dtypes["model.shared.weight"] == torch.float32  # the tied embedding / LM head
    assert model.lm_head.weight is model.model.shared.weight
    assert "model.decoder.layers.0.fc2.weight" not in originals.names
    if packed_weights.BF16_AVAILABLE:  # held weights get oneDNN packs; the tied fp32 one does not
        packed = set(packed_weights._packs)
        assert id(model.model.encoder.layers[0].fc1.weight) in packed
        assert id(model.model.encoder.layers[0].self_attn.q_proj.weight) in packed
        assert id(model.lm_head.weight) not in packed
    # the tied LM head multiplies with a held bf16 copy instead of casting the embedding per call
    held = packed_weights._copies[id(model.lm_head.weight)].made
    assert held.dtype == torch.bfloat16 and torch.equal(held, model.model.shared.weight.bfloat16())
    assert all(name.endswith(".weight") for name in originals.names)


def test_nothing_is_held_when_the_directory_no_longer_matches_the_weights(base_dir):
    model = lora_model(base_dir)
    with torch.no_grad():
        model.model.encoder.layers[0].fc1.weight.add_(1.0)
    assert hold_frozen_linears_in(model, torch.bfloat16, base_dir) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_read_tensors_reads_only_the_named_tensors_and_names_what_is_missing(tmp_path, base_dir):
    names = ["model.encoder.layers.0.fc1.weight", "model.decoder.layers.0.fc2.bias"]
    full = load_file(base_dir / "model.safetensors")
    got = read_tensors(base_dir, names)
    assert got.keys() == set(names) and all(torch.equal(got[n], full[n]) for n in names)
    # a checkpoint saved from BartModel: no `model.` prefix
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((base_dir / "config.json").read_text())
    save_file({k.removeprefix("model."): v for k, v in full.items()}, bare / "model.safetensors")
    assert torch.equal(read_tensors(bare, names)[names[0]], full[names[0]])
    weights_only_bin = tmp_path / "bin"
    weights_only_bin.mkdir()
    (weights_only_bin / "config.json").write_text((base_dir / "config.json").read_text())
    torch.save(full, weights_only_bin / "pytorch_model.bin")
    assert torch.equal(read_tensors(weights_only_bin, names)[names[1]], full[names[1]])
    with pytest.raises(ModelError, match="does not hold model.encoder.layers.9.fc1.weight"):
        read_tensors(base_dir, ["model.encoder.layers.9.fc1.weight"])

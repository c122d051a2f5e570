"""Hugging Face checkpoints in and out, with Transformers as the oracle, and every bad case's error."""

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models.checkpoint as checkpoint
from models.bart import BartForConditionalGeneration, count_parameters
from models.checkpoint import load_pretrained, load_state_dict_from_dir, save_pretrained
from models.config import BartConfig
from models.errors import ModelError
from tests.oracle import PARITY_CONFIGS as CONFIGS
from tests.oracle import hf_config, hf_model, padded_batch

@torch.no_grad()
def assert_same_outputs(ours: BartForConditionalGeneration, theirs) -> None:
    input_ids, attention_mask, labels = padded_batch(theirs.config.vocab_size)
    mine = ours(input_ids, attention_mask=attention_mask, labels=labels)
    ref = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(mine.logits, ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(mine.encoder_hidden, ref.encoder_last_hidden_state, rtol=0, atol=1e-4)
    torch.testing.assert_close(mine.loss, ref.loss, rtol=0, atol=1e-4)


def save_bin(theirs, directory) -> None:
    """Transformers 5 writes safetensors only (safe_serialization=False is ignored), so the .bin
    checkpoint is written as Transformers 4 wrote it: torch.save of the full state dict."""
    theirs.config.save_pretrained(directory)
    torch.save(theirs.state_dict(), os.path.join(directory, "pytorch_model.bin"))


def our_model(config: transformers.BartConfig | None = None, **generation) -> BartForConditionalGeneration:
    """Ours with random weights; Transformers 5 keeps generation settings off its model config."""
    torch.manual_seed(0)
    config = config or hf_config()
    model = BartForConditionalGeneration(BartConfig.from_hf_dict(config.to_dict()).replace(**generation))
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model.eval()


# --- loading what Transformers writes ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_transformers_checkpoint_loads_with_their_logits_encoder_output_and_loss(tmp_path, name, fmt):
    theirs = hf_model(hf_config(**CONFIGS[name]))
    if fmt == "safetensors":
        theirs.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
    else:
        save_bin(theirs, tmp_path)
    ours = load_pretrained(tmp_path)
    assert not ours.training  # eval mode, as Transformers' from_pretrained returns it
    assert_same_outputs(ours, theirs)


def test_loaded_embedding_is_one_parameter_shared_by_all_four_names(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    shared = ours.model.shared.weight
    assert ours.lm_head.weight is shared
    assert ours.model.encoder.embed_tokens.weight is shared and ours.model.decoder.embed_tokens.weight is shared
    assert count_parameters(ours) == theirs.num_parameters()
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_outputs(load_pretrained(tmp_path), theirs)


def test_sharded_bin_checkpoint_loads(tmp_path):
    theirs = hf_model()
    theirs.config.save_pretrained(tmp_path)
    state = theirs.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        torch.save({n: state[n].clone() for n in shard_names}, tmp_path / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_outputs(load_pretrained(tmp_path), theirs)


@pytest.mark.parametrize("stored_as", ["lm_head.weight", "model.decoder.embed_tokens.weight"])
def test_tied_embedding_stored_under_one_alias_only_loads_and_ties(tmp_path, stored_as):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state[stored_as] = state.pop("model.shared.weight")
    assert not {"model.shared.weight", "model.encoder.embed_tokens.weight"} & state.keys()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.shared.weight
    assert_same_outputs(ours, theirs)


def test_untied_lm_head_loads_as_its_own_tensor(tmp_path):
    theirs = hf_model(hf_config(tie_word_embeddings=False))
    with torch.no_grad():  # our BART shares one embedding between encoder and decoder
        theirs.model.encoder.embed_tokens.weight.copy_(theirs.model.shared.weight)
        theirs.model.decoder.embed_tokens.weight.copy_(theirs.model.shared.weight)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.lm_head.weight is not ours.model.shared.weight
    assert not torch.equal(ours.lm_head.weight, ours.model.shared.weight)
    assert_same_outputs(ours, theirs)


def test_untied_checkpoint_with_separate_encoder_embedding_is_refused(tmp_path):
    hf_model(hf_config(tie_word_embeddings=False)).save_pretrained(tmp_path)  # random, all four differ
    with pytest.raises(ModelError, match="differs from model.shared.weight.*shares one token embedding"):
        load_pretrained(tmp_path)


def test_missing_final_logits_bias_defaults_to_zeros(tmp_path):
    theirs = hf_model()
    with torch.no_grad():
        theirs.final_logits_bias.zero_()  # what Transformers assumes for a checkpoint without one
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["final_logits_bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_pretrained(tmp_path)
    assert torch.equal(ours.final_logits_bias, torch.zeros(1, 97))
    assert_same_outputs(ours, theirs)


def test_safetensors_is_preferred_when_bin_is_also_present(tmp_path):
    theirs = hf_model(seed=0)
    theirs.save_pretrained(tmp_path)
    torch.save(hf_model(seed=1).state_dict(), tmp_path / "pytorch_model.bin")  # different weights
    assert_same_outputs(load_pretrained(tmp_path), theirs)


def test_checkpoint_dtype_is_kept_unless_one_is_asked_for(tmp_path):
    save_pretrained(our_model().to(torch.bfloat16), tmp_path)
    kept = load_pretrained(tmp_path)
    assert {p.dtype for p in kept.state_dict().values()} == {torch.bfloat16}
    widened = load_pretrained(tmp_path, dtype="float32")
    assert {p.dtype for p in widened.state_dict().values()} == {torch.float32}
    torch.testing.assert_close(widened.model.shared.weight, kept.model.shared.weight.float(), rtol=0, atol=0)


def test_state_dict_from_dir_holds_the_stored_names_cast_on_request(tmp_path):
    hf_model().save_pretrained(tmp_path)
    state = load_state_dict_from_dir(tmp_path, dtype=torch.float16)
    assert "model.shared.weight" in state and "lm_head.weight" not in state
    assert {t.dtype for t in state.values()} == {torch.float16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_and_logits_bias_load_onto_the_requested_device(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, device="cuda")
    assert {t.device.type for t in list(ours.parameters()) + list(ours.buffers())} == {"cuda"}
    input_ids, attention_mask, _ = padded_batch(97)
    with torch.no_grad():
        logits = ours(input_ids.cuda(), attention_mask=attention_mask.cuda(), decoder_input_ids=input_ids.cuda()).logits
        ref = theirs(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=input_ids).logits
    torch.testing.assert_close(logits.cpu(), ref, rtol=0, atol=1e-4)


# --- saving what Transformers reads -----------------------------------------------------------

def test_saved_model_loads_in_transformers_with_equal_logits_and_our_generation_settings(tmp_path):
    ours = our_model(num_beams=4, length_penalty=2.0, min_length=5, max_length=30, no_repeat_ngram_size=3,
                     early_stopping=True, forced_bos_token_id=0)
    save_pretrained(ours, tmp_path)
    theirs = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same_outputs(ours, theirs)
    generation = theirs.generation_config
    assert (generation.num_beams, generation.length_penalty, generation.min_length, generation.max_length,
            generation.no_repeat_ngram_size, generation.early_stopping, generation.forced_bos_token_id) == \
        (4, 2.0, 5, 30, 3, True, 0)


def test_saved_untied_model_loads_in_transformers_with_equal_logits(tmp_path):
    ours = our_model(hf_config(tie_word_embeddings=False))
    assert ours.lm_head.weight is not ours.model.shared.weight
    save_pretrained(ours, tmp_path)
    theirs = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same_outputs(ours, theirs)
    assert torch.equal(load_pretrained(tmp_path).lm_head.weight, ours.lm_head.weight)


def test_saved_safetensors_store_the_tied_embedding_once_as_transformers_does(tmp_path):
    save_pretrained(our_model(), tmp_path)
    reference = tmp_path / "reference"
    hf_model().save_pretrained(reference)
    with safe_open(tmp_path / "model.safetensors", "pt") as ours, safe_open(reference / "model.safetensors", "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        assert ours.metadata() == {"format": "pt"}
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors"}


def test_save_then_load_round_trips_exactly(tmp_path):
    model = our_model()
    save_pretrained(model, tmp_path / "out")
    loaded = load_pretrained(tmp_path / "out")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tokenizer_files_are_written_inside_the_new_model_directory(tmp_path):
    calls = []

    class RecordingTokenizer:  # stands in for models.tokenizer's BartTokenizer.save(directory)
        def save(self, directory):
            calls.append(directory)
            (directory / "tokenizer.json").write_text("{}")

    target = tmp_path / "model"
    save_pretrained(our_model(), target, tokenizer=RecordingTokenizer())
    assert len(calls) == 1 and calls[0] != target  # written in the staging dir, renamed with the rest
    assert (target / "tokenizer.json").read_text() == "{}"


def test_failed_save_leaves_the_previous_checkpoint_intact_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "model"
    old = our_model()
    save_pretrained(old, target)
    before = sorted(p.name for p in target.iterdir())

    def crash(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(our_model(hf_config(encoder_layers=1)), target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the staging dir was removed
    reloaded = load_pretrained(target)
    assert torch.equal(reloaded.model.encoder.layers[1].fc1.weight, old.model.encoder.layers[1].fc1.weight)


def test_save_over_an_existing_model_replaces_it_whole(tmp_path):
    target = tmp_path / "model"
    save_pretrained(our_model(), target)
    (target / "stale.txt").write_text("from the old save")
    smaller = our_model(hf_config(encoder_layers=1))
    save_pretrained(smaller, target)
    assert not (target / "stale.txt").exists()
    assert load_pretrained(target).config.encoder_layers == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_save_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a model directory"):
        save_pretrained(our_model(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# --- bad checkpoints --------------------------------------------------------------------------

def test_missing_unexpected_and_misshapen_tensors_are_listed_in_one_error(tmp_path):
    hf_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.encoder.layers.0.fc1.weight"], state["model.decoder.layers.1.fc2.bias"]
    state["model.encoder.extra.weight"] = torch.zeros(2, 3)
    state["model.decoder.layers.0.fc1.weight"] = torch.zeros(64, 31)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ModelError) as err:
        load_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "missing (2)" in message
    assert "model.encoder.layers.0.fc1.weight [64, 32]" in message and "model.decoder.layers.1.fc2.bias [32]" in message
    assert "unexpected (1)" in message and "model.encoder.extra.weight [2, 3]" in message
    assert "model.decoder.layers.0.fc1.weight: expected [64, 32], found [64, 31]" in message


def test_vocabulary_size_disagreeing_with_config_names_each_misshapen_tensor(tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(ModelError) as err:
        load_pretrained(tmp_path)
    assert "model.shared.weight: expected [100, 32], found [97, 32]" in str(err.value)
    assert "final_logits_bias: expected [1, 100], found [1, 97]" in str(err.value)


def test_checkpoint_without_any_embedding_name_says_which_names_were_accepted(tmp_path):
    hf_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.shared.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"model.shared.weight \[97, 32\] \(or any of its tied names.*lm_head.weight"):
        load_pretrained(tmp_path)


def test_directory_without_weights_says_which_files_were_looked_for(tmp_path):
    hf_config().save_pretrained(tmp_path)
    (tmp_path / "tf_model.h5").write_bytes(b"")
    with pytest.raises(ModelError) as err:
        load_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "no model weights" in message
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert name in message
    assert "tf_model.h5" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_safetensors_file_is_named_in_the_error(tmp_path, damage):
    hf_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    with pytest.raises(ModelError, match=rf"{weights}: not a readable safetensors file.*corrupt"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_bin_file_is_named_in_the_error(tmp_path, damage):
    save_bin(hf_model(), tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 20)
    with pytest.raises(ModelError, match=rf"{weights}: not a readable PyTorch checkpoint.*corrupt"):
        load_pretrained(tmp_path)


class Payload:
    """Any pickled object: weights_only loading must refuse to rebuild it."""


def test_bin_holding_pickled_objects_is_refused_not_unpickled(tmp_path):
    theirs = hf_model()
    theirs.config.save_pretrained(tmp_path)
    torch.save({**theirs.state_dict(), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled Python objects.*weights_only=True"):
        load_pretrained(tmp_path)


def test_shard_index_naming_a_missing_shard_is_named_in_the_error(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match=rf"model.safetensors.index.json: shard files missing: {shard.name}"):
        load_pretrained(tmp_path)


def test_config_that_is_not_bart_is_refused_naming_the_file(tmp_path):
    transformers.T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=97).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=rf"{tmp_path / 'config.json'}: model_type is 't5', not 'bart'"):
        load_pretrained(tmp_path)


def test_directory_without_config_json_is_a_clear_error(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelError, match=rf"{tmp_path}: no config.json"):
        load_pretrained(tmp_path)


def test_unknown_dtype_name_is_a_clear_error(tmp_path):
    hf_model().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        load_pretrained(tmp_path, dtype="float8")

"""Our BART against Transformers' on the same weights, plus shapes, presets and config reading."""

import json

import pytest
import torch
import transformers

from models.bart import (ACTIVATIONS, IN_PLACE_ACTIVATIONS, BartForConditionalGeneration, count_parameters,
                         shift_right)
from models import bart, onednn_linear
from models.packed_weights import Linear
from models.config import PRESETS, BartConfig, preset
from models.errors import ModelError
from tests.oracle import PARITY_CONFIGS, hf_config, padded_batch, twin_models

# The GUIDE's table: BartForConditionalGeneration parameters, tied embedding counted once.
EXPECTED_PARAMETERS = {
    "distilbart-cnn-12-6": 305_510_400,
    "distilbart-cnn-6-6": 229_933_056,
    "distilbart-xsum-12-3": 255_120_384,
    "distilbart-xsum-12-1": 221_527_040,
    "bart-large": 406_291_456,
    "bart-base": 139_420_416,
}

@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_preset_parameter_count_matches_the_published_model(name):
    with torch.device("meta"):
        model = BartForConditionalGeneration(preset(name))
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]


def test_layer_shapes_follow_the_config():
    config = preset("distilbart-cnn-12-6")
    with torch.device("meta"):
        model = BartForConditionalGeneration(config)
    assert len(model.model.encoder.layers) == 12 and len(model.model.decoder.layers) == 6
    layer = model.model.decoder.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (1024, 1024)
    assert layer.encoder_attn.k_proj.weight.shape == (1024, 1024)
    assert layer.fc1.weight.shape == (4096, 1024) and layer.fc2.weight.shape == (1024, 4096)
    # Learned positions carry BART's offset of 2 extra rows.
    assert model.model.encoder.embed_positions.weight.shape == (1026, 1024)
    assert model.lm_head.weight is model.model.shared.weight
    assert model.final_logits_bias.shape == (1, 50264)


def test_state_dict_keys_equal_transformers():
    config = hf_config()
    ours = BartForConditionalGeneration(BartConfig.from_hf_dict(config.to_dict()))
    theirs = transformers.BartForConditionalGeneration(config)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.state_dict().items())


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_encoder_output_and_loss_match_transformers_on_padded_batch(name):
    config = hf_config(**PARITY_CONFIGS[name])
    ours, theirs = twin_models(config)
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        got = ours(input_ids, attention_mask, labels=labels)
    torch.testing.assert_close(got.encoder_hidden, expected.encoder_last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-4, rtol=1e-4)


def test_loss_from_target_positions_only_equals_full_logits_loss():
    ours, _ = twin_models(hf_config())
    input_ids, attention_mask, labels = padded_batch(97)
    with torch.no_grad():
        full = ours(input_ids, attention_mask, labels=labels, loss_reduction="sum")
        sparse = ours(input_ids, attention_mask, labels=labels, loss_reduction="sum", return_logits=False)
    assert sparse.logits is None
    assert full.num_target_tokens == sparse.num_target_tokens == int((labels != -100).sum())
    torch.testing.assert_close(sparse.loss, full.loss)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_without_a_gradient_runs_the_lm_head_over_a_few_rows_at_a_time(monkeypatch, reduction):
    ours, _ = twin_models(hf_config())
    input_ids, attention_mask, labels = padded_batch(97)
    targets = int((labels != -100).sum())
    rows_per_call = []
    ours.lm_head.register_forward_hook(lambda module, args, out: rows_per_call.append(out.shape[0]))
    with torch.no_grad():
        whole = ours(input_ids, attention_mask, labels=labels, loss_reduction=reduction, return_logits=False).loss
        assert rows_per_call == [targets]  # at most HEAD_CHUNK_ROWS rows: one product, as before
        monkeypatch.setattr(bart, "HEAD_CHUNK_ROWS", 3)
        chunked = ours(input_ids, attention_mask, labels=labels, loss_reduction=reduction, return_logits=False).loss
    assert rows_per_call[1:] == [3] * (targets // 3) + ([targets % 3] if targets % 3 else [])
    torch.testing.assert_close(chunked, whole)
    recorded = ours(input_ids, attention_mask, labels=labels, loss_reduction=reduction, return_logits=False).loss
    assert rows_per_call[-1] == targets  # a loss to differentiate gets its logits in one product
    torch.testing.assert_close(recorded.detach(), whole)


@pytest.mark.parametrize("products", ["default", "onednn"])
def test_gradients_match_transformers_in_training_mode_without_dropout(products, monkeypatch):
    if products == "onednn":  # these fp32 products are below MIN_MACS: force models/onednn_linear.py
        monkeypatch.setattr(onednn_linear, "MIN_MACS", 0)
        ran = []
        linear = onednn_linear.linear
        monkeypatch.setattr(onednn_linear, "linear", lambda *args: ran.append(1) or linear(*args))
    config = hf_config(dropout=0.0)
    ours, theirs = twin_models(config)
    ours.train(), theirs.train()
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    ours(input_ids, attention_mask, labels=labels).loss.backward()
    their_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    if products == "onednn":
        assert len(ran) == sum(1 for m in ours.modules() if isinstance(m, Linear))  # every Linear, once


def test_incremental_decoding_with_cache_matches_full_forward():
    ours, _ = twin_models(hf_config(decoder_layers=3))
    input_ids, attention_mask, labels = padded_batch(97)
    decoder_ids = shift_right(labels, 1, 2)
    with torch.no_grad():
        memory = ours.encode(input_ids, attention_mask)
        full = ours.decode(decoder_ids, memory, attention_mask)
        cache = ours.new_cache()
        steps = [ours.decode(decoder_ids[:, t:t + 1], memory, attention_mask, cache=cache)
                 for t in range(decoder_ids.shape[1])]
    assert cache.length == decoder_ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_chunks_longer_than_one_token_see_the_right_prefix():
    ours, _ = twin_models(hf_config())
    input_ids, attention_mask, labels = padded_batch(97)
    decoder_ids = shift_right(labels, 1, 2)
    with torch.no_grad():
        memory = ours.encode(input_ids, attention_mask)
        full = ours.decode(decoder_ids, memory, attention_mask)
        cache = ours.new_cache()
        first = ours.decode(decoder_ids[:, :4], memory, attention_mask, cache=cache)
        rest = ours.decode(decoder_ids[:, 4:], memory, attention_mask, cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_shift_right_starts_with_decoder_start_and_replaces_ignored_labels_with_pad():
    labels = torch.tensor([[5, 6, 7], [8, -100, -100]])
    assert shift_right(labels, pad_token_id=1, decoder_start_token_id=2).tolist() == [[2, 5, 6], [2, 8, 1]]


def test_config_reads_hf_json_ignoring_unknown_keys_and_keeping_generation_defaults(tmp_path):
    config = json.loads(hf_config().to_json_string())
    config.update({"some_future_key": 1, "num_beams": 2, "task_specific_params": {"summarization": {}}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"num_beams": 4, "length_penalty": 2.0, "min_length": 56, "max_length": 142, "no_repeat_ngram_size": 3,
         "forced_bos_token_id": 0, "forced_eos_token_id": 2, "decoder_start_token_id": 2, "early_stopping": True}))
    ours = BartConfig.from_dir(tmp_path)
    assert (ours.d_model, ours.vocab_size, ours.max_position_embeddings) == (32, 97, 40)
    # generation_config.json wins over config.json, as in Transformers.
    assert (ours.num_beams, ours.length_penalty, ours.min_length, ours.max_length) == (4, 2.0, 56, 142)
    assert (ours.no_repeat_ngram_size, ours.forced_bos_token_id, ours.early_stopping) == (3, 0, True)
    assert ours.extra["some_future_key"] == 1
    # What we write back, Transformers reads as the same architecture.
    back = transformers.BartConfig.from_dict(ours.to_hf_dict())
    assert (back.d_model, back.encoder_layers, back.vocab_size) == (32, 2, 97)


def test_config_that_is_not_bart_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    with pytest.raises(ModelError, match="model_type is 't5', not 'bart'"):
        BartConfig.from_dir(tmp_path)


def test_unsupported_activation_is_a_clear_error():
    with pytest.raises(ModelError, match="activation_function 'mish'"):
        BartForConditionalGeneration(PRESETS["tiny"].replace(activation_function="mish"))


def test_input_longer_than_positions_is_a_clear_error():
    model = BartForConditionalGeneration(BartConfig.from_hf_dict(hf_config().to_dict()))
    with pytest.raises(ModelError, match="longer than the model's 40 positions"):
        model.encode(torch.ones(1, 41, dtype=torch.long))


def test_set_dropout_matches_a_model_built_with_that_dropout():
    from models.bart import set_dropout

    config = BartConfig.from_hf_dict(hf_config(dropout=0.3).to_dict())
    torch.manual_seed(0)
    built = BartForConditionalGeneration(config).train()
    torch.manual_seed(0)
    changed = BartForConditionalGeneration(config.replace(dropout=0.0)).train()
    set_dropout(changed, 0.3)
    input_ids, attention_mask, labels = padded_batch(97)
    torch.manual_seed(1)
    expected = built(input_ids, attention_mask, labels=labels).loss
    torch.manual_seed(1)
    assert torch.equal(changed(input_ids, attention_mask, labels=labels).loss, expected)
    assert changed.config.dropout == 0.3
    with pytest.raises(ModelError, match="dropout must be in"):
        set_dropout(changed, 1.5)


@pytest.mark.parametrize("name", sorted(IN_PLACE_ACTIVATIONS))
def test_in_place_activation_equals_its_out_of_place_form_and_reuses_the_input(name):
    x = torch.randn(3, 5, 64) * 3
    expected = ACTIVATIONS[name](x.clone())
    out = IN_PLACE_ACTIVATIONS[name](x)
    assert torch.equal(out, expected)
    assert out.data_ptr() == x.data_ptr()


def test_feed_forward_overwrites_fc1_output_only_when_no_graph_is_recorded():
    torch.manual_seed(0)
    layer = BartForConditionalGeneration(PRESETS["tiny"]).model.encoder.layers[0].eval()
    fc1_outputs = []
    layer.fc1.register_forward_hook(lambda module, args, out: fc1_outputs.append((out, out.clone())))
    x = torch.randn(2, 7, PRESETS["tiny"].d_model, requires_grad=True)
    recorded = layer.feed_forward(x)
    with torch.inference_mode():
        in_place = layer.feed_forward(x.detach())
    assert torch.equal(in_place, recorded)
    (recorded_fc1, recorded_before), (inference_fc1, inference_before) = fc1_outputs
    assert torch.equal(recorded_fc1, recorded_before)
    assert torch.equal(inference_fc1, ACTIVATIONS["gelu"](inference_before))

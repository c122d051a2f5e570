"""Export: merged Hugging Face model dirs (Transformers loads them) and PEFT adapters (PEFT loads
them, and ours loads PEFT's), with Transformers and PEFT as the oracles; the CLI's errors."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpointing import RunDir
from engine.export import main
from engine.lora import LoRAConfig, inject_lora, lora_layers, save_adapter
from engine.peft_adapter import load_peft_adapter
from models.bart import BartForConditionalGeneration
from models.checkpoint import load_pretrained, save_pretrained
from models.config import BartConfig
from models.errors import ModelError
from models.generate import generate
from models.tokenizer import train_bart_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.utils.logging.set_verbosity_error()

# Generation settings that differ from every default, so a lost generation_config.json shows.
GENERATION = dict(num_beams=3, max_length=12, min_length=3, no_repeat_ngram_size=2, length_penalty=1.5,
                  early_stopping=True, forced_bos_token_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bart_tokenizer(["the patient reports chest pain", "no fever, mild cough since monday"] * 8,
                                vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A random base model saved as a Hugging Face directory (what `--model` of a LoRA run names)."""
    torch.manual_seed(0)
    config = BartConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=40, d_model=32, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, init_std=0.2, **GENERATION)
    model = BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_()
        model.final_logits_bias[0, 2] += 2.0  # EOS within reach, so beams finish at different steps
    return save_pretrained(model, tmp_path_factory.mktemp("base") / "model", tokenizer)


def train_lora_run(run_path, base_dir, tokenizer, lora: LoRAConfig, seed: int = 0) -> BartForConditionalGeneration:
    """A LoRA run directory as train.py leaves it, with random non-zero adapters standing in for training.

    Returns the model with its adapters unmerged: the reference every export must reproduce."""
    model = load_pretrained(base_dir)
    inject_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * 0.3)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)
            if lora.train_biases:
                layer.bias.add_(torch.randn(layer.bias.shape, generator=g) * 0.3)
    run = RunDir(run_path)
    run.prepare(resume=False, overwrite=False)
    run.write_run_config({"model": str(base_dir), "lora": True})
    run.save(run.best, model, tokenizer, lora)
    return model.eval()


LORA_CASES = {
    "q,v": LoRAConfig(rank=4, alpha=8.0, targets="q_proj,v_proj"),
    "all-linear+biases": LoRAConfig(rank=2, alpha=5.0, targets="all-linear", train_biases=True),
}


@pytest.fixture(scope="module", params=list(LORA_CASES))
def lora_run(request, tmp_path_factory, base_dir, tokenizer):
    run_path = tmp_path_factory.mktemp("run") / "run"
    return run_path, train_lora_run(run_path, base_dir, tokenizer, LORA_CASES[request.param]), LORA_CASES[request.param]


def batch(vocab_size: int):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 1
    decoder_ids = torch.randint(4, vocab_size, (3, 7), generator=g)
    decoder_ids[:, 0] = 2
    return ids, mask, decoder_ids


@torch.no_grad()
def logits_of(model, vocab_size: int) -> torch.Tensor:
    ids, mask, decoder_ids = batch(vocab_size)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    return out.logits


def assert_same_logits(ours, theirs, vocab_size: int, atol: float = 1e-5) -> None:
    torch.testing.assert_close(logits_of(ours, vocab_size), logits_of(theirs, vocab_size), rtol=0, atol=atol)


# Merging rounds W + s*B*A to fp32 once per layer, where the unmerged forward rounds x*W and x*A*B
# separately; through a random net with logits of size ~10 that moves them by up to ~3e-5.
MERGE_ATOL = 1e-4


def their_peft_adapter(directory, base_dir, seed: int = 3, **lora_kwargs):
    """A PEFT adapter written by PEFT itself on Transformers' copy of the base, with random non-zero weights."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **lora_kwargs)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or (lora_kwargs.get("bias") == "lora_only" and name.endswith("base_layer.bias")):
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory)
    return model.eval()


# --- merged export ---------------------------------------------------------------------------


def test_exported_run_loads_in_transformers_with_our_logits_and_generated_ids(tmp_path, lora_run):
    run_path, ours, _ = lora_run
    out = tmp_path / "export"
    assert main(["--model", str(run_path), "--out", str(out)]) == 0  # a run dir stands for its best/
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "adapter").exists() and not any(out.glob("training_state*"))

    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    exported = load_pretrained(out)
    vocab = ours.config.vocab_size
    assert_same_logits(exported, theirs, vocab)
    assert_same_logits(ours, theirs, vocab, atol=MERGE_ATOL)  # the merged weights compute the adapted model

    ids, mask, _ = batch(vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(ids, attention_mask=mask)  # settings from the exported generation_config.json
    assert theirs.generation_config.num_beams == GENERATION["num_beams"]
    mine = generate(exported, ids, mask)
    assert mine.shape == expected.shape and torch.equal(mine, expected), f"\nours:\n{mine}\ntheirs:\n{expected}"


def test_exported_tokenizer_loads_in_transformers_with_our_ids(tmp_path, lora_run, tokenizer):
    run_path, _, _ = lora_run
    main(["--model", str(run_path / "best"), "--out", str(tmp_path / "export")])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "the patient reports mild fever"
    assert theirs(text)["input_ids"] == tokenizer.encode(text)


def test_base_model_plus_our_adapter_merges_to_the_checkpoints_weights(tmp_path, lora_run, base_dir):
    run_path, _, _ = lora_run
    out = tmp_path / "export"
    assert main(["--model", str(base_dir), "--adapter", str(run_path / "best" / "adapter"), "--out", str(out)]) == 0
    merged, checkpoint = load_file(out / "model.safetensors"), load_file(run_path / "best" / "model.safetensors")
    assert merged.keys() == checkpoint.keys()
    for name in checkpoint:
        torch.testing.assert_close(merged[name], checkpoint[name], rtol=0, atol=1e-6, msg=name)
    base = load_file(base_dir / "model.safetensors")
    assert not torch.equal(merged["model.encoder.layers.0.self_attn.q_proj.weight"],
                           base["model.encoder.layers.0.self_attn.q_proj.weight"])  # the adapter is in


def test_base_model_plus_peft_adapter_exports_merged_with_peft_logits(tmp_path, base_dir):
    theirs = their_peft_adapter(tmp_path / "peft", base_dir, r=4, lora_alpha=16, target_modules=["k_proj", "fc2"],
                                bias="lora_only")
    assert main(["--model", str(base_dir), "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "out")]) == 0
    merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    assert_same_logits(merged, theirs, merged.config.vocab_size, atol=MERGE_ATOL)
    with torch.no_grad():
        theirs.merge_adapter()  # PEFT's own merge, in place
    assert_same_logits(merged, theirs, merged.config.vocab_size)


def test_bf16_checkpoint_merges_in_fp32_and_keeps_its_dtype(tmp_path, base_dir):
    base = load_pretrained(base_dir, dtype=torch.bfloat16)
    save_pretrained(base, tmp_path / "base16")
    their_peft_adapter(tmp_path / "peft", base_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    assert main(["--model", str(tmp_path / "base16"), "--adapter", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "out")]) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.decoder.layers.1.self_attn.q_proj"
    adapter = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    delta = adapter[f"base_model.model.{name}.lora_B.weight"] @ adapter[f"base_model.model.{name}.lora_A.weight"] * 2
    expected = (base.get_parameter(f"{name}.weight").float() + delta).to(torch.bfloat16)
    assert merged[f"{name}.weight"].dtype == torch.bfloat16
    assert torch.equal(merged[f"{name}.weight"], expected)


# --- PEFT adapters out -----------------------------------------------------------------------


def test_adapter_only_export_loads_in_peft_with_our_logits(tmp_path, lora_run, base_dir):
    run_path, ours, lora = lora_run
    out = tmp_path / "peft"
    assert main(["--model", str(run_path), "--adapter-only", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert "base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.decoder.layers.1.fc2.base_layer.bias" in keys) == lora.train_biases

    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    assert_same_logits(ours, theirs, ours.config.vocab_size)


def test_adapter_config_is_what_peft_itself_writes(tmp_path, lora_run, base_dir):
    run_path, _, lora = lora_run
    main(["--model", str(run_path / "best"), "--adapter-only", "--out", str(tmp_path / "ours")])
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours["base_model_name_or_path"] == str(base_dir)  # from the run's run_config.json

    peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=ours["target_modules"], bias="lora_only" if lora.train_biases else "none",
                    base_model_name_or_path=str(base_dir),
                    inference_mode=True,  # as PeftModel.save_pretrained stamps it on the saved file
                    ).save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    theirs.pop("peft_version")  # PEFT's own version stamp; PEFT fills it in on reading
    ours["target_modules"], theirs["target_modules"] = sorted(ours["target_modules"]), sorted(theirs["target_modules"])
    assert {k: ours[k] for k in ours.keys() & theirs.keys()} == {k: theirs[k] for k in ours.keys() & theirs.keys()}
    if peft.__version__.startswith("0.21."):  # the version the file's field list was taken from
        assert ours.keys() == theirs.keys()


def test_adapter_only_base_model_can_be_named_and_short_names_become_hub_ids(tmp_path, lora_run):
    run_path, _, _ = lora_run
    main(["--adapter", str(run_path / "best" / "adapter"), "--adapter-only", "--out", str(tmp_path / "a"),
          "--base-model", "me/base"])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/base"
    settings = json.loads((run_path / "run_config.json").read_text())
    copy = tmp_path / "run"
    shutil.copytree(run_path, copy)
    (copy / "run_config.json").write_text(json.dumps({**settings, "model": "sshleifer/distilbart-cnn-12-6"}))
    main(["--model", str(copy), "--adapter-only", "--out", str(tmp_path / "b")])
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "sshleifer/distilbart-cnn-12-6"


# --- PEFT adapters in ------------------------------------------------------------------------

PEFT_CASES = {
    "q,v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear+biases": dict(r=2, lora_alpha=6, target_modules="all-linear", bias="lora_only"),
    "regex-with-exclude": dict(r=3, lora_alpha=3, target_modules=r"model\.decoder\..*(k_proj|fc1)",
                               exclude_modules=["encoder_attn.k_proj"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_written_adapter_loads_into_our_model_with_peft_logits(tmp_path, base_dir, case):
    theirs = their_peft_adapter(tmp_path / "peft", base_dir, **PEFT_CASES[case])
    ours = load_pretrained(base_dir)
    config = load_peft_adapter(ours, tmp_path / "peft")
    assert_same_logits(ours, theirs, ours.config.vocab_size)

    wrapped = sorted(n for n, _ in lora_layers(ours))
    their_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert wrapped == their_wrapped
    save_adapter(ours, tmp_path / "ours", config)  # the returned config describes the layers exactly


def peft_dir_with(tmp_path, base_dir, **changes):
    their_peft_adapter(tmp_path / "peft", base_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return tmp_path / "peft"


@pytest.mark.parametrize("changes, named", [
    (dict(use_dora=True), "use_dora"),
    (dict(use_rslora=True), "use_rslora"),
    (dict(bias="all"), "bias='all'"),
    (dict(target_modules=["q_proj", "query_key_value"]), "'query_key_value'"),
    (dict(target_modules=["self_attn"]), "not Linear"),
    (dict(target_modules=["q_proj", "lm_head"]), "tied"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="PREFIX_TUNING"), "peft_type"),
    (dict(r=2), "has shape"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_peft_adapters_are_refused_naming_the_field(tmp_path, base_dir, changes, named):
    directory = peft_dir_with(tmp_path, base_dir, **changes)
    model = load_pretrained(base_dir)
    with pytest.raises(ModelError, match="adapter_config.json|adapter_model.safetensors") as error:
        load_peft_adapter(model, directory)
    assert named in str(error.value)
    assert not any(True for _ in lora_layers(model))  # refused before the model was touched


def test_peft_weights_that_do_not_fit_the_config_are_listed(tmp_path, base_dir):
    directory = peft_dir_with(tmp_path, base_dir, target_modules=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(ModelError, match="missing .*k_proj.lora_a"):
        load_peft_adapter(load_pretrained(base_dir), directory)


# --- CLI errors ------------------------------------------------------------------------------


def assert_cli_error(capsys, argv, *fragments) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_directory_without_weights_is_a_cli_error(tmp_path, capsys, base_dir):
    (tmp_path / "empty").mkdir()
    shutil.copy(base_dir / "config.json", tmp_path / "empty")
    assert_cli_error(capsys, ["--model", str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
                     "no model weights found")
    assert not (tmp_path / "out").exists()


def test_missing_adapter_is_a_cli_error(tmp_path, capsys, base_dir):
    assert_cli_error(capsys, ["--model", str(base_dir), "--adapter", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "out")], "nope", "adapter directory not found")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_force_and_is_then_replaced_whole(tmp_path, capsys, base_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_cli_error(capsys, ["--model", str(base_dir), "--out", str(out)], str(out), "--force")
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["--model", str(base_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_output_that_would_replace_the_source_is_refused_even_with_force(tmp_path, capsys, lora_run):
    run_path, _, _ = lora_run
    assert_cli_error(capsys, ["--model", str(run_path), "--out", str(run_path), "--force"], "reads")
    assert (run_path / "best" / "model.safetensors").is_file()


def test_adapter_on_a_checkpoint_that_already_merged_it_is_refused(tmp_path, capsys, lora_run):
    run_path, _, _ = lora_run
    assert_cli_error(capsys, ["--model", str(run_path / "best"), "--adapter", str(run_path / "best" / "adapter"),
                              "--out", str(tmp_path / "out")], "already merged")


def test_adapter_only_on_a_full_finetune_checkpoint_is_a_cli_error(tmp_path, capsys, base_dir):
    assert_cli_error(capsys, ["--model", str(base_dir), "--adapter-only", "--out", str(tmp_path / "out")],
                     "not trained with LoRA")


def test_run_without_a_best_checkpoint_points_to_last(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text("{}")
    assert_cli_error(capsys, ["--model", str(tmp_path / "run"), "--out", str(tmp_path / "out")], "last")

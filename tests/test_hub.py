"""`--model` resolution: local directories, hub ids served offline from a huggingface_hub cache, and
the messages that say how to get a model that is not there."""

import hashlib
import os
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers

from models.checkpoint import load_pretrained
from models.errors import ModelError
from models.hub import resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_hf_model(**overrides):
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=40, **overrides)
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def cache_repo(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay `files` out as huggingface_hub caches a download; return the snapshot directory.

    models--ORG--NAME/blobs/<sha256> hold the contents, snapshots/<commit>/<file> are relative
    symlinks to them and refs/main names the commit.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub uses by default, HF_HUB_OFFLINE=1, and a record of any
    attempt to reach the hub."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads HF_HUB_CACHE once, at import (already done by transformers here), and
    # snapshot_download reads it from constants at call time: patch it where it is read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    network_calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: network_calls.append(a) or 1 / 0)
    yield cache, network_calls
    assert network_calls == [], "HF_HUB_OFFLINE=1 must keep every lookup local"


def test_cached_hub_id_resolves_offline_to_its_snapshot_and_loads_like_transformers(tmp_path, offline_cache):
    cache, _ = offline_cache
    theirs = tiny_hf_model()
    theirs.save_pretrained(tmp_path / "saved")
    snapshot = cache_repo(cache, "org/tiny-bart", tmp_path / "saved")
    # huggingface_hub's own scanner recognises the layout as a cached repo revision.
    [repo] = huggingface_hub.scan_cache_dir(cache).repos
    assert repo.repo_id == "org/tiny-bart" and [r.commit_hash for r in repo.revisions] == [COMMIT]

    assert resolve_model_dir("org/tiny-bart") == snapshot
    ours = load_pretrained("org/tiny-bart")
    input_ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        mine = ours(input_ids, decoder_input_ids=input_ids).logits
        ref = theirs(input_ids=input_ids, decoder_input_ids=input_ids).logits
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-4)


def test_explicit_cache_dir_is_searched(tmp_path, offline_cache):
    tiny_hf_model().save_pretrained(tmp_path / "saved")
    elsewhere = tmp_path / "elsewhere"
    snapshot = cache_repo(elsewhere, "org/tiny-bart", tmp_path / "saved")
    assert resolve_model_dir("org/tiny-bart", cache_dir=elsewhere) == snapshot


def test_cached_repo_with_only_bin_weights_resolves_and_loads(tmp_path, offline_cache):
    cache, _ = offline_cache
    theirs = tiny_hf_model()
    (tmp_path / "saved").mkdir()
    theirs.config.save_pretrained(tmp_path / "saved")
    torch.save(theirs.state_dict(), tmp_path / "saved" / "pytorch_model.bin")
    snapshot = cache_repo(cache, "org/old-bart", tmp_path / "saved")
    assert resolve_model_dir("org/old-bart") == snapshot
    assert torch.equal(load_pretrained("org/old-bart").lm_head.weight, theirs.lm_head.weight)


def test_uncached_hub_id_offline_says_how_to_download_it(offline_cache):
    with pytest.raises(ModelError) as err:
        resolve_model_dir("sshleifer/distilbart-cnn-12-6")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message
    assert "hf download sshleifer/distilbart-cnn-12-6" in message
    assert "huggingface-cli download sshleifer/distilbart-cnn-12-6" in message
    assert "local model directory" in message and "--model tiny" in message


def test_preset_short_name_is_looked_up_as_its_published_hub_id(offline_cache):
    with pytest.raises(ModelError, match="hf download sshleifer/distilbart-cnn-12-6"):
        resolve_model_dir("distilbart-cnn-12-6")


def test_from_scratch_preset_name_is_not_looked_up_on_the_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelError, match="'tiny' is a preset that is trained from scratch"):
        resolve_model_dir("tiny")


def test_hub_id_without_huggingface_hub_installed_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ModelError) as err:
        resolve_model_dir("sshleifer/distilbart-cnn-12-6")
    assert "pip install huggingface_hub" in str(err.value)
    assert "--model tiny" in str(err.value)


def test_local_directory_is_returned_without_touching_the_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    assert resolve_model_dir("org/name") == Path("org/name")  # a local dir wins over a hub id


@pytest.mark.parametrize("path", ["./no-such-model", "/no/such/model/dir", "../x/y/z", "~/no-such-model-dir"])
def test_missing_local_path_is_a_clear_error_not_a_hub_lookup(path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model_dir(path)


def test_file_given_as_model_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file; --model takes a model directory or a hub id"):
        resolve_model_dir(str(tmp_path / "model.safetensors"))

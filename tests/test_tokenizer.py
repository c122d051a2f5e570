"""models/tokenizer.py against Transformers' BartTokenizerFast as the oracle."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from models.tokenizer import (
    BartTokenizer,
    TokenizerError,
    TokenizerFilesNotFoundError,
    load_tokenizer,
    train_bart_tokenizer,
)

transformers = pytest.importorskip("transformers")  # test-only oracle

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MTS_TRAIN = DATASETS / "mts-dialog" / "MTS-Dialog-TrainingSet.csv"

# Always trained on, so the tests run (on a smaller vocab) even without the shared datasets.
INLINE_CORPUS = [
    "Doctor: What brings you in today? Patient: I have had chest pain and shortness of breath for two days.",
    "Patient is a 67-year-old male with a history of hypertension, type 2 diabetes and hyperlipidemia.",
    "Medications: metformin 500 mg PO BID, lisinopril 10 mg daily, aspirin 81 mg daily.",
    "Blood pressure 140/90, heart rate 88, temperature 37.2 °C, oxygen saturation 96% on room air.",
    "Assessment: community-acquired pneumonia. Plan: start azithromycin and follow up in one week.",
    "She denies fever, chills, nausea or vomiting. No known drug allergies.",
    "HbA1c was 7.2% last month; we discussed diet, exercise and glucose monitoring.",
    "The patient reports mild headache and dizziness after starting the new medication.",
    "Family history: mother with breast cancer, father with coronary artery disease.",
    "Doctor: Any history of surgery? Patient: I had my appendix removed when I was twelve.",
] * 3

SAMPLE_TEXTS = [
    "Pt c/o SOB, BP 140/90, HbA1c 7.2%; Rx: ASA 81 mg PO qd",
    "Temp 38.5°C, SpO2 92% on RA; 0.25 mg/kg q6h x 3 doses, K+ 3.1 mmol/L",
    "naïve patient, 5 µg IV – see note; café 😀 medication 药物 検査",
    "a   b\n\n\tc",
    "   leading and trailing spaces   ",
    "",
    " ",
    "1234567890 3.14159 1e-5 2024-01-31",
    "Patient has <mask> pain",  # BART's <mask> swallows the space before it
    "literal specials <s> and </s> and <pad> inside text",
]
TEXTS_WITHOUT_MASK = [t for t in SAMPLE_TEXTS if "<mask>" not in t]


def _corpus() -> list[str]:
    texts = list(INLINE_CORPUS)
    if MTS_TRAIN.is_file():
        with MTS_TRAIN.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                texts += [row["dialogue"], row["section_text"]]
    return texts


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def ours(corpus):
    return train_bart_tokenizer(corpus, vocab_size=1500)


@pytest.fixture(scope="module")
def saved_dir(ours, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok") / "saved"
    ours.save(directory)
    return directory


def _copy(saved_dir: Path, destination: Path, names: list[str]) -> Path:
    destination.mkdir()
    for name in names:
        shutil.copy(saved_dir / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def hf(saved_dir):
    return transformers.BartTokenizerFast.from_pretrained(saved_dir)


@pytest.fixture(scope="module")
def long_texts(corpus):
    return sorted(corpus, key=len)[-6:] + SAMPLE_TEXTS


def test_special_tokens_have_bart_ids_and_mask_is_last(ours, hf):
    assert (ours.bos_token_id, ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    assert ours.mask_token_id == ours.vocab_size - 1 == len(ours) - 1
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (
        0, 1, 2, 3, ours.mask_token_id)
    assert ours.vocab_size == len(hf)


def test_mask_token_absorbs_the_space_before_it(ours):
    # BART's <mask> is lstrip: "has <mask>" is "has" then <mask>, with no separate space token
    assert ours.encode("has <mask>") == ours.encode("has")[:-1] + [ours.mask_token_id, ours.eos_token_id]


def test_training_respects_vocab_size_and_learns_merges(ours, corpus):
    if MTS_TRAIN.is_file():  # the inline corpus alone is too small to fill 1500 entries
        assert ours.vocab_size == 1500
    # merges were learned: common words take far fewer tokens than bytes
    text = "Patient reports chest pain"
    assert len(ours.encode(text)) - 2 < len(text.encode("utf-8")) / 2


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_transformers_loading_tokenizer_json(ours, hf, text):
    assert ours.encode(text) == hf(text)["input_ids"]


def test_encode_matches_transformers_loading_vocab_and_merges_with_configs(ours, saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "vm", ["vocab.json", "merges.txt", "tokenizer_config.json",
                                                   "special_tokens_map.json"])
    theirs = transformers.BartTokenizerFast.from_pretrained(directory)
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    reloaded = load_tokenizer(directory)
    for text in SAMPLE_TEXTS:
        expected = ours.encode(text)
        assert theirs(text)["input_ids"] == expected, text
        assert auto(text)["input_ids"] == expected, text
        assert reloaded.encode(text) == expected, text


def test_encode_matches_transformers_loading_only_vocab_and_merges(ours, saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "bare", ["vocab.json", "merges.txt"])
    theirs = transformers.BartTokenizerFast.from_pretrained(directory)
    reloaded = load_tokenizer(directory)
    assert reloaded.vocab_size == ours.vocab_size and reloaded.mask_token_id == ours.mask_token_id
    # Without tokenizer_config.json, Transformers 5 does not give <mask> its lstrip, so "<mask>" texts
    # differ there by design; we keep BART's convention (lstrip) in both load paths.
    for text in TEXTS_WITHOUT_MASK:
        assert theirs(text)["input_ids"] == ours.encode(text) == reloaded.encode(text), text
    assert reloaded.encode("Patient has <mask> pain") == ours.encode("Patient has <mask> pain")


def test_auto_tokenizer_loads_saved_directory_with_same_ids(ours, saved_dir):
    auto = transformers.AutoTokenizer.from_pretrained(saved_dir)
    assert auto.model_max_length == ours.model_max_length
    for text in SAMPLE_TEXTS:
        assert auto(text)["input_ids"] == ours.encode(text), text


@pytest.mark.parametrize("max_length", [2, 3, 16, 64, None])
def test_batch_encode_truncation_matches_transformers_and_counts_cut_texts(ours, hf, long_texts, max_length):
    ids, n_truncated = ours.encode_batch_with_stats(long_texts, max_length=max_length)
    if max_length is None:
        expected = hf(long_texts)["input_ids"]
    else:
        expected = hf(long_texts, truncation=True, max_length=max_length)["input_ids"]
    assert ids == expected
    assert ours.encode_batch(long_texts, max_length=max_length) == expected
    full = hf(long_texts)["input_ids"]
    assert n_truncated == sum(max_length is not None and len(f) > max_length for f in full)
    if max_length is not None and max_length <= 16:
        assert n_truncated > 0  # the test would be vacuous otherwise


def test_truncation_keeps_eos_as_last_token(ours, long_texts):
    text = long_texts[0]
    full = ours.encode(text)
    assert len(full) > 20
    cut = ours.encode(text, max_length=20)
    assert len(cut) == 20
    assert cut[0] == ours.bos_token_id and cut[-1] == ours.eos_token_id
    assert cut[:-1] == full[:19]
    assert ours.encode("short", max_length=20) == ours.encode("short")


def test_encode_rejects_bad_arguments_with_clear_errors(ours):
    with pytest.raises(TokenizerError, match="max_length"):
        ours.encode("text", max_length=1)
    with pytest.raises(TokenizerError, match="item 1 is int"):
        ours.encode_batch(["text", 7])
    with pytest.raises(TokenizerError, match="expects a str"):
        ours.encode(None)


def test_decode_matches_transformers_skipping_special_tokens(ours, hf, long_texts):
    batch = ours.encode_batch(long_texts)
    for ids in batch:
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        # pad ids are never decoded by ours (see test_decode_drops_ignore_index_and_padding)
        without_pad = [i for i in ids if i != ours.pad_token_id]
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(without_pad, skip_special_tokens=False)
    assert ours.decode_batch(batch) == hf.batch_decode(batch, skip_special_tokens=True)
    # byte-level BPE is lossless: texts free of special-token strings come back exactly
    plain = [i for i, text in enumerate(long_texts) if "<" not in text]
    decoded = ours.decode_batch(batch)
    assert len(plain) > 10 and [decoded[i] for i in plain] == [long_texts[i] for i in plain]


def test_decode_drops_ignore_index_and_padding(ours, hf):
    ids = ours.encode("Pt c/o SOB, BP 140/90")
    labels = ids + [-100, -100]
    padded = ids + [ours.pad_token_id] * 3
    assert ours.decode(labels) == ours.decode(padded) == hf.decode(ids, skip_special_tokens=True)
    # with specials kept, <s> and </s> show but -100 and pad still do not
    assert ours.decode(labels, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.decode_batch([labels, padded]) == [ours.decode(ids)] * 2


def test_decode_accepts_tensors(ours):
    torch = pytest.importorskip("torch")
    ids = ours.encode("HbA1c 7.2%")
    labels = torch.tensor([ids + [-100], ids + [ours.pad_token_id]])
    assert ours.decode(labels[0]) == "HbA1c 7.2%"
    assert ours.decode_batch(labels) == ["HbA1c 7.2%"] * 2


def test_save_writes_all_files_atomically_for_transformers(saved_dir, ours):
    names = sorted(p.name for p in saved_dir.iterdir())
    # no temp files left behind
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                     "vocab.json"]
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BartTokenizer"
    assert config["model_max_length"] == ours.model_max_length
    assert config["mask_token"] == "<mask>" and config["pad_token"] == "<pad>"
    vocab = json.loads((saved_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == ours.vocab_size and vocab["<mask>"] == ours.mask_token_id
    assert (saved_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version")


def test_save_load_round_trip_keeps_fingerprint_and_ids(ours, saved_dir, tmp_path):
    reloaded = BartTokenizer.from_pretrained(saved_dir)
    assert reloaded.fingerprint == ours.fingerprint
    assert reloaded.encode_batch(SAMPLE_TEXTS) == ours.encode_batch(SAMPLE_TEXTS)
    # saving again over the same directory reproduces the same files
    reloaded.save(tmp_path / "again")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (saved_dir / name).read_bytes(), name
    # a tokenizer.json path works as well as its directory
    assert load_tokenizer(saved_dir / "tokenizer.json").fingerprint == ours.fingerprint


def test_model_max_length_round_trips(corpus, tmp_path):
    tok = train_bart_tokenizer(INLINE_CORPUS, vocab_size=300, model_max_length=512)
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).model_max_length == 512
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).model_max_length == 512


def test_training_is_deterministic_and_fingerprint_tracks_the_vocab(corpus, ours):
    assert train_bart_tokenizer(corpus, vocab_size=1500).fingerprint == ours.fingerprint
    smaller = train_bart_tokenizer(corpus, vocab_size=300)
    assert smaller.fingerprint != ours.fingerprint
    assert smaller.mask_token_id == smaller.vocab_size - 1


def test_loads_a_tokenizer_saved_by_transformers(ours, hf, tmp_path):
    hf.save_pretrained(tmp_path)
    theirs_reloaded = load_tokenizer(tmp_path)
    for text in SAMPLE_TEXTS:
        assert theirs_reloaded.encode(text) == ours.encode(text), text


def test_training_rejects_a_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(TokenizerError, match="too small"):
        train_bart_tokenizer(INLINE_CORPUS, vocab_size=200)


# --- load errors ------------------------------------------------------------------------------------

def test_missing_directory_or_files_raise_file_not_found_naming_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerFilesNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message and "vocab.json" in message and "merges.txt" in message
    # vocab.json alone is not enough
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerFilesNotFoundError):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json_raises_naming_the_file(saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "corrupt", ["tokenizer.json"])
    text = (directory / "tokenizer.json").read_text(encoding="utf-8")
    (directory / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*not valid JSON"):
        load_tokenizer(directory)

    spec = json.loads(text)
    spec["model"]["type"] = "WordPiece"
    (directory / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*model\.type"):
        load_tokenizer(directory)

    spec = json.loads(text)
    spec["model"]["vocab"] = "not a vocab"
    (directory / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*corrupt"):
        load_tokenizer(directory)


def test_corrupt_vocab_or_merges_raise_naming_the_file(saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "vm", ["vocab.json", "merges.txt"])
    good_merges = (directory / "merges.txt").read_text(encoding="utf-8")

    (directory / "merges.txt").write_text(good_merges + "a b c\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merges\.txt, line \d+"):
        load_tokenizer(directory)

    (directory / "merges.txt").write_text(good_merges + "zzzq qqqz\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merges\.txt.*vocab\.json"):
        load_tokenizer(directory)

    (directory / "merges.txt").write_text(good_merges, encoding="utf-8")
    (directory / "vocab.json").write_text('{"<s>": 0, ', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\.json.*not valid JSON"):
        load_tokenizer(directory)


def _write_vocab(directory: Path, vocab: dict) -> None:
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


def test_special_tokens_out_of_bart_order_raise_naming_the_file(saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "order", ["vocab.json", "merges.txt"])
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))

    swapped = dict(vocab, **{"<s>": 1, "<pad>": 0})  # RoBERTa-from-scratch order, not BART's
    _write_vocab(directory, swapped)
    with pytest.raises(TokenizerError, match=r"vocab\.json: BART needs <s> at id 0.*found id 1"):
        load_tokenizer(directory)

    mask_not_last = dict(vocab, **{"<extra>": len(vocab)})
    _write_vocab(directory, mask_not_last)
    with pytest.raises(TokenizerError, match=r"vocab\.json: BART needs <mask> at id"):
        load_tokenizer(directory)

    no_unk = {t: i for t, i in vocab.items() if t != "<unk>"}
    _write_vocab(directory, no_unk)
    with pytest.raises(TokenizerError, match=r"vocab\.json: BART needs <unk> at id 3"):
        load_tokenizer(directory)


def test_vocab_without_mask_gets_mask_appended_last(ours, saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "nomask", ["vocab.json", "merges.txt"])
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<mask>"]
    _write_vocab(directory, vocab)
    reloaded = load_tokenizer(directory)
    assert reloaded.mask_token_id == ours.mask_token_id == reloaded.vocab_size - 1
    assert reloaded.encode(SAMPLE_TEXTS[0]) == ours.encode(SAMPLE_TEXTS[0])


def test_corrupt_tokenizer_config_raises_naming_the_file(saved_dir, tmp_path):
    directory = _copy(saved_dir, tmp_path / "cfg", ["tokenizer.json"])
    (directory / "tokenizer_config.json").write_text('{"model_max_length": "long"}', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: field model_max_length"):
        load_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(directory)

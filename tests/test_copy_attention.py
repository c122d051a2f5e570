"""Guided copy attention: the alignment, the loss against Transformers' own attention, and training."""

import pytest
import torch

from data.batching import TokenizedSplit, collate
from engine.checkpointing import RunDir
from engine.copy_attention import NOT_COPIED, CopyAttentionLoss, copy_alignment, match_keys
from engine.lora import inject_lora, mark_only_lora_trainable
from engine.trainer import TrainConfig, accumulate_gradients, train
from models.bart import BartForConditionalGeneration
from models.config import BartConfig
from models.tokenizer import train_bart_tokenizer
from tests.oracle import hf_config, twin_models
from tests.test_trainer import tiny_model

CPU = torch.device("cpu")


def test_alignment_follows_copied_tokens_across_inserted_expansions():
    # "h/o HLD and" -> "history of ( h/o ) hyperlipidemia ( HLD ) and": copies resume after each insertion
    source = [0, 10, 11, 12, 2]
    target = [0, 20, 21, 30, 10, 31, 22, 30, 11, 31, 12, 2]
    assert copy_alignment(source, target) == [0, -1, -1, -1, 1, -1, -1, -1, 2, -1, 3, 4]


def test_alignment_skips_deleted_source_tokens_and_never_crosses():
    source = [0, 5, 6, 7, 8, 9, 2]
    target = [0, 5, 8, 6, 9, 2]  # 6 and 7 dropped after 5; 6 re-appears out of order
    alignment = copy_alignment(source, target)
    copied = [(j, i) for j, i in enumerate(alignment) if i != NOT_COPIED]
    assert all(source[i] == target[j] for j, i in copied)
    assert [i for _, i in copied] == sorted(i for _, i in copied)  # monotonic: no crossing pairs
    assert alignment[0] == 0 and alignment[-1] == len(source) - 1


def split_with_copies() -> TokenizedSplit:
    """Targets copy their (padded, uneven) sources with tokens inserted, as expansions do."""
    sources = [[0, 5, 6, 7, 8, 9, 10, 11, 2], [0, 12, 13, 14, 2], [0, 15, 16, 2]]
    targets = [[0, 5, 40, 41, 6, 7, 8, 42, 9, 2], [0, 12, 43, 13, 14, 2], [0, 44, 15, 16, 45, 2]]
    return TokenizedSplit(sources, targets)


def test_copy_loss_is_the_negative_log_of_transformers_cross_attention_at_the_aligned_positions():
    ours, theirs = twin_models(hf_config(attn_implementation="eager"))
    split = split_with_copies()
    batch = collate(split, [0, 1, 2], pad_token_id=1, decoder_start_token_id=2)
    copy_loss = CopyAttentionLoss(ours, split, weight=1.0)
    with torch.no_grad(), copy_loss.watching(ours):
        ours(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels)
        loss = copy_loss(batch)
        out = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     decoder_input_ids=batch.decoder_input_ids, output_attentions=True)
    head0 = out.cross_attentions[-1][:, 0]  # [batch, target, source], last decoder layer
    expected = 0.0
    for row, index in enumerate(batch.indices):
        for j, i in enumerate(copy_alignment(split.sources[index], split.targets[index])):
            if i != NOT_COPIED:
                expected -= float(head0[row, j, i].log())
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert copy_loss.num_copied(batch) == 7 + 5 + 4


def test_copy_loss_needs_a_forward_pass_inside_watching():
    model = tiny_model(50)
    split = split_with_copies()
    copy_loss = CopyAttentionLoss(model, split, weight=1.0)
    with pytest.raises(RuntimeError, match="forward pass"):
        copy_loss(collate(split, [0], 1, 2))


def test_four_micro_batches_of_one_give_the_gradients_of_one_batch_of_four_with_copy_loss():
    three = split_with_copies()
    split = TokenizedSplit(three.sources + [[0, 7, 8, 2]], three.targets + [[0, 46, 7, 8, 2]])
    results = []
    for groups in ([[0, 1, 2, 3]], [[0], [1], [2], [3]]):
        model = tiny_model(50, dropout=0.0)
        copy_loss = CopyAttentionLoss(model, split, weight=0.5)
        with copy_loss.watching(model):
            loss = accumulate_gradients(model, [collate(split, g, 1, 2) for g in groups], CPU, copy_loss=copy_loss)
        results.append((loss, copy_loss.step_mean, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_one, copy_one, one), (loss_four, copy_four, four) = results
    assert loss_one == pytest.approx(loss_four, rel=1e-5)
    assert copy_one == pytest.approx(copy_four, rel=1e-5)
    for name in one:
        torch.testing.assert_close(four[name], one[name], atol=1e-6, rtol=1e-5, msg=name)


def test_copy_loss_reaches_lora_adapted_projections():
    model = tiny_model(50, dropout=0.0)
    inject_lora(model, "q_proj,k_proj", rank=2, alpha=4, dropout=0.0)
    mark_only_lora_trainable(model)
    split = split_with_copies()
    batch = collate(split, [0, 1, 2], 1, 2)
    copy_loss = CopyAttentionLoss(model, split, weight=1.0)
    with copy_loss.watching(model):
        model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels)
        copy_loss(batch).backward()
    attention = model.model.decoder.layers[-1].encoder_attn
    assert attention.q_proj.lora_a.grad is not None and attention.k_proj.lora_a.grad is not None


def copy_task(n: int, seed: int) -> TokenizedSplit:
    """Sources of random tokens; targets copy them with a marker token inserted at a random place,
    so only content (not position) tells the decoder where to continue copying."""
    g = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for _ in range(n):
        body = torch.randint(5, 45, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        cut = int(torch.randint(1, len(body), (1,), generator=g))
        sources.append([0] + body + [2])
        targets.append([0] + body[:cut] + [47, 48] + body[cut:] + [2])
    return TokenizedSplit(sources, targets)


def small_copy_model() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=50, max_position_embeddings=64, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0))


def head_copy_nll(model, split: TokenizedSplit) -> float:
    """Mean negative log attention of the supervised head on the true copy sources."""
    copy_loss = CopyAttentionLoss(model, split, weight=1.0)
    batch = collate(split, list(range(len(split))), 1, 2)
    with torch.no_grad(), copy_loss.watching(model):
        model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels)
        return float(copy_loss(batch)) / copy_loss.num_copied(batch)


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_copy_attention_training_teaches_the_head_where_copies_come_from(tmp_path, weight):
    tokenizer = train_bart_tokenizer(["alpha beta gamma delta"] * 10, vocab_size=300, min_frequency=1)
    model = small_copy_model()
    run = RunDir(tmp_path / "copy")
    run.prepare(resume=False, overwrite=False)
    config = TrainConfig(lr=3e-3, epochs=6, batch_size=8, warmup=5, amp="off", patience=10, seed=0,
                         progress=False, copy_attention=weight)
    result = train(model, tokenizer, copy_task(64, seed=1), copy_task(8, seed=2), config, run, CPU)
    copy_losses = [r["copy_attention_loss"] for r in result.history if "copy_attention_loss" in r]
    held_out = head_copy_nll(model, copy_task(16, seed=3))
    if weight:
        assert len(copy_losses) == 48  # 64 / 8 steps per epoch, 6 epochs
        assert sum(copy_losses[-8:]) / 8 < 0.25 * sum(copy_losses[:8]) / 8
        assert held_out < 0.5  # the head points at the copied token on unseen examples
    else:
        assert copy_losses == []  # off: nothing logged, nothing added
        assert held_out > 1.0  # the same training without supervision leaves the head unaligned
    layer = model.model.decoder.layers[-1]  # training removed its hooks: the model is plain again
    assert not layer.self_attn_layer_norm._forward_hooks and not model.model.encoder._forward_hooks


def test_words_after_a_space_or_a_bracket_align_with_the_source_spelling():
    tokenizer = train_bart_tokenizer(["Patient is 61 yo with h/o HLD and DM2. 61 years old (yo) with (HLD)"] * 20,
                                     vocab_size=400, min_frequency=1)
    source = tokenizer.encode("Patient is 61 yo with h/o HLD.")
    target = tokenizer.encode("61 years old (yo) with (HLD).")
    keys = match_keys(tokenizer)
    by_ids, by_keys = copy_alignment(source, target), copy_alignment(source, target, keys)
    tokens = tokenizer.convert_ids_to_tokens(target)
    for word in ("61", "yo", "HLD"):  # spelled without the leading space in the summary
        j = tokens.index(word)
        assert by_ids[j] == NOT_COPIED
        assert tokenizer.convert_ids_to_tokens([source[by_keys[j]]]) == ["\u0120" + word]

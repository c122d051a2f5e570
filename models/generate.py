"""Greedy and beam search for `BartForConditionalGeneration`, over its key/value cache.

The encoder runs once; the decoder is fed one new token per step while the cache keeps the
self-attention keys/values of the prefix and the cross-attention keys/values of the source
(computed on the first step). The output equals Transformers' `generate` with the same settings:
`[batch, length]` ids that start with `decoder_start_token_id`, rows padded with `pad_token_id`
after their EOS.

Lengths follow Transformers: `max_length` and `min_length` count the decoder start token, so
`max_new_tokens=n` means `max_length = n + 1`. Settings left as None come from the model's config
(which carries the checkpoint's generation_config.json values), then from Transformers' defaults.

Beam search is Transformers' vectorised algorithm (4.50+): per step the best 2 * num_beams
continuations of each batch item are scored, the best num_beams that did not stop keep running,
and those among the top num_beams that stopped (EOS or max_length) compete for the num_beams
slots of finished hypotheses with score `sum_logprobs / generated_len ** length_penalty`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from models import onednn_linear, packed_weights
from models.bart import BartForConditionalGeneration, KVCache
from models.config import BartConfig
from models.errors import ModelError

PROMPT_LENGTH = 1  # the decoder starts from decoder_start_token_id alone

# Transformers marks dead beams and empty slots with -1e9 (not -inf) and sums these marks into the
# scores; doing the same float32 arithmetic keeps our choices identical to theirs in every tie.
DEAD = -1.0e9

# A forced BOS/EOS id of NO_TOKEN switches off the model's (None would mean "take the model's").
NO_TOKEN = -1

# Transformers' global defaults, for settings a checkpoint's config leaves empty.
DEFAULTS = dict(num_beams=1, max_length=20, min_length=0, length_penalty=1.0,
                no_repeat_ngram_size=0, early_stopping=False)


@dataclass
class GenerationConfig:
    """Decoding settings; None means "take the model's" (see `from_model_config`)."""

    num_beams: int | None = None
    max_length: int | None = None  # total length, decoder start token included
    max_new_tokens: int | None = None  # wins over max_length when both are set
    min_length: int | None = None  # EOS is banned while the sequence is shorter than this
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    early_stopping: bool | str | None = None  # True, False or "never", as in Transformers
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None  # NO_TOKEN: none, whatever the model says
    forced_eos_token_id: int | None = None  # NO_TOKEN: none, whatever the model says
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True  # False recomputes the whole prefix each step (slow; for checking the cache)

    @classmethod
    def from_model_config(cls, config: BartConfig, **overrides) -> GenerationConfig:
        """Every setting resolved: the override where it is not None, else the model config's value,
        else Transformers' default. Unknown names are an error, so a typo is not silently ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ModelError(f"unknown generation setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
        values = {}
        for name in names:
            value = overrides.get(name)
            if value is None:
                value = getattr(config, name, None)
            if value is None:
                value = DEFAULTS.get(name)
            values[name] = value
        if values["use_cache"] is None:
            values["use_cache"] = True
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            if values[name] == NO_TOKEN:
                values[name] = None
        if values["decoder_start_token_id"] is None:  # Transformers falls back to BOS
            values["decoder_start_token_id"] = config.bos_token_id
        if values["pad_token_id"] is None:
            values["pad_token_id"] = values["eos_token_id"]
        if values["early_stopping"] in (True, False):  # 0/1 from JSON: `is True` must hold for 1
            values["early_stopping"] = bool(values["early_stopping"])
        if isinstance(values["length_penalty"], int) and not isinstance(values["length_penalty"], bool):
            values["length_penalty"] = float(values["length_penalty"])
        if isinstance(values["max_new_tokens"], int):  # anything else fails validation below
            values["max_length"] = PROMPT_LENGTH + values["max_new_tokens"]
        settings = cls(**values)
        settings._validate(config)
        return settings

    def overrides(self) -> dict:
        """The settings this object sets (not None), to layer over a model's config."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def _validate(self, config: BartConfig) -> None:
        def fail(name: str, why: str) -> None:
            raise ModelError(f"generation setting {name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            fail("num_beams", "must be an integer >= 1")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            fail("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.max_length, int) or self.max_length <= PROMPT_LENGTH:
            fail("max_length", f"must be an integer > {PROMPT_LENGTH} (it counts the decoder start token)")
        if self.max_length - 1 > config.max_position_embeddings:
            fail("max_length", f"the decoder has only {config.max_position_embeddings} positions")
        if not isinstance(self.min_length, int) or self.min_length < 0:
            fail("min_length", "must be an integer >= 0")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "must be an integer >= 0")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            fail("length_penalty", "must be a number")
        if self.early_stopping not in (True, False, "never"):
            fail("early_stopping", 'must be true, false or "never"')
        for name in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
                     "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < config.vocab_size):
                fail(name, f"must be a token id in [0, {config.vocab_size})")
        if self.decoder_start_token_id is None:
            fail("decoder_start_token_id", "is needed (and the config has no bos_token_id to fall back on)")


def generate(
    model: BartForConditionalGeneration,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    **overrides,
) -> Tensor:
    """Generated ids `[batch, length]`, starting with the decoder start token.

    Settings: keyword overrides > `generation_config` > `model.config` > Transformers' defaults.
    `attention_mask` (1 = real token) is needed for padded batches; without it every token is
    attended, as in Transformers. The model runs in eval mode (no dropout) and is put back in the
    mode it was in. For bf16 inference cast the model first: `cast_for_inference(model, torch.bfloat16)`.

    On the CPU, the decoder's and LM head's weights run prepacked for oneDNN (models/packed_weights.py).
    Frozen ones stay packed for later calls, as much memory again as those weights (~610 MB fp32 for
    distilbart-cnn-12-6); `models.packed_weights.release(model.parameters())` frees it.
    """
    layered = {**(generation_config.overrides() if generation_config else {}), **overrides}
    settings = GenerationConfig.from_model_config(model.config, **layered)
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask)

    was_training = model.training
    model.eval()
    # Packs of trainable weights are dropped afterwards: those weights will change.
    per_token = per_token_weights(model)
    # `linear` runs fp32 products on oneDNN itself, on a pack where the weight has one; the mode
    # below packs what reaches F.linear directly (LoRA's factors) when it first sees it.
    linears = {id(w) for w in packed_weights.linear_weights(model)}
    packed_weights.pack_fp32_for_inference(w for w in per_token if id(w) in linears)
    try:
        with torch.inference_mode(), OneDNNLinear(pack=per_token):
            memory = model.encode(input_ids, attention_mask)
            search = greedy_search if settings.num_beams == 1 else beam_search
            out = search(model, memory, attention_mask, settings)
    finally:
        model.train(was_training)
        packed_weights.release(w for w in per_token if w.requires_grad)
    return out.clone()  # a normal tensor: callers may edit it in place outside inference mode


def per_token_weights(model: BartForConditionalGeneration) -> list[Tensor]:
    """The weights generation packs: the decoder and LM head run once per new token, mostly on a
    few rows, where prepacking pays most (only those F.linear reads get packed, LoRA's included)."""
    return [p for p in model.model.decoder.parameters() if p.dim() == 2] + [model.lm_head.weight]


def cast_for_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the model's floating-point weights and buffers to `dtype` in place, frozen and in eval
    mode, and return it.

    Generation then runs in that dtype (logits are scored in float32). Keep an fp32 copy if you will
    train again or merge LoRA weights: rounding to bf16 is lossy. In bf16 on the CPU the Linear
    weights also get oneDNN packs (models/packed_weights.py): the same products, without a reorder
    of each weight in every call. That is as much memory again as those weights (~610 MB for
    distilbart-cnn-12-6) for ~9% faster teacher-forced evaluation (bench case eval_bf16_weights:
    ours/theirs 1.16-1.18x -> 1.25-1.30x, the same loss) and faster generation.
    """
    if not dtype.is_floating_point:
        raise ModelError(f"cast_for_inference: {dtype} is not a floating-point dtype")
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    packed_weights.pack_linears(model)  # bf16 weights only: those `linear` runs on
    return model


class OneDNNLinear(TorchFunctionMode):
    """Inside this context, CPU `F.linear` calls run on oneDNN's matmul. For float32, `F.linear`
    uses MKL's sgemm, which on this project's AMD EPYC reaches ~110 GFLOP/s per core at the
    encoder's shapes against oneDNN's ~240, and is ~2x slower at the decoder's 16-row products
    (fc1: 2.0 vs 0.94 ms; LM head: 38 vs 16 ms). bf16 already goes to oneDNN, but through a path
    ~2x slower for 4-row products. Only the summation order differs from `F.linear`.
    Inference only (the op has no backward); any other call passes through unchanged.
    Weights in `pack` run on their prepacked copies (models/packed_weights.py): the same products,
    without reordering the weight on every call.
    The model's own Linears run float32 on oneDNN anyway (models/onednn_linear.py): this catches
    what calls F.linear directly (LoRA's factors) and bf16 weights without a pack."""

    available = onednn_linear.AVAILABLE
    dtypes = (torch.float32, torch.bfloat16) if available and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
        else (torch.float32,)

    def __init__(self, pack: Iterable[Tensor] = ()):
        super().__init__()
        self.pack = {id(w) for w in pack if packed_weights.can_pack(w)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.available:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.device.type == "cpu" and x.dim() >= 2 and weight.dim() == 2 and x.dtype in self.dtypes
                    and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)):
                if id(weight) in self.pack:
                    weight = packed_weights.prepacked(weight)
                return onednn_linear.product(x, weight, bias)
        return func(*args, **kwargs)


def _check_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0 \
            or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ModelError(f"input_ids must be a non-empty [batch, length] tensor of token ids, got {shape}")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ModelError(f"input_ids hold ids outside the vocabulary [0, {vocab}): "
                         f"min {int(input_ids.min())}, max {int(input_ids.max())}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ModelError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}; they must match")
        attention_mask = attention_mask.to(device)
        if not bool(attention_mask.any(dim=1).all()):
            raise ModelError("attention_mask has a row with no tokens to attend to")
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# Logits processing: each function edits next-token scores [rows, vocab] in place (the search's own
# fresh tensor; a copy of 50k columns per row per step is not free) and returns them. Order as in
# Transformers: n-grams, min length, forced BOS, forced EOS (the forced ones overwrite the rest).


def ban_repeated_ngrams(scores: Tensor, tokens: Tensor, size: int) -> Tensor:
    """Ban every token that would complete an n-gram already present in the row."""
    length = tokens.shape[1]
    if size <= 0 or length < size:
        return scores
    prefix = tokens[:, length - size + 1:]  # the n-1 tokens a new n-gram would start with
    windows = tokens.unfold(1, size, 1)  # [rows, length - size + 1, size]: every n-gram so far
    repeats = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)
    vocab = scores.shape[-1]
    # Non-matching windows write into a spare column, so one scatter handles every row at once.
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(repeats, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill_(banned[:, :vocab], float("-inf"))


def ban_eos_before_min_length(scores: Tensor, length: int, min_length: int, eos_token_id: int | None) -> Tensor:
    if eos_token_id is not None and length < min_length:
        scores[:, eos_token_id] = float("-inf")
    return scores


def force_token(scores: Tensor, token_id: int) -> Tensor:
    """Only `token_id` is possible (log-probability 0)."""
    scores.fill_(float("-inf"))
    scores[:, token_id] = 0
    return scores


def process_scores(scores: Tensor, tokens: Tensor, settings: GenerationConfig) -> Tensor:
    length = tokens.shape[1]
    scores = ban_repeated_ngrams(scores, tokens, settings.no_repeat_ngram_size)
    scores = ban_eos_before_min_length(scores, length, settings.min_length, settings.eos_token_id)
    if settings.forced_bos_token_id is not None and length == 1:
        scores = force_token(scores, settings.forced_bos_token_id)
    if settings.forced_eos_token_id is not None and length == settings.max_length - 1:
        scores = force_token(scores, settings.forced_eos_token_id)
    return scores


# ---------------------------------------------------------------------------------------------


def next_token_logits(model: BartForConditionalGeneration, tokens: Tensor, memory: Tensor,
                      memory_mask: Tensor | None, cache: KVCache | None) -> Tensor:
    """float32 logits for the token after `tokens`; with a cache only the last token is fed."""
    new = tokens[:, -1:] if cache is not None else tokens
    return model.decode(new, memory, memory_mask, cache=cache)[:, -1].float()


def greedy_search(model: BartForConditionalGeneration, memory: Tensor, memory_mask: Tensor | None,
                  settings: GenerationConfig) -> Tensor:
    """Argmax decoding. Rows that emit EOS get pad from then on and leave the decoder batch."""
    batch = memory.shape[0]
    eos, pad = settings.eos_token_id, settings.pad_token_id
    tokens = torch.full((batch, 1), settings.decoder_start_token_id, dtype=torch.long, device=memory.device)
    rows = torch.arange(batch, device=memory.device)  # rows of `tokens` still being decoded
    cache = model.new_cache(settings.max_length - 1) if settings.use_cache else None

    while tokens.shape[1] < settings.max_length:
        prefix = tokens[rows]
        # Transformers takes the argmax of the processed logits (not log-probabilities); so do we.
        scores = process_scores(next_token_logits(model, prefix, memory, memory_mask, cache), prefix, settings)
        next_tokens = scores.argmax(dim=-1)
        if rows.numel() == batch:
            column = next_tokens
        else:
            column = tokens.new_full((batch,), pad)
            column[rows] = next_tokens
        tokens = torch.cat([tokens, column[:, None]], dim=1)

        if eos is None:
            continue
        running = next_tokens != eos
        if not bool(running.all()):
            if not bool(running.any()):
                break
            # Finished rows leave the decoder batch, so a long straggler does not pay for them.
            keep = running.nonzero().squeeze(1)
            rows, memory = rows[keep], memory[keep]
            memory_mask = memory_mask[keep] if memory_mask is not None else None
            if cache is not None:
                cache.reorder(keep)
    return tokens


def beam_search(model: BartForConditionalGeneration, memory: Tensor, memory_mask: Tensor | None,
                settings: GenerationConfig) -> Tensor:
    """Beam search with Transformers' scoring, stopping rules and tie-breaking; returns the best
    finished hypothesis of each batch item, padded to the longest of them."""
    batch, beams, max_length = memory.shape[0], settings.num_beams, settings.max_length
    eos, early_stopping = settings.eos_token_id, settings.early_stopping
    device = memory.device
    # Keep 2 * beams candidates, so that beams survive even if the best `beams` all end here.
    num_candidates = 2 * beams
    may_finish = torch.arange(num_candidates, device=device) < beams  # only the top `beams` can finish

    # The decoder runs [batch * beams] rows against the [batch] encoder outputs: cross-attention
    # treats each item's beams as queries of one row, so its keys/values are never copied per beam.
    cache = model.new_cache(settings.max_length - 1) if settings.use_cache else None
    row_offset = torch.arange(batch, device=device)[:, None] * beams

    # Fixed-size [batch, beams, max_length] buffers, padded, as Transformers keeps them.
    running = torch.full((batch, beams, max_length), settings.pad_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = settings.decoder_start_token_id
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = DEAD  # all beams start identical: expand only the first
    finished = running.clone()
    finished_scores = torch.full((batch, beams), DEAD, device=device)
    finished_lengths = torch.full((batch, beams), PROMPT_LENGTH, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for length in range(PROMPT_LENGTH, max_length):  # `length` tokens so far, one more this step
        prefix = running[:, :, :length].reshape(batch * beams, length)
        logits = next_token_logits(model, prefix, memory, memory_mask, cache)
        log_probs = process_scores(F.log_softmax(logits, dim=-1), prefix, settings)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)

        scores, flat_index = totals.topk(num_candidates)
        source_beam = flat_index // vocab
        candidates = _gather_beams(running, source_beam)
        candidates[:, :, length] = flat_index % vocab
        stopped = torch.full_like(scores, length + 1 >= max_length, dtype=torch.bool)
        if eos is not None:
            stopped |= candidates[:, :, length] == eos

        # The best `beams` candidates that did not stop run on.
        alive_scores = scores + stopped.to(torch.float32) * DEAD
        keep = alive_scores.topk(beams).indices
        running = _gather_beams(candidates, keep)
        running_scores = _gather_beams(alive_scores, keep)
        if cache is not None:
            # Beams only move within their batch item, and cross-attention keys/values are kept per
            # item, not per beam, so they need no reordering.
            cache.reorder((_gather_beams(source_beam, keep) + row_offset).view(-1), include_cross=False)

        finished, finished_scores, finished_lengths, is_finished = _add_finished(
            finished, finished_scores, finished_lengths, is_finished, candidates, scores,
            stopped & may_finish, length + 1, can_improve, settings)

        can_improve = can_improve & _running_can_beat_finished(
            running_scores, finished_scores, is_finished, length + 1, settings)
        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(can_improve.any()) or all_full or bool(stopped.all()):
            break

    out_length = int(finished_lengths[:, 0].max())
    return finished[:, 0, :out_length]


def _gather_beams(values: Tensor, index: Tensor) -> Tensor:
    """values[b, index[b, j], ...] for every batch item b: pick beams along dim 1."""
    while index.dim() < values.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(values, index, dim=1)


def _add_finished(finished: Tensor, finished_scores: Tensor, finished_lengths: Tensor, is_finished: Tensor,
                  candidates: Tensor, scores: Tensor, just_finished: Tensor, new_length: int,
                  can_improve: Tensor, settings: GenerationConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge the candidates that just finished into each batch item's `beams` best finished
    hypotheses (Transformers' BeamHypotheses, vectorised over the batch)."""
    beams = finished.shape[1]
    # Length-normalised score; the length counts generated tokens (EOS included, start token not).
    final = scores / ((new_length - PROMPT_LENGTH) ** settings.length_penalty)
    # An item whose slots are full (early_stopping=True) or that cannot improve takes no more.
    full = is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
    final += full.to(torch.float32) * DEAD
    final += (~can_improve).to(torch.float32) * DEAD
    final += (~just_finished) * DEAD

    merged_scores = torch.cat([finished_scores, final], dim=1)
    best = merged_scores.topk(beams).indices
    new_lengths = torch.full_like(scores, new_length, dtype=torch.long)
    return (
        _gather_beams(torch.cat([finished, candidates], dim=1), best),
        _gather_beams(merged_scores, best),
        _gather_beams(torch.cat([finished_lengths, new_lengths], dim=1), best),
        _gather_beams(torch.cat([is_finished, just_finished], dim=1), best),
    )


def _running_can_beat_finished(running_scores: Tensor, finished_scores: Tensor, is_finished: Tensor,
                               length: int, settings: GenerationConfig) -> Tensor:
    """[batch, 1]: could the best running beam still beat the worst finished hypothesis?

    Transformers' heuristic: the running score is normalised by the current generated length
    (early_stopping True/False), or by the longest possible one when early_stopping="never" and a
    positive length penalty favours longer outputs. Until all slots are full the answer is yes.
    """
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_length = settings.max_length - PROMPT_LENGTH
    else:
        best_length = length - PROMPT_LENGTH
    best_running = running_scores[:, :1] / (best_length ** settings.length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, DEAD)
    return (best_running > worst_finished).any(dim=-1, keepdim=True)

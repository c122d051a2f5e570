"""BART encoder-decoder, written out: post-LN Transformer layers with learned positions.

Module and parameter names mirror Transformers' `BartForConditionalGeneration`, so a Hugging Face
state dict loads with `load_state_dict` as it is (the tied embedding appears under four names,
as in theirs). Attention runs on `F.scaled_dot_product_attention`, except under CPU bf16 autocast
(models/attention_bf16.py); the decoder keeps a key/value cache for generation: self-attention
keys are written step by step into preallocated buffers, cross-attention keys are computed once
from the encoder output, one row per source even when the decoder runs several beams per source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention_bf16 import attend_bf16
from models.config import BartConfig
from models.cross_entropy import cross_entropy
from models.dropout import dropout
from models.errors import ModelError
from models.head_loss import chunked_head_loss
from models.lookup_grad import lookup
from models.packed_weights import Linear
from models.shared_cast import cast_for_readers

POSITION_OFFSET = 2  # BART's learned positions start at index 2 (a fairseq legacy)
# Target rows per LM-head product when the loss needs no gradient (evaluation), or a gradient for
# the decoder only (a frozen head: LoRA; models/head_loss.py). A whole batch's logits are never
# held at once: 16 x 256 target tokens are 823 MB in fp32 at a 50264-word vocabulary, 51 MB per
# 256-row chunk. A batch of at most this many rows runs in one product.
HEAD_CHUNK_ROWS = 256
# Devices where a frozen head's loss with a gradient also runs in those chunks. A GPU's has not
# been measured yet; add "cuda" here to measure it (bench case lora_bf16_long, --device cuda).
CHUNKED_TRAINING_LOSS_DEVICES = ("cpu",)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_(x: Tensor) -> Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")


# Transformers' three names for the tanh approximation
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as BART was trained
    **dict.fromkeys(TANH_GELU_NAMES, _gelu_tanh),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

# The same functions overwriting their input, used where no graph is recorded (generation,
# evaluation): fc1's [batch, length, ffn_dim] output is then not held twice at the encoder's peak.
# Greedy generation at distilbart-cnn-12-6 shapes (bench case `greedy`, 9 pairs): our peak 90 -> 76
# MB median, ours/theirs 0.78 -> 0.71. So a forward hook on fc1 that keeps its output under
# no_grad/inference_mode must clone it: the tensor it saw holds the activation afterwards.
IN_PLACE_ACTIVATIONS = {
    "gelu": torch.ops.aten.gelu_,
    **dict.fromkeys(TANH_GELU_NAMES, _gelu_tanh_),
    "relu": F.relu_,
    **dict.fromkeys(("silu", "swish"), partial(F.silu, inplace=True)),
}


def shift_right(labels: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """Decoder inputs from labels: prepend the start token, drop the last, and turn -100 into pad."""
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


@dataclass
class LayerCache:
    """One decoder layer's keys and values, [rows, heads, positions, head_dim]. Self-attention's
    live in buffers with room for `capacity` positions, of which the first `length` are filled, so a
    step writes in place instead of concatenating. Cross-attention's are computed once, one row per
    encoder output (beam search's beams share their source's row)."""

    capacity: int = 0
    length: int = 0
    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None
    # `reorder` writes into these and swaps them with self_k/self_v: no new buffer every step.
    spare_k: Tensor | None = None
    spare_v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new self-attention keys/values after the filled ones; return all filled ones (views)."""
        start, end = self.length, self.length + k.shape[2]
        if self.self_k is None or end > self.self_k.shape[2]:
            size = max(end, self.capacity, 2 * self.self_k.shape[2] if self.self_k is not None else 0)
            self.self_k, self.self_v = _grown(self.self_k, k, start, size), _grown(self.self_v, v, start, size)
        self.self_k[:, :, start:end] = k
        self.self_v[:, :, start:end] = v
        self.length = end
        return self.self_k[:, :, :end], self.self_v[:, :, :end]

    def reorder(self, index: Tensor, include_cross: bool) -> None:
        if self.self_k is not None:
            self.self_k, self.spare_k = _select_rows(self.self_k, index, self.length, self.spare_k)
            self.self_v, self.spare_v = _select_rows(self.self_v, index, self.length, self.spare_v)
        if include_cross and self.cross_k is not None:
            self.cross_k, self.cross_v = self.cross_k.index_select(0, index), self.cross_v.index_select(0, index)


def _grown(buffer: Tensor | None, new: Tensor, filled: int, size: int) -> Tensor:
    """A buffer like `new` with room for `size` positions, holding the first `filled` of `buffer`."""
    grown = new.new_empty(new.shape[0], new.shape[1], size, new.shape[3])
    if buffer is not None:
        grown[:, :, :filled] = buffer[:, :, :filled]
    return grown


def _select_rows(buffer: Tensor, index: Tensor, filled: int, spare: Tensor | None) -> tuple[Tensor, Tensor]:
    """(rows `index` of `buffer`'s filled prefix, written into `spare`; the old buffer, the next spare)."""
    shape = (index.numel(),) + buffer.shape[1:]
    if spare is None or spare.shape != shape or spare.dtype != buffer.dtype:
        spare = buffer.new_empty(shape)
    torch.index_select(buffer[:, :, :filled], 0, index, out=spare[:, :, :filled])
    return spare, buffer


class KVCache:
    """Keys/values of every decoder layer; `reorder` follows beams as beam search reorders them.
    `capacity` is the number of decoder positions to make room for at once (more still fit)."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, index: Tensor, include_cross: bool = True) -> None:
        """Keep rows `index` of every cached tensor. Beam search passes include_cross=False: its
        cross-attention keys/values have one row per source, and beams never change source."""
        for layer in self.layers:
            layer.reorder(index, include_cross)


class LearnedPositionalEmbedding(nn.Embedding):
    def __init__(self, max_positions: int, dim: int):
        super().__init__(max_positions + POSITION_OFFSET, dim)

    def forward(self, length: int, past: int = 0) -> Tensor:
        positions = torch.arange(past, past + length, device=self.weight.device) + POSITION_OFFSET
        if past + length + POSITION_OFFSET > self.num_embeddings:
            raise ModelError(
                f"sequence of {past + length} tokens is longer than the model's "
                f"{self.num_embeddings - POSITION_OFFSET} positions; truncate the input"
            )
        return super().forward(positions)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor, x_for_v: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Key and value heads of `x`; `x_for_v` is the same values as v_proj's own copy
        (models/shared_cast.py), when the caller cast `x` once for several readers."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x if x_for_v is None else x_for_v))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Attend from `x` to precomputed heads `k`, `v`. `mask` is boolean, True where attention is allowed."""
        q = self._heads(self.q_proj(x))
        p_drop = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
            out = attend_bf16(q, k.to(q.dtype), v.to(q.dtype), mask, is_causal, p_drop)
        else:
            # SDPA's default scale is head_dim ** -0.5, BART's query scaling.
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                                 is_causal=is_causal, dropout_p=p_drop)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForwardLayer(nn.Module):
    """Base of both layer kinds: fc1 -> activation -> dropout -> fc2, held directly on the layer
    because Transformers' keys are `layers.N.fc1`, not a nested MLP."""

    def __init__(self, config: BartConfig, hidden: int):
        super().__init__()
        if config.activation_function not in ACTIVATIONS:
            raise ModelError(f"activation_function {config.activation_function!r} is not supported; "
                             f"one of {', '.join(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[config.activation_function]
        self.activation_in_place = IN_PLACE_ACTIVATIONS.get(config.activation_function)
        self.activation_dropout = config.activation_dropout
        self.dropout = config.dropout
        self.fc1 = Linear(config.d_model, hidden)
        self.fc2 = Linear(hidden, config.d_model)

    def feed_forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        # Only when no gradient flows: under autograd the in-place op would save a copy of fc1's
        # output for backward, costing what it saves.
        if self.activation_in_place is not None and not h.requires_grad:
            h = self.activation_in_place(h)
        else:
            h = self.activation(h)
        h = dropout(h, self.activation_dropout, self.training)
        return self.fc2(h)


class EncoderLayer(FeedForwardLayer):
    def __init__(self, config: BartConfig):
        super().__init__(config, config.encoder_ffn_dim)
        dim = config.d_model
        self.self_attn = Attention(dim, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        for_q, for_k, for_v = cast_for_readers(x, 3)
        k, v = self.self_attn.project_kv(for_k, for_v)
        h = self.self_attn(for_q, k, v, mask)
        x = self.self_attn_layer_norm(x + dropout(h, self.dropout, self.training))
        x = self.final_layer_norm(x + dropout(self.feed_forward(x), self.dropout, self.training))
        return x


class DecoderLayer(FeedForwardLayer):
    def __init__(self, config: BartConfig):
        super().__init__(config, config.decoder_ffn_dim)
        dim = config.d_model
        self.self_attn = Attention(dim, config.decoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, config.decoder_attention_heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        is_causal: bool,
        memory: tuple[Tensor, Tensor] | None,
        memory_mask: Tensor | None,
        cache: LayerCache | None,
    ) -> Tensor:
        """`memory`: the encoder output as k_proj and v_proj of cross-attention read it (two
        tensors, from `cast_for_readers`); None when `cache` already holds its keys and values."""
        for_q, for_k, for_v = cast_for_readers(x, 3)
        k, v = self.self_attn.project_kv(for_k, for_v)
        if cache is not None:
            k, v = cache.append(k, v)
        h = self.self_attn(for_q, k, v, self_mask, is_causal)
        x = self.self_attn_layer_norm(x + dropout(h, self.dropout, self.training))

        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v  # the encoder output does not change while decoding
        else:
            k, v = self.encoder_attn.project_kv(*memory)
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        h = _attend_grouped(self.encoder_attn, x, k, v, memory_mask)
        x = self.encoder_attn_layer_norm(x + dropout(h, self.dropout, self.training))

        x = self.final_layer_norm(x + dropout(self.feed_forward(x), self.dropout, self.training))
        return x


def _attend_grouped(attention: Attention, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-attention where `x` may hold several consecutive rows per source (beam search's beams):
    [sources * group, length, dim] against keys/values of the `sources` alone. The group's rows
    become extra queries of one row, so keys/values are neither projected nor stored per beam."""
    rows, sources = x.shape[0], k.shape[0]
    if rows == sources:
        return attention(x, k, v, mask)
    if rows % sources:
        raise ModelError(f"{rows} decoder rows cannot be split evenly over {sources} encoder outputs")
    # No causal mask in cross-attention, so the group's queries may share one row.
    return attention(x.reshape(sources, -1, x.shape[-1]), k, v, mask).view(x.shape)


def _padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[batch, keys] 1/0 mask -> boolean [batch, 1, 1, keys] for SDPA; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class LayerStack(nn.Module):
    """What encoder and decoder share: token embedding (shared, optionally scaled by
    sqrt(d_model)) plus learned positions, `layernorm_embedding`, dropout, then the layers."""

    def __init__(self, config: BartConfig, embed_tokens: nn.Embedding, layers: list[nn.Module]):
        super().__init__()
        self.dropout = config.dropout
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens
        self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(layers)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)

    def embed(self, input_ids: Tensor, past: int = 0) -> Tensor:
        x = lookup(self.embed_tokens, input_ids) * self.embed_scale + self.embed_positions(input_ids.shape[1], past)
        return dropout(self.layernorm_embedding(x), self.dropout, self.training)


class Encoder(LayerStack):
    def __init__(self, config: BartConfig, embed_tokens: nn.Embedding):
        super().__init__(config, embed_tokens, [EncoderLayer(config) for _ in range(config.encoder_layers)])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)
        mask = _padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Decoder(LayerStack):
    def __init__(self, config: BartConfig, embed_tokens: nn.Embedding):
        super().__init__(config, embed_tokens, [DecoderLayer(config) for _ in range(config.decoder_layers)])

    def forward(
        self,
        input_ids: Tensor,
        memory: Tensor,
        memory_attention_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        past = cache.length if cache is not None else 0
        x = self.embed(input_ids, past)
        self_mask, is_causal = _causal_mask(input_ids.shape[1], past, attention_mask, x.device)
        memory_mask = _padding_mask(memory_attention_mask)
        # one cast of the encoder output for every layer's cross-attention k_proj and v_proj
        cached = cache is not None and all(layer.cross_k is not None for layer in cache.layers)
        readers = cast_for_readers(memory, 2 * len(self.layers)) if not cached else None
        for i, layer in enumerate(self.layers):
            memory_i = readers[2 * i:2 * i + 2] if readers is not None else None
            x = layer(x, self_mask, is_causal, memory_i, memory_mask, cache.layers[i] if cache is not None else None)
        return x


def _causal_mask(length: int, past: int, attention_mask: Tensor | None, device) -> tuple[Tensor | None, bool]:
    """Self-attention mask for `length` new queries after `past` cached keys: (mask, is_causal)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if length == 1:
            return None, False  # one new query may see every cached key
        if past == 0:
            return None, True  # SDPA's own causal kernel
    keys = past + length
    allowed = torch.ones(length, keys, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
    if padded:
        allowed = allowed & attention_mask.bool()[:, None, None, -keys:]
    return allowed, False


@dataclass
class Seq2SeqOutput:
    logits: Tensor | None
    loss: Tensor | None = None
    encoder_hidden: Tensor | None = None
    num_target_tokens: int | None = None


class BartModel(nn.Module):
    """The shared embedding plus encoder and decoder (Transformers' `model.` prefix)."""

    def __init__(self, config: BartConfig):
        super().__init__()
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = Encoder(config, self.shared)
        self.decoder = Decoder(config, self.shared)


class BartForConditionalGeneration(nn.Module):
    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.model = BartModel(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # As Transformers initialises BART: N(0, init_std) weights, zero biases, zero padding row.
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def encoder(self) -> Encoder:
        return self.model.encoder

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.encoder(input_ids, attention_mask)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        # Over 2-D rows, whose product is a fresh tensor rather than a view of one, so the bias
        # goes into it in place (autograd forbids that on a custom Function's view output): a
        # second [tokens, vocab] tensor is never made. 256 target rows at distilbart-cnn-12-6
        # shapes, head + loss: fp32 98 -> 52 MB and 88.5 -> 80.5 ms; LoRA bf16 with its gradient
        # 94 -> 70 MB and 97.4 -> 90.4 ms.
        logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1]))
        # In the logits' dtype: under autocast an fp32 bias would promote the whole [tokens, vocab]
        # tensor back to fp32 (and its gradient back to bf16): two full copies, ~100 ms a step.
        logits.add_(self.final_logits_bias.to(logits.dtype))
        return logits.view(*hidden.shape[:-1], logits.shape[-1])

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits for the given decoder tokens; with a cache, only the new tokens need be passed."""
        hidden = self.model.decoder(decoder_input_ids, encoder_hidden, encoder_attention_mask,
                                    decoder_attention_mask, cache)
        return self.lm_logits(hidden)

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty key/value cache; `capacity`: decoder positions to allocate for up front."""
        return KVCache(len(self.model.decoder.layers), capacity)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_hidden: Tensor | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
    ) -> Seq2SeqOutput:
        """Teacher-forced forward pass.

        With `labels` (-100 where ignored) the loss is cross-entropy over the target tokens,
        `loss_reduction` "mean" (Transformers' loss) or "sum" (for normalising by the token count
        of a whole accumulated batch). `return_logits=False` runs the LM head only at the target
        positions, which is all the loss needs and saves the [batch, length, vocab] tensor; unless
        the head's weight trains, over HEAD_CHUNK_ROWS target rows at a time (`target_loss`).
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask)
        hidden = self.model.decoder(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)

        if labels is None:
            return Seq2SeqOutput(logits=self.lm_logits(hidden), encoder_hidden=encoder_hidden)
        target = labels != -100
        target_labels = labels[target]
        if return_logits:
            logits = self.lm_logits(hidden)
            loss = cross_entropy(logits[target], target_labels, loss_reduction)
        else:
            logits = None
            loss = self.target_loss(hidden[target], target_labels, loss_reduction)
        return Seq2SeqOutput(logits=logits, loss=loss, encoder_hidden=encoder_hidden,
                             num_target_tokens=int(target_labels.numel()))

    def target_loss(self, rows: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """cross_entropy(lm_logits(rows), labels) over decoder output rows at target positions.
        HEAD_CHUNK_ROWS rows at a time, so the logits are never all held, unless the head's weight
        needs a gradient (full fine-tuning)."""
        head_weight = self.lm_head.weight
        needs_grad = torch.is_grad_enabled() and (rows.requires_grad or head_weight.requires_grad)
        if (rows.shape[0] <= HEAD_CHUNK_ROWS or needs_grad and (
                head_weight.requires_grad or rows.device.type not in CHUNKED_TRAINING_LOSS_DEVICES)):
            return cross_entropy(self.lm_logits(rows), labels, reduction)
        return chunked_head_loss(self.lm_logits, rows, labels, HEAD_CHUNK_ROWS, reduction)


def set_dropout(model: BartForConditionalGeneration, p: float) -> None:
    """Change the residual/embedding dropout of a built model (config `dropout`), as Transformers'
    `from_pretrained(..., dropout=p)` does for a checkpoint."""
    if not 0.0 <= p < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {p}")
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, (LayerStack, EncoderLayer, DecoderLayer)):
            module.dropout = p


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

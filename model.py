"""Stage 1 — the model: a Llama decoder that matches transformers' LlamaForCausalLM, and its tokenizers.

Read top to bottom: the plain decoder (config -> RMSNorm -> RoPE -> attention -> MLP -> block -> model), then
decoding on a KV cache that keeps each prompt once for all of its beams, then checkpoint loading, then the
tokenizers. Module names mirror Hugging Face's (`model.layers.N.self_attn.q_proj`), so a HF checkpoint loads
strictly with no renaming table, and LoRA (lora.py) can wrap the projections by name.

The oracle is transformers' own LlamaForCausalLM: tests/test_model.py loads the same checkpoints into both and
compares logits, left padding, KV-cache decoding with reordered beams, gradients and greedy decoding of real
SmolLM2 weights; start there. tests/test_tokenizer.py checks the tokenizers against HF `tokenizers` and
`sentencepiece`.

Numerics follow transformers exactly (fp32 logits within 1e-5): RMSNorm normalises in fp32, casts back, then
multiplies the weight; RoPE angles are computed in fp32 and cos/sin cast to the model dtype; attention runs
through SDPA (fp32 softmax inside) with an additive mask filled with finfo(dtype).min. Decoding on top of a KV
cache uses `shared_prompt_attention` instead (fp32 throughout), which lets all beams of a prompt read one copy
of the prompt's keys and values.

Shapes: B rows of a forward, T new positions per row, H query heads, H_kv key/value heads, D head_dim, V the
vocabulary, N the positions logits_at asks for. In the KV cache: U prompts, P prompt positions, R rows (the
beams; R is the B of a forward on the cache), G generated positions; g = H / H_kv query heads per key/value
head, S the most rows of any one prompt.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # None, or {"rope_type": "linear" | "llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str | None = None        # the checkpoint's dtype as config.json states it ("bfloat16", ...)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Reads every config.json form found in the wild (transformers 4 and 5, official Llama-3.x uploads)."""
        if d.get("model_type") != "llama":
            raise ValueError(f"{source}: unsupported model_type {d.get('model_type')!r} (only 'llama' models load)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {d['hidden_act']!r} (Llama uses 'silu')")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(name), int) or d[name] <= 0:
                raise ValueError(f"{source}: field {name!r} missing or not a positive integer (got {d.get(name)!r})")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads       # absent in pre-GQA configs
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        max_positions = d.get("max_position_embeddings", 2048)

        # RoPE: transformers 5 writes one `rope_parameters` dict (theta inside); every official Llama-3.x upload
        # has `rope_theta` + `rope_scaling` at top level; old files say "type", newer ones "rope_type".
        if d.get("rope_parameters") is not None:
            rope = dict(d["rope_parameters"])
            rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        else:
            rope = dict(d.get("rope_scaling") or {})
            rope_theta = d.get("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        if rope_type == "default":
            rope_scaling = None
        elif rope_type in ("linear", "llama3"):
            required = ["factor"] + (["low_freq_factor", "high_freq_factor"] if rope_type == "llama3" else [])
            for key in required:
                if not isinstance(rope.get(key), (int, float)):
                    raise ValueError(f"{source}: rope scaling {rope_type!r} needs a numeric {key!r} (got {rope.get(key)!r})")
            if rope_type == "llama3":   # 8192 for every Llama-3.x; HF falls back to max_position_embeddings
                rope.setdefault("original_max_position_embeddings", max_positions)
            rope_scaling = {"rope_type": rope_type, **rope}
        else:
            raise ValueError(f"{source}: unsupported rope type {rope_type!r} (supported: default, linear, llama3)")

        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_position_embeddings=max_positions, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )

    @classmethod
    def from_file(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))


# -------------------------------------------------------------------------------------------- the decoder

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, cast back, THEN multiply the weight (transformers' order; bf16 results depend on it).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d), fp32 (head_dim/2,); with Llama-3's frequency-dependent rescaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are divided by `factor` (32 for Llama-3.2-1B/3B, 8 for 3.1), short ones kept,
    # the band between interpolated smoothly. Same expression order as transformers for bit-equal frequencies.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention: each key/value head serves g = H / H_kv query heads.

    The attention proper, `attend(layer_index, q, k, v)`, is picked once per forward for all layers by
    `choose_attention`: SDPA, with or without a padding mask, or on a filled KV cache the shared-prompt attention
    of the decoding section."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, attend):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H_kv, T, D)
        q = q * cos + rotate_half(q) * sin                                 # RoPE; cos/sin (B, 1, T, D)
        k = k * cos + rotate_half(k) * sin
        out = attend(self.layer_index, q, k, v)                            # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))          # (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the fp32 frequencies.
        self.inv_freq = rope_inverse_frequencies(config)                   # (D/2,) fp32

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, logits_at=None):
        """input_ids (B, T); attention_mask (B, P+T) over cached + new positions, 1 = real token, 0 = padding;
        cache: attend to the P cached steps, then append these T; logits_at: bool (B, T) -> logits (N, V) at
        the True positions in row-major order (the lm_head runs only there), None -> (B, T, V)."""
        B, T = input_ids.shape
        P = cache.length if cache is not None else 0
        # Inputs may come from the CPU (beam search keeps its bookkeeping there): move them to the model.
        x = self.model.embed_tokens(input_ids.to(self.model.embed_tokens.weight.device))   # (B, T, hidden)
        dtype, device = x.dtype, x.device
        attention_mask = _checked_attention_mask(attention_mask, cache, B, T, P, device)   # (B, P + T) bool

        # Position ids: like HF generate, a token's position is the number of real tokens before it (left padding
        # shifts rows), counting the cached ones.
        if attention_mask is None:
            new_mask = torch.ones(B, T, dtype=torch.bool, device=device)                   # (B, T)
        else:
            new_mask = attention_mask[:, P:]                                               # (B, T)
        real_before = cache.real_lengths()[:, None] if P > 0 else 0
        positions = (real_before + new_mask.long().cumsum(-1) - 1).masked_fill(~new_mask, 1)  # (B, T)

        # RoPE angles in fp32, cos/sin cast to the model dtype (transformers' rounding).
        if self.inv_freq.device != device:  # moved once per device (a copy every step would sync the GPU)
            self.inv_freq = self.inv_freq.to(device)
        freqs = positions[..., None].float() * self.inv_freq                # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)                         # (B, T, D)
        cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, T, D)

        attend = choose_attention(attention_mask, new_mask, cache, dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attend)                                 # (B, T, hidden)

        if logits_at is not None:
            if logits_at.dtype != torch.bool or tuple(logits_at.shape) != (B, T):
                raise ValueError(f"logits_at must be a bool tensor of shape {(B, T)}, got "
                                 f"{logits_at.dtype} {tuple(logits_at.shape)}")
            x = x[logits_at.to(device)]                                    # (N, hidden), row-major
        # RMSNorm is per row, so normalising only the kept rows gives the same numbers.
        return self.lm_head(self.model.norm(x))                            # (B, T, V) or (N, V)


def choose_attention(attention_mask, new_mask, cache: KVCache | None, dtype):
    """The attention of one forward, the same for every layer: attend(layer_index, q, k, v) -> (B, H, T, D).

    - no attention_mask (training's batches, whose right padding never precedes a real token): SDPA's causal
      fast path;
    - an attention_mask (left padding): SDPA with an additive mask, finfo(dtype).min where a query may not look;
    - a fresh cache (the prefill): one of the two, each layer's keys/values kept as the cache's prompt part;
    - a filled cache (decoding): `cached_attention`, the shared-prompt attention of the decoding section.
    Call it after the position ids are read from the cache: it records the new positions in it."""
    if cache is not None and cache.length > 0:
        return cached_attention(cache, new_mask)
    T, device = new_mask.shape[1], new_mask.device
    mask, is_causal = None, False
    if attention_mask is None:
        is_causal = T > 1
    else:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()             # (T, T)
        allowed = causal[None, None] & attention_mask[:, None, None, :]               # (B, 1, T, T)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if cache is not None:
        cache.add_positions(new_mask)

    def attend(layer_index, q, k, v):
        if cache is not None:
            k, v = cache.append(layer_index, k, v)       # the prefill's own keys/values, now the prompt part
        # GQA: enable_gqa lets each key/value head serve its g query heads without repeating it.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True,
                                              scale=q.shape[-1] ** -0.5)          # (B, H, T, D)
    return attend


def _checked_attention_mask(attention_mask, cache, B: int, T: int, P: int, device):
    """attention_mask as a bool tensor on the model's device, after checking it against the input and the cache."""
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, P + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, P + T)} "
                             f"(batch, cached {P} + new {T} positions)")
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    if P > 0 and B != cache.num_rows:
        raise ValueError(f"input_ids has {B} rows but the cache holds {cache.num_rows}")
    if P > 0 and attention_mask is not None and not torch.equal(attention_mask[:, :P], cache.cached_mask()):
        raise ValueError("attention_mask disagrees with the padding of the cached positions")
    return attention_mask


# ------------------------------------------------------------------ decoding: a KV cache shared by the beams

class KVCache:
    """Keys/values of every layer during generation, kept in two parts so that all beams of a prompt share it.

    - Prompt part: one row per prompt, (U, H_kv, P, D) per layer, and `prompt_mask` (U, P), True = real token.
      The first forward through a fresh cache (the prefill) writes it; nothing copies it afterwards.
    - Generated part: one row per sequence (a beam), (R, H_kv, G, D) per layer, `generated_mask` (R, G), and
      `row_prompt` (R,): the prompt row each sequence continues.

    Why two parts: beam search decodes ~20-token titles after ~500-token prompts, 10 beams per prompt. A full
    copy of the cache per beam (transformers' layout) moves 10 x 500 positions per layer at every step. Here
    `reorder` and `append` move only the short generated part, and attention reads each prompt once for all of
    its beams (`shared_prompt_attention`)."""

    def __init__(self, num_layers: int):
        self.prompt_keys: list[torch.Tensor | None] = [None] * num_layers       # (U, H_kv, P, D)
        self.prompt_values: list[torch.Tensor | None] = [None] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers              # (R, H_kv, G, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.prompt_mask: torch.Tensor | None = None                            # (U, P) bool
        self.generated_mask: torch.Tensor | None = None                         # (R, G) bool
        self.row_prompt: torch.Tensor | None = None                             # (R,) long

    @property
    def length(self) -> int:
        """Cached positions per row, prompt and generated (P + G); 0 before the prefill."""
        return 0 if self.prompt_mask is None else self.prompt_mask.shape[1] + self.generated_mask.shape[1]

    @property
    def num_rows(self) -> int:
        return 0 if self.row_prompt is None else self.row_prompt.numel()

    def cached_mask(self) -> torch.Tensor:
        """(R, P + G) bool: which cached positions of each row are real, as an HF attention_mask would say."""
        return torch.cat([self.prompt_mask[self.row_prompt], self.generated_mask], dim=1)

    def real_lengths(self) -> torch.Tensor:
        """(R,) long: real (non-padding) cached positions of each row, i.e. the position id of its next token."""
        return self.prompt_mask.sum(1)[self.row_prompt] + self.generated_mask.sum(1)

    def add_positions(self, mask: torch.Tensor) -> None:
        """Records which of the next forward's T positions are real, mask (R, T) bool. Called once per forward,
        before the layers append; the first call (the prefill) makes them the prompt part."""
        if self.prompt_mask is None:
            self.prompt_mask, self.generated_mask = mask, mask[:, :0]
            self.row_prompt = torch.arange(mask.shape[0], device=mask.device)
        else:
            self.generated_mask = torch.cat([self.generated_mask, mask], dim=1)

    def append(self, layer: int, k, v):
        """Stores one forward's (R, H_kv, T, D) keys/values of `layer`: as the prompt part in the prefill, onto the
        generated part afterwards. Returns the part they joined (the prompt, or the generated steps so far)."""
        if self.prompt_keys[layer] is None:
            self.prompt_keys[layer], self.prompt_values[layer] = k, v
            self.keys[layer], self.values[layer] = k[:, :, :0], v[:, :, :0]             # (U, H_kv, 0, D)
            return k, v
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)                    # (R, H_kv, G + T, D)
        self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.LongTensor) -> None:
        """Keeps rows index[0], index[1], ...: the beams that survive a step, in their new order (a row may be
        kept several times: U prompts expand into beam_width beams each by
        reorder(arange(U).repeat_interleave(beam_width))). Only the generated part moves; the prompt part drops the
        prompts that no row continues any more."""
        index = index.to(self.row_prompt.device)
        row_prompt = self.row_prompt[index]                                             # (R',)
        used = torch.unique(row_prompt)                                                 # sorted
        if used.numel() < self.prompt_mask.shape[0]:
            self.prompt_mask = self.prompt_mask[used]
            self.prompt_keys = [None if k is None else k[used] for k in self.prompt_keys]
            self.prompt_values = [None if v is None else v[used] for v in self.prompt_values]
            row_prompt = torch.searchsorted(used, row_prompt)
        self.row_prompt, self.generated_mask = row_prompt, self.generated_mask[index]
        # Advanced indexing, not index_select: the same rows, and on CPU index_select along dim 0 of a 4-d tensor
        # is far slower.
        self.keys = [None if k is None else k[index] for k in self.keys]              # (R', H_kv, G, D)
        self.values = [None if v is None else v[index] for v in self.values]

    def select(self, index: torch.LongTensor) -> KVCache:
        """A new cache of rows `index` (as `reorder`), leaving this one as it is; the two share the prompt tensors.
        A shallow copy suffices: reorder gives the copy lists of its own for the generated part, and the prompt
        part's lists are written only by the prefill."""
        other = copy.copy(self)
        other.reorder(index)
        return other


def cached_attention(cache: KVCache, new_mask):
    """choose_attention's `attend` on a filled cache: the new positions are recorded and their place among the
    rows of each prompt planned once for all layers; each layer then appends its new keys/values to the rows'
    generated part and runs shared_prompt_attention."""
    cache.add_positions(new_mask)
    plan = shared_prompt_plan(cache, new_mask.shape[1])

    def attend(layer_index, q, k, v):
        k, v = cache.append(layer_index, k, v)           # (R, H_kv, G, D), the T new steps included
        return shared_prompt_attention(q, cache.prompt_keys[layer_index], cache.prompt_values[layer_index], k, v,
                                       plan, q.shape[-1] ** -0.5).to(q.dtype)     # (R, H, T, D)
    return attend


class SharedPromptPlan(NamedTuple):
    """Where each of the R rows of a decoding forward sits among its prompt's rows, computed once per forward
    for every layer's `shared_prompt_attention`."""
    row_prompt: torch.Tensor           # (R,) the prompt row each row continues
    slot: torch.Tensor                 # (R,) its place among the rows of that prompt
    slots: int                         # S, the most rows of any one prompt
    prompt_mask: torch.Tensor          # (U, P) bool, True = real prompt token
    generated_allowed: torch.Tensor    # (R, T, G) bool: new query t may attend to generated step g


def shared_prompt_plan(cache: KVCache, num_new: int) -> SharedPromptPlan:
    """The plan of a forward of `num_new` tokens per row on top of `cache` (after cache.add_positions)."""
    row_prompt = cache.row_prompt
    count = torch.bincount(row_prompt, minlength=cache.prompt_mask.shape[0])           # (U,)
    order = torch.argsort(row_prompt, stable=True)                                      # rows grouped by prompt
    first_of_prompt = count.cumsum(0) - count                                           # (U,)
    slot = torch.empty_like(row_prompt)
    slot[order] = torch.arange(row_prompt.numel(), device=row_prompt.device) - first_of_prompt[row_prompt[order]]
    steps = cache.generated_mask.shape[1]                                               # G, the new ones included
    step = torch.arange(steps, device=row_prompt.device)
    causal = step[None, :] <= step[steps - num_new:, None]                              # (T, G)
    return SharedPromptPlan(row_prompt, slot, int(count.max()), cache.prompt_mask,
                            causal[None] & cache.generated_mask[:, None, :])


def shared_prompt_attention(q, prompt_k, prompt_v, generated_k, generated_v, plan: SharedPromptPlan, scale: float):
    """Attention of R rows' new queries over their prompt's keys and their own generated keys, in fp32.

    q (R, H, T, D); prompt_k/v (U, H_kv, P, D), shared by all rows of a prompt; generated_k/v (R, H_kv, G, D),
    the T new steps included. No key is copied per row: the rows of a prompt are stacked as extra queries of that
    prompt (a (U, slots) grid) for the prompt part, GQA groups fold into the query axis rather than repeating
    key heads, and the two parts' softmaxes merge exactly through their maxima and sums (flash-decoding)."""
    R, H, T, D = q.shape
    U, H_kv, P, _ = prompt_k.shape
    group = H // H_kv                                          # query head h reads key head h // group
    q = q.float().reshape(R, H_kv, group * T, D) * scale                                # (R, H_kv, gT, D)

    def softmax_parts(scores, values):      # unnormalised: (max, sum of exp, exp-weighted values)
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - top)
        return top, weights.sum(-1, keepdim=True), weights @ values

    grid = q.new_zeros(U, plan.slots, H_kv, group * T, D)
    grid[plan.row_prompt, plan.slot] = q
    grid = grid.transpose(1, 2).reshape(U, H_kv, plan.slots * group * T, D)              # (U, H_kv, S gT, D)
    scores = grid @ prompt_k.float().transpose(-1, -2)                                   # (U, H_kv, S gT, P)
    scores = scores.masked_fill(~plan.prompt_mask[:, None, None, :], torch.finfo(torch.float32).min)
    prompt_parts = [part.view(U, H_kv, plan.slots, group * T, -1).transpose(1, 2)[plan.row_prompt, plan.slot]
                    for part in softmax_parts(scores, prompt_v.float())]                 # (R, H_kv, gT, 1 | D)

    scores = (q @ generated_k.float().transpose(-1, -2)).view(R, H_kv, group, T, -1)     # (R, H_kv, g, T, G)
    scores = scores.masked_fill(~plan.generated_allowed[:, None, None], torch.finfo(torch.float32).min)
    generated_parts = softmax_parts(scores.view(R, H_kv, group * T, -1), generated_v.float())

    (prompt_max, prompt_sum, prompt_out), (gen_max, gen_sum, gen_out) = prompt_parts, generated_parts
    top = torch.maximum(prompt_max, gen_max)
    prompt_scale, gen_scale = torch.exp(prompt_max - top), torch.exp(gen_max - top)
    out = (prompt_out * prompt_scale + gen_out * gen_scale) / (prompt_sum * prompt_scale + gen_sum * gen_scale)
    return out.view(R, H, T, D)                                                          # fp32


# --------------------------------------------------------------------------------------------- loading

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"   # no token needed, runs on a CPU; the paper: Llama-3.2-3B
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}   # --dtype's names


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit in a safetensors file."""
    file: Path
    dtype: torch.dtype
    shape: list[int]
    offset: int           # absolute byte offset of the data in the file


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry, after checking that the file is whole (so a truncated download fails clearly)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ValueError(f"{path}: corrupt safetensors file: header length {header_len} runs past the end "
                             f"of the file ({size} bytes); truncated?")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size, entries = size - 8 - header_len, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name!r} data offsets [{begin}, {end}] run past the end of the data "
                             f"({data_size} bytes); truncated or corrupt file")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} occupies {end - begin} bytes but shape {shape} {info['dtype']} "
                             f"needs {math.prod(shape) * dtype.itemsize}")
        entries[name] = TensorEntry(path, dtype, shape, 8 + header_len + begin)
    return entries


def _read_tensor(f, entry: TensorEntry) -> torch.Tensor:
    """Reads one tensor's bytes straight into a fresh tensor: no memory map and no intermediate buffer, so the
    process holds each weight exactly once (a mapped file's touched pages would count a second time)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    buffer = tensor.reshape(-1).view(torch.uint8).numpy()                  # the tensor's own memory, as bytes
    f.seek(entry.offset)
    if f.readinto(buffer) != buffer.nbytes:
        raise ValueError(f"{entry.file}: truncated safetensors data")
    return tensor


def _checkpoint_files(folder: Path) -> dict[str, TensorEntry]:
    """Tensor name -> where it sits; one model.safetensors or the shards of the index."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors_header(single)
    if not index.is_file():
        raise FileNotFoundError(f"no weights in {folder}: neither model.safetensors nor model.safetensors.index.json")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise ValueError(f"{index}: not a valid safetensors index (needs a JSON object with a 'weight_map')") from None
    location = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = folder / shard_name
        if not shard.is_file():
            raise FileNotFoundError(f"{index} names shard {shard_name!r}, which is missing: {shard}")
        location.update(read_safetensors_header(shard))
    for name, shard_name in weight_map.items():
        if name not in location or location[name].file != folder / shard_name:
            raise ValueError(f"{index}: says tensor {name!r} is in {shard_name!r}, but that shard does not hold it")
    return location


def load_model(path, dtype=torch.bfloat16, device="cpu") -> LlamaForCausalLM:
    """A Hugging Face Llama folder -> LlamaForCausalLM in eval() mode, loaded strictly.

    Built on the meta device and filled with load_state_dict(assign=True): each tensor is read once, straight
    into its own memory (no memory map), then cast, so loading never holds two copies of the weights.
    dtype=None keeps the checkpoint's dtype."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config = LlamaConfig.from_file(folder / "config.json")
    location = _checkpoint_files(folder)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        location.pop("lm_head.weight", None)   # some tied uploads still carry a copy; transformers ignores it too
    missing = sorted(set(expected) - set(location))
    unexpected = sorted(set(location) - set(expected))
    if missing:
        raise ValueError(f"{folder}: checkpoint is missing tensor(s) {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        raise ValueError(f"{folder}: checkpoint has unexpected tensor(s) {', '.join(unexpected[:5])}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    for name, entry in location.items():
        if entry.shape != expected[name]:
            raise ValueError(f"{entry.file}: tensor {name!r} has shape {entry.shape}, but config.json implies "
                             f"{expected[name]}")

    dtype = dtype or _config_dtype(config)
    state = {}
    for file in sorted({entry.file for entry in location.values()}):
        try:
            with open(file, "rb") as f:
                for name, entry in location.items():
                    if entry.file == file:
                        state[name] = _read_tensor(f, entry).to(device=device, dtype=dtype)
        except OSError as e:
            raise ValueError(f"{file}: cannot read safetensors data ({e})") from None
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:   # assign=True wrapped each name in its own Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _config_dtype(config: LlamaConfig) -> torch.dtype:
    name = config.torch_dtype or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json: unknown torch_dtype {name!r}")
    return dtype


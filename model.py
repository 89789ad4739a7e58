"""Stage 1 — the model: a Llama decoder that matches transformers' LlamaForCausalLM, the oracle of
tests/test_model.py (logits, left padding, KV-cache decoding with reordered beams, gradients, greedy
decoding of real SmolLM2 weights). Top to bottom: the decoder (config -> RMSNorm -> RoPE ->
attention -> MLP -> block -> model), decoding on a KV cache that keeps each prompt once for all of
its beams, checkpoint loading. Module names are HF's (`model.layers.N.self_attn.q_proj`).

Shapes: B rows of a forward, T new positions per row, H query heads, H_kv key/value heads, D
head_dim, V the vocabulary, N the positions logits_at asks for. In the KV cache: U prompts, P prompt
positions, R rows (the beams: the B of a forward on the cache), G generated positions; g = H / H_kv
query heads per key/value head, S the most rows of any one prompt.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cli import read_json


# ------------------------------------------------------------------------------------ the decoder
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
    rope_scaling: dict | None = None   # None or {"rope_type": "linear" | "llama3", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str | None = None     # the checkpoint's dtype, as config.json says ("bfloat16")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> LlamaConfig:
        """Every config.json form in the wild (transformers 4 and 5, official Llama-3.x uploads)."""
        def check(ok, message):
            if not ok:
                raise ValueError(f"{source}: {message}")
        check(isinstance(d, dict), "expected a JSON object")
        check(d.get("model_type") == "llama",
              f"unsupported model_type {d.get('model_type')!r} (only 'llama' models load)")
        check(d.get("hidden_act", "silu") == "silu",
              f"unsupported hidden_act {d.get('hidden_act')!r} (Llama uses 'silu')")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        for name in (*sizes, "num_attention_heads"):
            check(isinstance(d.get(name), int) and d[name] > 0,
                  f"field {name!r} missing or not a positive integer (got {d.get(name)!r})")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads       # absent in pre-GQA configs
        check(heads % kv_heads == 0,
              f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        max_positions = d.get("max_position_embeddings", 2048)
        # RoPE: transformers 5 writes one `rope_parameters` dict (theta inside); official Llama-3.x
        # uploads have `rope_theta` + `rope_scaling`; old files say "type", newer ones "rope_type".
        if d.get("rope_parameters") is not None:
            rope = dict(d["rope_parameters"])
            rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        else:
            rope = dict(d.get("rope_scaling") or {})
            rope_theta = d.get("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        required = {"default": [], "linear": ["factor"],
                    "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}
        check(rope_type in required,
              f"unsupported rope type {rope_type!r} (supported: default, linear, llama3)")
        for key in required[rope_type]:
            check(isinstance(rope.get(key), (int, float)),
                  f"rope scaling {rope_type!r} needs a numeric {key!r} (got {rope.get(key)!r})")
        if rope_type == "llama3":   # every Llama-3.x says 8192; HF falls back to this default
            rope.setdefault("original_max_position_embeddings", max_positions)
        return cls(
            **{name: d[name] for name in sizes}, num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            max_position_embeddings=max_positions, mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"))

    @classmethod
    def from_file(cls, path) -> LlamaConfig:
        return cls.from_dict(read_json(Path(path)), source=str(path))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, cast back, THEN multiply the weight: transformers' order (bf16 bits).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d), fp32 (D/2,); with Llama-3's frequency-dependent rescaling if set."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are divided by `factor` (32 in Llama-3.2-1B/3B, 8 in 3.1), short ones
    # kept, the band between interpolated smoothly; transformers' expression order, for equal bits.
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
    """Grouped-query attention: a key/value head serves g = H / H_kv query heads (enable_gqa)."""
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index, self.head_dim = layer_index, config.head_dim
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, shared: SharedPromptPlan | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H_kv, T, D)
        q = q * cos + rotate_half(q) * sin                 # RoPE; cos/sin (B, 1, T, D)
        k = k * cos + rotate_half(k) * sin
        i, scale = self.layer_index, q.shape[-1] ** -0.5
        if cache is not None:
            # The prefill stores k, v as the prompt part; decoding appends them to the generated
            # part and gets all of it back, (R, H_kv, G, D).
            k, v = cache.append(i, k, v)
        if shared is not None:   # decoding: each prompt's keys/values read once for its rows
            out = shared_prompt_attention(q, cache.prompt_keys[i], cache.prompt_values[i], k, v,
                                          shared, scale).to(q.dtype)
        elif mask is None:   # training's batches (no padding before a real token): causal
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True,
                                                 scale=scale)
        else:                # left padding: the additive mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                 scale=scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))   # (B, H, T, D) -> (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, shared):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, shared)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
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
        """input_ids (B, T); attention_mask (B, P+T) over cached and new positions, 1 = real token;
        cache: attend to its P steps, then append these T; logits_at: bool (B, T) -> logits (N, V)
        at the True positions, row-major (the lm_head runs only there), None -> (B, T, V)."""
        B, T = input_ids.shape
        P = cache.length if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (B, P + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{(B, P + T)} (batch, cached {P} + new {T} positions)")
        if P > 0 and B != len(cache.row_prompt):
            raise ValueError(f"input_ids has {B} rows but the cache holds {len(cache.row_prompt)}")
        if logits_at is not None and (logits_at.dtype != torch.bool or logits_at.shape != (B, T)):
            raise ValueError(f"logits_at must be a bool tensor of shape {(B, T)}, got "
                             f"{logits_at.dtype} {tuple(logits_at.shape)}")
        # Inputs may come from the CPU (beam search keeps its bookkeeping there): move them.
        x = self.model.embed_tokens(input_ids.to(self.model.embed_tokens.weight.device))
        dtype, device = x.dtype, x.device                                  # x: (B, T, hidden)
        if attention_mask is None:
            new_mask = torch.ones(B, T, dtype=torch.bool, device=device)  # (B, T)
        else:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if P > 0 and not torch.equal(attention_mask[:, :P], cache.cached_mask()):
                raise ValueError("attention_mask disagrees with the padding of the cached "
                                 "positions")
            new_mask = attention_mask[:, P:]                               # (B, T)
        # Position ids as HF generate's: the number of real tokens before, cached ones included.
        real_before = cache.real_lengths()[:, None] if P > 0 else 0
        positions = (real_before + new_mask.long().cumsum(-1) - 1).masked_fill(~new_mask, 1)
        # RoPE angles in fp32, cos/sin cast to the model dtype (transformers' rounding).
        if self.inv_freq.device != device:   # moved once (a copy every step would sync the GPU)
            self.inv_freq = self.inv_freq.to(device)
        freqs = positions[..., None].float() * self.inv_freq              # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)                        # (B, T, D)
        cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, T, D)
        # What every layer's attention needs (read in Attention.forward), made once here.
        mask = shared = None
        if cache is not None:   # after the position ids were read from it
            cache.add_positions(new_mask)
        if P > 0:               # decoding: where each row sits among the rows of its prompt
            shared = shared_prompt_plan(cache, T)
        elif attention_mask is not None:   # left padding: finfo(dtype).min where a query can't look
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()        # (T, T)
            allowed = causal[None, None] & attention_mask[:, None, None, :]          # (B, 1, T, T)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, shared)                    # (B, T, hidden)
        if logits_at is not None:
            x = x[logits_at.to(device)]                                    # (N, hidden), row-major
        # RMSNorm is per row, so normalising only the kept rows gives the same numbers.
        return self.lm_head(self.model.norm(x))                            # (B, T, V) or (N, V)


# -------------------------------------------------------- decoding: a KV cache shared by the beams
class KVCache:
    """Keys/values of every layer during generation, in two parts so the beams of a prompt share it:
    the prompt part, one row per prompt, written by the first forward (the prefill) and never
    copied, and the generated part, one row per sequence (a beam). Beam search decodes ~20-token
    titles after ~500-token prompts, 10 beams each: a copy per beam (transformers' layout) moves
    10 x 500 positions per layer and step; here only the generated part moves."""
    def __init__(self, num_layers: int):
        self.prompt_keys: list[torch.Tensor | None] = [None] * num_layers   # (U, H_kv, P, D)
        self.prompt_values: list[torch.Tensor | None] = [None] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers          # (R, H_kv, G, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.prompt_mask: torch.Tensor | None = None                        # (U, P) bool
        self.generated_mask: torch.Tensor | None = None                     # (R, G) bool
        self.row_prompt: torch.Tensor | None = None       # (R,) the prompt row each row continues
        self.length = 0                               # cached positions per row, P + G

    def cached_mask(self) -> torch.Tensor:   # (R, P + G) bool, True = real: an HF attention_mask
        return torch.cat([self.prompt_mask[self.row_prompt], self.generated_mask], dim=1)

    def real_lengths(self) -> torch.Tensor:   # (R,) real cached positions = next position id
        return self.prompt_mask.sum(1)[self.row_prompt] + self.generated_mask.sum(1)

    def add_positions(self, mask: torch.Tensor) -> None:
        """Records a forward's positions, mask (R, T) bool, True = real (the prefill's: prompt)."""
        self.length += mask.shape[1]
        if self.prompt_mask is None:
            self.prompt_mask, self.generated_mask = mask, mask[:, :0]
            self.row_prompt = torch.arange(mask.shape[0], device=mask.device)
        else:
            self.generated_mask = torch.cat([self.generated_mask, mask], dim=1)

    def append(self, layer: int, k, v):
        """Stores one forward's (R, H_kv, T, D) keys/values of `layer`; returns the part joined."""
        if self.prompt_keys[layer] is None:
            self.prompt_keys[layer], self.prompt_values[layer] = k, v
            self.keys[layer], self.values[layer] = k[:, :, :0], v[:, :, :0]   # (U, H_kv, 0, D)
            return k, v
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)          # (R, H_kv, G + T, D)
        self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.LongTensor) -> None:
        """Keeps rows index[0], index[1], ...: the beams that survive a step, in their new order; a
        row may repeat (reorder(arange(U).repeat_interleave(beam_width)) makes U prompts' beams).
        Only the generated part moves; the prompt part drops prompts that no row continues."""
        index = index.to(self.row_prompt.device)
        row_prompt = self.row_prompt[index]                                   # (R',)
        used = torch.unique(row_prompt)                                       # sorted
        if used.numel() < self.prompt_mask.shape[0]:
            self.prompt_mask = self.prompt_mask[used]
            self.prompt_keys = [None if k is None else k[used] for k in self.prompt_keys]
            self.prompt_values = [None if v is None else v[used] for v in self.prompt_values]
            row_prompt = torch.searchsorted(used, row_prompt)
        self.row_prompt, self.generated_mask = row_prompt, self.generated_mask[index]
        # Advanced indexing, not index_select: on CPU index_select along dim 0 of 4-d is far slower.
        self.keys = [None if k is None else k[index] for k in self.keys]    # (R', H_kv, G, D)
        self.values = [None if v is None else v[index] for v in self.values]

    def select(self, index: torch.LongTensor) -> KVCache:
        """A new cache of rows `index` (as `reorder`), this one left as it is: reorder gives the
        shallow copy generated-part lists of its own; only the prefill writes the prompt part's."""
        other = copy.copy(self)
        other.reorder(index)
        return other


class SharedPromptPlan(NamedTuple):
    """Where each of the R rows of a decoding forward sits among its prompt's rows."""
    row_prompt: torch.Tensor          # (R,) the prompt row each row continues
    slot: torch.Tensor                # (R,) its place among the rows of that prompt
    slots: int                        # S, the most rows of any one prompt
    prompt_mask: torch.Tensor         # (U, P) bool, True = real prompt token
    generated_allowed: torch.Tensor   # (R, T, G) bool: new query t may attend to generated step g


def shared_prompt_plan(cache: KVCache, num_new: int) -> SharedPromptPlan:
    """The plan of a forward of `num_new` tokens per row on `cache` (after cache.add_positions)."""
    row_prompt, device = cache.row_prompt, cache.row_prompt.device
    count = torch.bincount(row_prompt, minlength=cache.prompt_mask.shape[0])    # (U,)
    order = torch.argsort(row_prompt, stable=True)                               # grouped by prompt
    first_of_prompt = count.cumsum(0) - count                                    # (U,)
    slot = torch.empty_like(row_prompt)
    slot[order] = torch.arange(len(row_prompt), device=device) - first_of_prompt[row_prompt[order]]
    steps = cache.generated_mask.shape[1]                                        # G, new included
    step = torch.arange(steps, device=device)
    causal = step[None, :] <= step[steps - num_new:, None]                       # (T, G)
    return SharedPromptPlan(row_prompt, slot, int(count.max()), cache.prompt_mask,
                            causal[None] & cache.generated_mask[:, None, :])


def shared_prompt_attention(q, prompt_k, prompt_v, generated_k, generated_v,
                            plan: SharedPromptPlan, scale: float):
    """Attention of R rows' new queries over their prompt's keys and their own generated keys, fp32.

    q (R, H, T, D); prompt_k/v (U, H_kv, P, D); generated_k/v (R, H_kv, G, D). No key is copied
    per row: a prompt's rows are stacked as extra queries of it (a (U, S) grid), GQA groups fold
    into the query axis, and the parts' softmaxes merge exactly through maxima and sums."""
    R, H, T, D = q.shape
    U, H_kv, P, _ = prompt_k.shape
    g = H // H_kv                                    # query head h reads key head h // g
    q = q.float().reshape(R, H_kv, g * T, D) * scale                          # (R, H_kv, gT, D)

    def softmax_parts(scores, values):   # unnormalised: (max, sum of exp, exp-weighted values)
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - top)
        return top, weights.sum(-1, keepdim=True), weights @ values

    grid = q.new_zeros(U, plan.slots, H_kv, g * T, D)
    grid[plan.row_prompt, plan.slot] = q
    grid = grid.transpose(1, 2).reshape(U, H_kv, plan.slots * g * T, D)       # (U, H_kv, S gT, D)
    scores = grid @ prompt_k.float().transpose(-1, -2)                        # (U, H_kv, S gT, P)
    scores = scores.masked_fill(~plan.prompt_mask[:, None, None, :], torch.finfo(q.dtype).min)
    prompt_max, prompt_sum, prompt_out = [         # each (R, H_kv, gT, 1 or D)
        part.view(U, H_kv, plan.slots, g * T, -1).transpose(1, 2)[plan.row_prompt, plan.slot]
        for part in softmax_parts(scores, prompt_v.float())]
    scores = (q @ generated_k.float().transpose(-1, -2)).view(R, H_kv, g, T, -1)  # (.., T, G)
    scores = scores.masked_fill(~plan.generated_allowed[:, None, None], torch.finfo(q.dtype).min)
    gen_max, gen_sum, gen_out = softmax_parts(scores.view(R, H_kv, g * T, -1), generated_v.float())
    top = torch.maximum(prompt_max, gen_max)
    prompt_scale, gen_scale = torch.exp(prompt_max - top), torch.exp(gen_max - top)
    out = ((prompt_out * prompt_scale + gen_out * gen_scale)
           / (prompt_sum * prompt_scale + gen_sum * gen_scale))
    return out.view(R, H, T, D)                                                # fp32


# ---------------------------------------------------------------------------------------- loading
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"   # no token, CPU-sized; paper: Llama-3.2-3B
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}   # --dtype's names
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
TensorEntry = NamedTuple("TensorEntry", [("file", Path), ("dtype", torch.dtype), ("shape", list),
                                         ("offset", int)])


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> where its bytes sit, checking that the file is whole (a cut download fails
    clearly). The format: an 8-byte header length, the JSON header, then the tensors' bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or 8 + header_len > size:
            raise ValueError(f"{path}: truncated safetensors file: header length {header_len} runs "
                             f"past the end of the file ({size} bytes)")
        try:
            header = dict(json.loads(f.read(header_len)))   # ValueError also when not valid UTF-8
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size, entries = size - 8 - header_len, {}
    for name, info in header.items():
        try:
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header: {name!r}: {info!r}") from None
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} data offsets [{begin}, {end}] run past the "
                             f"end of the data ({data_size} bytes) or do not fit its shape {shape} "
                             f"{info['dtype']}; truncated or corrupt file")
        entries[name] = TensorEntry(path, dtype, shape, 8 + header_len + begin)
    return entries


def load_model(path, dtype=torch.bfloat16, device="cpu") -> LlamaForCausalLM:
    """A Hugging Face Llama folder -> LlamaForCausalLM in eval() mode, loaded strictly. Built on the
    meta device, then filled by load_state_dict(assign=True) with each tensor read straight into its
    own memory (no memory map, whose pages would count again) and cast: loading never holds two
    copies of the weights. dtype=None keeps each tensor's stored dtype."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config = LlamaConfig.from_file(folder / "config.json")
    index = folder / "model.safetensors.index.json"   # the shards of a large checkpoint
    if (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif not index.is_file():
        raise FileNotFoundError(f"no weights in {folder}: neither model.safetensors nor "
                                "model.safetensors.index.json")
    else:
        weight_map = read_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise ValueError(f"{index}: not a JSON object with a 'weight_map'")
        shards = sorted(set(weight_map["weight_map"].values()))
    location = {}   # tensor name -> where it sits
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{index} names shard {shard!r}, which is missing")
        location.update(read_safetensors_header(folder / shard))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        location.pop("lm_head.weight", None)   # some tied uploads still carry a copy; HF ignores it
    for what, names in (("is missing", sorted(set(expected) - set(location))),
                        ("has unexpected", sorted(set(location) - set(expected)))):
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            raise ValueError(f"{folder}: checkpoint {what} tensor(s) {', '.join(names[:5])}{more}")
    state = {}
    for name, entry in location.items():
        if entry.shape != expected[name]:
            raise ValueError(f"{entry.file}: tensor {name!r} has shape {entry.shape}, but "
                             f"config.json implies {expected[name]}")
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()          # its own memory, as bytes
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            f.readinto(buffer)
        state[name] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:   # assign=True gave each name its own Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def weights_sha256(folder) -> str:
    """SHA-256 over a model folder's safetensors files, in name order: which weights a run used,
    whatever folder or hub id holds them (train_config.json records it, eval.py checks it)."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()

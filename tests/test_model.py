"""model.py against transformers' LlamaForCausalLM (the oracle): logits, left padding, KV-cache decoding,
logits_at, gradients, every config.json form, real SmolLM2 weights, and clear errors on bad checkpoints."""
import json
import math

import pytest
import torch
import transformers

import model as M

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

VOCAB = 256
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# Tiny random configs covering GQA, an explicit head_dim (!= hidden / heads), llama3 rope scaling with factors
# 32 and 8, tied and untied embeddings, a sharded checkpoint, biases, and the config.json forms of issue 2.
CASES = {
    # transformers 5 writes the `rope_parameters` form; head_dim 24 while hidden / heads = 16.
    "gqa_headdim_llama3x32_tied": dict(
        hf=dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, **LLAMA3_ROPE})),
    # The official Llama-3.1 upload's form: rope_theta + rope_scaling at top level, "rope_type", torch_dtype;
    # no head_dim; sharded with save_pretrained(max_shard_size=...).
    "llama3x8_untied_sharded_toplevel": dict(
        hf=dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        legacy={"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, **LLAMA3_ROPE}},
        max_shard_size="60KB"),
    # Older form: "type" instead of "rope_type", and neither head_dim nor num_key_value_heads (plain MHA);
    # plus attention / MLP biases and single-KV-head GQA is covered by the next case.
    "llama3x32_type_key_mha": dict(
        hf=dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
        legacy={"rope_theta": 50000.0, "rope_scaling": {"type": "llama3", "factor": 32.0, **LLAMA3_ROPE}},
        drop=("head_dim", "num_key_value_heads")),
    "default_rope_kv1_biases": dict(
        hf=dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def build_checkpoint(folder, case, seed=0):
    """Random weights (scaled up so attention is far from uniform), saved by transformers' save_pretrained."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         max_position_embeddings=256, rms_norm_eps=1e-5, **case["hf"])
    hf = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    hf.save_pretrained(folder, max_shard_size=case.get("max_shard_size", "50GB"))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if "legacy" in case:   # rewrite the config the way older/official uploads state it
        config.pop("rope_parameters", None)
        config.update(case["legacy"])
        config["torch_dtype"] = config.pop("dtype")
    for key in case.get("drop", ()):
        config.pop(key)
    config_path.write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
    """(name, folder, transformers oracle loaded from that folder, ours) in fp32."""
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param), CASES[request.param])
    oracle = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, folder, oracle, M.load_model(folder, dtype=torch.float32)


def left_padded_batch(lengths, total, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def hf_positions(mask):
    """What HF generate passes as position_ids for a left-padded batch."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def hf_logits(oracle, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return oracle(ids).logits.float()
        return oracle(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits.float()


# --------------------------------------------------------------------------------------- config forms

def test_config_forms_read_like_transformers(tiny):
    name, folder, oracle, ours = tiny
    raw = json.loads((folder / "config.json").read_text())
    config = M.LlamaConfig.from_file(folder / "config.json")
    hf = oracle.config
    assert config.head_dim == hf.head_dim == (24 if "headdim" in name else 16)
    assert config.num_key_value_heads == hf.num_key_value_heads
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    if hf.rope_parameters["rope_type"] == "default":
        assert config.rope_scaling is None
    else:
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert config.rope_scaling[key] == hf.rope_parameters[key]
    assert config.torch_dtype == (raw.get("torch_dtype") or raw.get("dtype")) == "float32"
    # Our inverse frequencies equal transformers' bit for bit, and the llama3 scaling really changes them.
    hf_inv_freq = oracle.model.rotary_emb.inv_freq
    assert torch.equal(ours.inv_freq, hf_inv_freq)
    if config.rope_scaling:
        unscaled = M.rope_inverse_frequencies(M.LlamaConfig(**{**vars(config), "rope_scaling": None}))
        assert not torch.allclose(unscaled, hf_inv_freq)


def test_config_dict_forms():
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=8)
    plain = M.LlamaConfig.from_dict(base)
    assert (plain.head_dim, plain.num_key_value_heads, plain.rope_theta, plain.rope_scaling) == (8, 8, 10000.0, None)
    llama32 = {"rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    top = M.LlamaConfig.from_dict({**base, **llama32, "torch_dtype": "bfloat16"})
    nested = M.LlamaConfig.from_dict({**base, "dtype": "bfloat16", "rope_parameters": {
        "rope_theta": 500000.0, **llama32["rope_scaling"]}})
    assert top == nested and top.rope_scaling["factor"] == 32.0 and top.torch_dtype == "bfloat16"
    old = M.LlamaConfig.from_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # Cross-check the linear form against transformers' frequencies too.
    hf = transformers.LlamaConfig(**{k: v for k, v in base.items() if k != "model_type"},
                                  rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf_inv, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["linear"](hf, "cpu")
    assert torch.equal(M.rope_inverse_frequencies(old), hf_inv)


# --------------------------------------------------------------------------------------- logits (fp32)

def test_fp32_logits_match_transformers(tiny):
    name, folder, oracle, ours = tiny
    ids, _ = left_padded_batch([20, 20, 20], 20)
    expected = hf_logits(oracle, ids)
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == (3, 20, VOCAB) and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5
    assert expected.std() > 1.0   # random weights big enough that a wrong detail would show
    if M.LlamaConfig.from_file(folder / "config.json").tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:
        assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    if "sharded" in name:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()


def test_logits_at_equals_full_logits_gathered(tiny):
    _, _, oracle, ours = tiny
    ids, _ = left_padded_batch([16, 16], 16, seed=2)
    logits_at = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) < 0.3
    with torch.no_grad():
        got = ours(ids, logits_at=logits_at)
    expected = hf_logits(oracle, ids)[logits_at]
    assert got.shape == (int(logits_at.sum()), VOCAB)
    assert (got - expected).abs().max() <= 1e-5


def test_left_padding_matches_transformers_and_unpadded_rows(tiny):
    _, _, oracle, ours = tiny
    ids, mask = left_padded_batch([18, 11, 5], 18)
    expected = hf_logits(oracle, ids, mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        real = mask.bool()
        assert torch.isfinite(got).all()
        assert (got[real] - expected[real]).abs().max() <= 1e-5
        # Each row alone, unpadded, gives the same logits (positions restart at 0 after the padding).
        for row in range(3):
            alone = ours(ids[row:row + 1, real[row]])
            assert (alone[0] - got[row, real[row]]).abs().max() <= 1e-5


def test_kv_cache_decoding_equals_full_forward(tiny):
    _, config_folder, oracle, ours = tiny
    ids, mask = left_padded_batch([24, 15, 9], 24, seed=4)
    expected = hf_logits(oracle, ids, mask)                          # (3, 24, V)
    cache = M.KVCache(len(ours.model.layers))
    with torch.no_grad():
        steps = [ours(ids[:, :10], attention_mask=mask[:, :10], cache=cache)]            # prefill
        steps.append(ours(ids[:, 10:14], attention_mask=mask[:, :14], cache=cache))      # a 4-token chunk
        for t in range(14, 24):                                                          # one token at a time
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    assert cache.length == 24
    got = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5

    # Without padding and without a mask (the T == 1 and the cached multi-token paths).
    expected = hf_logits(oracle, ids)
    cache = M.KVCache(len(ours.model.layers))
    with torch.no_grad():
        got = torch.cat([ours(ids[:, :8], cache=cache), ours(ids[:, 8:11], cache=cache)]
                        + [ours(ids[:, t:t + 1], cache=cache) for t in range(11, 24)], dim=1)
    assert (got - expected).abs().max() <= 1e-5


def test_kv_cache_reorder_expands_prompts_and_follows_beams(tiny):
    _, _, oracle, ours = tiny
    prompts, prompt_mask = left_padded_batch([9, 6], 9, seed=5)        # U = 2 users
    beams = 3
    g = torch.Generator().manual_seed(6)
    continuation = torch.randint(3, VOCAB, (2 * beams, 4), generator=g)
    cache = M.KVCache(len(ours.model.layers))
    with torch.no_grad():
        ours(prompts, attention_mask=prompt_mask, cache=cache)
        expand = torch.arange(2).repeat_interleave(beams)               # prompt expansion: rows 0,0,0,1,1,1
        cache.reorder(expand)
        rows, mask = prompts[expand], prompt_mask[expand]
        permutation = torch.tensor([2, 0, 0, 4, 5, 3])                 # a beam reorder (with a duplicated row)
        for step in range(4):
            if step == 2:
                cache.reorder(permutation)
                rows, mask, continuation = rows[permutation], mask[permutation], continuation[permutation]
            new = continuation[:, step:step + 1]
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            got = ours(new, attention_mask=mask, cache=cache)[:, -1]
            rows = torch.cat([rows, new], dim=1)
            expected = hf_logits(oracle, rows, mask)[:, -1]
            assert (got - expected).abs().max() <= 1e-5


def test_kv_cache_rows_in_any_order_share_their_prompt(tiny):
    """Rows of different prompts interleaved and in uneven numbers, a prompt no row continues any more (the
    cache drops it), a multi-token step with padding inside it, and select() leaving the original cache alone:
    every row's logits equal transformers' on the row's full token sequence."""
    _, _, oracle, ours = tiny
    prompts, prompt_mask = left_padded_batch([7, 4, 9], 9, seed=8)       # U = 3 prompts, P = 9
    g = torch.Generator().manual_seed(9)
    cache = M.KVCache(len(ours.model.layers))
    with torch.no_grad():
        ours(prompts, attention_mask=prompt_mask, cache=cache)
        rows = torch.tensor([2, 1, 2, 2, 1])                              # prompt 0 dropped, unsorted, 3 + 2 rows
        cache.reorder(rows)
        assert cache.prompt_mask.shape[0] == 2                             # only prompts 1 and 2 are kept
        seqs, mask = prompts[rows], prompt_mask[rows]
        for step in range(3):
            new = torch.randint(3, VOCAB, (seqs.shape[0], 1), generator=g)
            got = ours(new, cache=cache)[:, -1]
            seqs, mask = torch.cat([seqs, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
            assert (got - hf_logits(oracle, seqs, mask)[:, -1]).abs().max() <= 1e-5
            if step == 1:
                permutation = torch.tensor([4, 4, 1, 0])                   # duplicates, drops rows 2 and 3
                cache.reorder(permutation)
                seqs, mask = seqs[permutation], mask[permutation]
        # Three tokens at once, the last one padding in row 0 (right padding, as exact_topk runs prefixes).
        branch = cache.select(torch.tensor([0, 2]))
        new = torch.randint(3, VOCAB, (2, 3), generator=g)
        new_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
        got = ours(new, attention_mask=torch.cat([branch.cached_mask(), new_mask], 1), cache=branch)
        expected = hf_logits(oracle, torch.cat([seqs[[0, 2]], new], 1), torch.cat([mask[[0, 2]], new_mask], 1))
        real = new_mask.bool()
        assert (got[real] - expected[:, -3:][real]).abs().max() <= 1e-5
        # The original cache still continues its own four rows.
        new = torch.randint(3, VOCAB, (4, 1), generator=g)
        got = ours(new, cache=cache)[:, -1]
        seqs, mask = torch.cat([seqs, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        assert (got - hf_logits(oracle, seqs, mask)[:, -1]).abs().max() <= 1e-5


def test_gradients_match_transformers(tiny):
    """Autograd through the model (what training and LoRA rely on) gives transformers' gradients."""
    _, _, oracle, ours = tiny
    ours.zero_grad(), oracle.zero_grad()
    ids, _ = left_padded_batch([16, 16], 16, seed=7)
    at = torch.zeros(2, 16, dtype=torch.bool)
    at[:, 9:15] = True
    labels = ids[:, 10:16].reshape(-1)
    torch.nn.functional.cross_entropy(ours(ids, logits_at=at), labels).backward()
    torch.nn.functional.cross_entropy(oracle(ids).logits[at], labels).backward()
    hf_grads = dict(oracle.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert (p.grad - hf_grads[name].grad).abs().max() <= 1e-5 * (1 + hf_grads[name].grad.abs().max()), name
    ours.zero_grad(), oracle.zero_grad()


# --------------------------------------------------------------------------------------- bf16

# bf16: our logits must sit within a quarter of transformers' own bf16 rounding error (measured against the fp32
# logits) of transformers' bf16 logits. On this CPU build they are in fact bit-identical; the margin allows for other
# kernels, while a numerics slip (weight multiplied before the cast, bf16 RoPE angles) breaks it.
BF16_FRACTION_OF_ROUNDING_ERROR = 0.25


def assert_bf16_close(ours16, hf16, fp32_truth):
    rounding_error = (hf16 - fp32_truth).abs().max()
    assert rounding_error > 0                                       # bf16 really is coarser (the test can fail)
    assert (ours16 - hf16).abs().max() <= BF16_FRACTION_OF_ROUNDING_ERROR * rounding_error


def test_bf16_matches_transformers_within_tolerance(tiny):
    name, folder, oracle, ours = tiny
    oracle16 = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours16 = M.load_model(folder)                                   # bf16 is the default
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    ids, mask = left_padded_batch([20, 13, 7], 20, seed=8)
    real = mask.bool()
    with torch.no_grad():
        got = ours16(ids, attention_mask=mask)
        assert got.dtype == torch.bfloat16
        assert_bf16_close(got.float()[real], hf_logits(oracle16, ids, mask)[real], hf_logits(oracle, ids, mask)[real])
        # row 0 alone has no padding: the is_causal fast path
        assert_bf16_close(ours16(ids[:1]).float(), hf_logits(oracle16, ids[:1]), hf_logits(oracle, ids[:1]))


# --------------------------------------------------------------------------------------- real weights

@pytest.fixture(scope="module")
def smollm2_chat(smollm2_dir):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    chats = ["<|im_start|>user\nWrite a short story about a cat who learns to fly.<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"]
    return [tokenizer.encode(c, add_special_tokens=False).ids for c in chats]


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_dir):
    oracle = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return oracle, M.load_model(smollm2_dir, dtype=torch.float32)


def chat_batch(chats):
    """Left-padded batch of the chat prompts."""
    ids = torch.zeros(len(chats), max(len(p) for p in chats), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(chats):
        ids[row, -len(p):], mask[row, -len(p):] = torch.tensor(p), 1
    return ids, mask


def test_smollm2_logits_match_transformers_fp32_and_bf16(smollm2_dir, smollm2_chat, smollm2_fp32):
    oracle, ours = smollm2_fp32
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, mask = chat_batch(smollm2_chat)
    real = mask.bool()
    truth = hf_logits(oracle, ids, mask)[real]
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)[real]
    assert truth.abs().max() > 10                                   # real logits, 30 layers deep
    assert (got - truth).abs().max() <= 1e-5

    oracle16 = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    ours16 = M.load_model(smollm2_dir)
    with torch.no_grad():
        got16 = ours16(ids, attention_mask=mask).float()[real]
    assert_bf16_close(got16, hf_logits(oracle16, ids, mask)[real], truth)


def test_smollm2_greedy_decoding_equals_transformers_generate(smollm2_chat, smollm2_fp32):
    oracle, ours = smollm2_fp32
    prompt = torch.tensor([smollm2_chat[0]])
    with torch.no_grad():
        expected = oracle.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=32, eos_token_id=2, pad_token_id=2)[0, prompt.shape[1]:].tolist()
    cache, generated, next_input = M.KVCache(len(ours.model.layers)), [], prompt
    with torch.no_grad():
        for _ in range(32):                                         # greedy loop on our KV cache
            token = int(ours(next_input, cache=cache)[0, -1].argmax())
            generated.append(token)
            if token == 2:                                          # <|im_end|>
                break
            next_input = torch.tensor([[token]])
    assert len(expected) == 32 and generated == expected


# --------------------------------------------------------------------------------------- bad inputs

@pytest.fixture()
def checkpoint(tmp_path):
    return build_checkpoint(tmp_path / "ckpt", CASES["default_rope_kv1_biases"])


def rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder_and_config(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        M.load_model(tmp_path / "nope")
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(checkpoint)


def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        M.load_model(checkpoint)


def test_missing_extra_and_misshaped_tensors(checkpoint):
    rewrite_weights(checkpoint, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        M.load_model(checkpoint)
    rewrite_weights(checkpoint, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(96, 64),
                                                    "model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) model.layers.9.extra.weight"):
        M.load_model(checkpoint)
    def misshape(state):
        del state["model.layers.9.extra.weight"]
        state["model.norm.weight"] = torch.ones(65)
    rewrite_weights(checkpoint, misshape)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[65\], but config.json implies \[64\]"):
        M.load_model(checkpoint)


def test_untied_checkpoint_needs_lm_head(checkpoint):
    rewrite_weights(checkpoint, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) lm_head.weight"):
        M.load_model(checkpoint)


def test_truncated_and_corrupt_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[: 8 + header_len // 2])                    # cut inside the header
    with pytest.raises(ValueError, match="header length .* runs past the end of the file"):
        M.load_model(checkpoint)
    path.write_bytes(data[:-100])                                     # cut inside the tensor data
    with pytest.raises(ValueError, match="data offsets .* run past the end of the data"):
        M.load_model(checkpoint)
    path.write_bytes(data[:8] + b"{not json" + data[17:])             # garbage header
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        M.load_model(checkpoint)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="truncated safetensors file"):
        M.load_model(checkpoint)


def test_sharded_checkpoint_missing_shard(tmp_path):
    folder = build_checkpoint(tmp_path / "sharded", CASES["llama3x8_untied_sharded_toplevel"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard '{shard}', which is missing"):
        M.load_model(folder)


@pytest.mark.parametrize("edit,message", [
    ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "needs a numeric 'factor'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"hidden_size": None}, "'hidden_size' missing"),
])
def test_bad_config_values(checkpoint, edit, message):
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(edit)
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as error:
        M.load_model(checkpoint)
    assert "config.json" in str(error.value)


def test_config_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        M.load_model(checkpoint)


def test_forward_argument_checks(checkpoint):
    ours = M.load_model(checkpoint, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits_at must be a bool tensor"):
        ours(ids, logits_at=torch.ones(2, 5))
    cache = M.KVCache(len(ours.model.layers))
    with torch.no_grad():
        ours(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), cache=cache)
    with pytest.raises(ValueError, match="input_ids has 3 rows but the cache holds 2"):
        ours(torch.ones(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="attention_mask disagrees with the padding of the cached positions"):
        ours(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 6), cache=cache)
    with torch.no_grad():
        assert math.isfinite(float(ours(ids).sum()))

"""lora.py against the independent oracle: peft 0.21 on transformers' LlamaForCausalLM (tiny random configs).

Our LoRA wraps modules by their Hugging Face names, so it can be applied to transformers' model directly; the
same checks then run on our own model.py.
"""
import copy
import json
import math

import peft
import pytest
import torch
import torch.nn as nn
import transformers

import lora

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_hf_model(seed=0, dtype=torch.float32, tie=False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,  # GQA
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def input_ids(seed=1, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed=2) -> None:
    """Non-zero A and B (B starts at zero, which would hide every mistake in the adapter path)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(lora.lora_state_dict(model).items()):
            tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def peft_twin(base: nn.Module, ours: nn.Module, config: lora.LoraConfig) -> peft.PeftModel:
    """transformers + peft on a copy of `base`, carrying the same adapter weights as `ours` (through PEFT's own
    state-dict API, which takes the keys of PEFT's adapter file)."""
    peft_config = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                  target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    twin = peft.get_peft_model(copy.deepcopy(base), peft_config)
    saved_form = {"base_model.model." + name: tensor for name, tensor in lora.lora_state_dict(ours).items()}
    result = peft.set_peft_model_state_dict(twin, saved_form)
    assert not [key for key in result.unexpected_keys if "lora_" in key]
    return twin


def logits_of(model, ids) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def peft_name(name: str) -> str:  # PEFT's in-memory parameter name -> ours
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def with_lora(base, config, seed=2, dtype=torch.float32):
    ours = lora.apply_lora(copy.deepcopy(base), config, dtype=dtype)
    randomize_adapters(ours, seed)
    return ours


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_TARGETS])
def test_logits_equal_peft_with_same_adapter_fp32(targets):
    base = tiny_hf_model()
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets)
    ours = with_lora(base, config)
    twin = peft_twin(base, ours, config).eval()
    ids = input_ids()
    with torch.no_grad():
        ours_logits, peft_logits, base_logits = logits_of(ours, ids), logits_of(twin, ids), logits_of(base, ids)
    assert (ours_logits - peft_logits).abs().max().item() <= 1e-5
    assert (ours_logits - base_logits).abs().max().item() > 1e-2  # the adapters really change the output


def test_training_step_equals_peft_dropout_and_gradients():
    """Train mode with dropout: the same seed gives the same dropout masks only if dropout sits where PEFT's does
    (on the adapter input, once per wrapped layer); then logits and every LoRA gradient agree."""
    base = tiny_hf_model()
    config = lora.LoraConfig(r=4, alpha=16, dropout=0.3, target_modules=("q_proj", "v_proj", "down_proj"))
    ours = with_lora(base, config).train()
    twin = peft_twin(base, ours, config).train()
    ids = input_ids()
    results = []
    for model in (ours, twin):
        torch.manual_seed(7)
        logits = logits_of(model, ids)
        logits.log_softmax(-1)[..., 0].mean().backward()
        grads = {peft_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (ours_logits, ours_grads), (peft_logits, peft_grads) = results
    assert (ours_logits - peft_logits).abs().max().item() <= 1e-5
    torch.manual_seed(8)
    assert (logits_of(ours, ids) - ours_logits).abs().max().item() > 1e-4  # dropout is really active
    assert set(ours_grads) == set(peft_grads)  # the same parameters are trainable
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_base_keeps_fp32_adapters_like_peft():
    """peft 0.21 upcasts adapters of a bf16 model to fp32 (autocast_adapter_dtype=True); we do the same, with
    the same casts in the forward, so bf16 logits agree bit for bit."""
    base = tiny_hf_model(dtype=torch.bfloat16)
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=ALL_TARGETS)
    ours = with_lora(base, config)
    twin = peft_twin(base, ours, config).eval()
    assert {t.dtype for t in lora.lora_state_dict(ours).values()} == {torch.float32}
    assert {p.dtype for n, p in twin.named_parameters() if "lora_" in n} == {torch.float32}
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = input_ids()
    with torch.no_grad():
        ours_logits, peft_logits = ours(ids).logits, twin(ids).logits
    assert ours_logits.dtype == torch.bfloat16
    assert torch.equal(ours_logits, peft_logits)  # the same operations in the same order


def test_adapter_saved_here_loads_in_peft(tmp_path):
    base = tiny_hf_model()
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj", "up_proj"))
    ours = with_lora(base, config).eval()
    lora.save_adapter(ours, config, tmp_path / "adapter", base_model_path="tiny-llama")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    loaded_config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (loaded_config.r, loaded_config.lora_alpha, loaded_config.lora_dropout) == (4, 8, 0.1)
    assert set(loaded_config.target_modules) == {"q_proj", "v_proj", "up_proj"}
    assert loaded_config.base_model_name_or_path == "tiny-llama" and loaded_config.task_type == "CAUSAL_LM"
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ids = input_ids()
    with torch.no_grad():
        assert (logits_of(ours, ids) - logits_of(twin, ids)).abs().max().item() <= 1e-5
        assert (logits_of(ours, ids) - logits_of(base, ids)).abs().max().item() > 1e-2


def test_adapter_saved_by_peft_loads_here(tmp_path):
    base = tiny_hf_model(seed=3)
    peft_config = peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=0.05, task_type="CAUSAL_LM",
                                  target_modules=["k_proj", "o_proj", "gate_proj"])
    twin = peft.get_peft_model(copy.deepcopy(base), peft_config)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    twin.save_pretrained(str(tmp_path / "peft_adapter"))
    ours = copy.deepcopy(base)
    config = lora.load_adapter(ours, tmp_path / "peft_adapter")
    assert config == lora.LoraConfig(r=6, alpha=12, dropout=0.05, target_modules=("k_proj", "o_proj", "gate_proj"))
    assert set(lora.lora_layers(ours)) == {f"model.layers.{i}.{m}" for i in range(2)
                                          for m in ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj")}
    ours.eval(), twin.eval()
    ids = input_ids()
    with torch.no_grad():
        assert (logits_of(ours, ids) - logits_of(twin, ids)).abs().max().item() <= 1e-5
        assert (logits_of(ours, ids) - logits_of(base, ids)).abs().max().item() > 1e-2


def test_merged_equals_unmerged_and_peft_merge():
    base = tiny_hf_model()
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=ALL_TARGETS)
    ours = with_lora(base, config).eval()
    peft_merged = peft_twin(base, ours, config).merge_and_unload()
    ids = input_ids()
    with torch.no_grad():
        unmerged = logits_of(ours, ids)
        lora.merge_lora(ours)
        merged = logits_of(ours, ids)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert not lora.lora_layers(ours)
    assert all(type(m) is nn.Linear for n, m in ours.named_modules() if n.rpartition(".")[2] in ALL_TARGETS)
    assert list(ours.state_dict()) == list(base.state_dict())  # saves as an ordinary checkpoint
    for name, tensor in peft_merged.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_only_lora_parameters_receive_gradients():
    base = tiny_hf_model(tie=True)  # the tied lm_head / embedding must stay frozen too
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"))
    ours = with_lora(base, config).train()
    logits_of(ours, input_ids()).logsumexp(-1).mean().backward()
    lora_names = set(lora.lora_state_dict(ours))
    with_grad = {name for name, p in ours.named_parameters() if p.grad is not None}
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert with_grad == trainable == lora_names
    assert all(ours.get_parameter(name).grad.abs().sum() > 0 for name in lora_names)
    hidden, kv = 48, 2 * 12  # q: 48 -> 48, v: 48 -> 2 kv heads * head_dim 12
    assert sum(ours.get_parameter(n).numel() for n in trainable) == 2 * 4 * ((hidden + hidden) + (hidden + kv))


def test_initialization_starts_at_the_base_model():
    """A ~ kaiming-uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0: the first forward is the base model's,
    even in train mode with dropout (which acts only on the adapter input)."""
    base = tiny_hf_model()
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoraConfig(r=8, alpha=16, dropout=0.5,
                                                                target_modules=ALL_TARGETS)).train()
    for name, layer in lora.lora_layers(ours).items():
        bound = 1 / math.sqrt(layer.in_features)
        a = layer.lora_A.weight.detach()
        assert a.shape == (8, layer.in_features) and layer.lora_B.weight.shape == (layer.out_features, 8)
        assert a.abs().max() <= bound and a.std() == pytest.approx(bound / math.sqrt(3), rel=0.25), name
        assert torch.count_nonzero(layer.lora_B.weight) == 0 and layer.scaling == 2.0
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(logits_of(ours, ids), logits_of(base, ids))


def test_apply_lora_keeps_eval_mode():
    """Applying or loading LoRA on a model in eval() must not switch dropout on (new modules start in train mode)."""
    model = lora.apply_lora(tiny_hf_model(), lora.LoraConfig(dropout=0.5, target_modules=ALL_TARGETS))
    randomize_adapters(model)
    assert not any(module.training for module in model.modules())
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(logits_of(model, ids), logits_of(model, ids))


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the problem
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(alpha="16"), "alpha must be > 0, got '16'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(target_modules=()), "target_modules is empty"),
    (dict(target_modules=("q_proj", "qkv_proj")), r"unknown module name\(s\) \['qkv_proj'\]"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)


def test_apply_and_save_misuse():
    model = lora.apply_lora(tiny_hf_model(), lora.LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.apply_lora(model, lora.LoraConfig())
    with pytest.raises(ValueError, match="no module of the model is named"):
        lora.apply_lora(nn.Sequential(nn.Linear(3, 3)), lora.LoraConfig())
    with pytest.raises(ValueError, match="has no LoRA layers"):
        lora.save_adapter(tiny_hf_model(), lora.LoraConfig(), "/nonexistent/never-written", "base")
    with pytest.raises(ValueError, match=r"LoRA on \['q_proj', 'v_proj'\] but the config names \['q_proj'\]"):
        lora.save_adapter(model, lora.LoraConfig(target_modules=("q_proj",)), "/nonexistent/never-written", "b")


@pytest.fixture()
def saved_adapter(tmp_path):
    config = lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model = with_lora(tiny_hf_model(), config)
    lora.save_adapter(model, config, tmp_path / "adapter", base_model_path="tiny")
    return tmp_path / "adapter"


def rewrite_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    fields = json.loads(path.read_text())
    fields.update(changes)
    path.write_text(json.dumps(fields))


def rewrite_weights(adapter_dir, edit):
    from safetensors.torch import load_file, save_file
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_load_adapter_missing_files(saved_adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder not found: .*nowhere"):
        lora.load_adapter(tiny_hf_model(), tmp_path / "nowhere")
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter weights not found: .*adapter_model.safetensors"):
        lora.load_adapter(tiny_hf_model(), saved_adapter)
    (saved_adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter config not found: .*adapter_config.json"):
        lora.load_adapter(tiny_hf_model(), saved_adapter)


@pytest.mark.parametrize("corruption, message", [
    (lambda d: (d / "adapter_config.json").write_text("{\"r\": 4,"), "adapter_config.json: not valid JSON"),
    (lambda d: rewrite_config(d, peft_type="IA3"), "peft_type is 'IA3', only 'LORA'"),
    (lambda d: rewrite_config(d, use_dora=True), "use_dora=True is not supported"),
    (lambda d: rewrite_config(d, rank_pattern={"q_proj": 2}), "rank_pattern=.* is not supported"),
    (lambda d: rewrite_config(d, r=0), "adapter_config.json: LoraConfig.r must be a positive integer"),
    (lambda d: rewrite_config(d, target_modules=["q_proj", "lm_head"]), r"unknown module name\(s\) \['lm_head'\]"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "corrupt or truncated safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 5), "corrupt or truncated"),
    (lambda d: rewrite_weights(d, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")),
     r"missing 1 tensor\(s\) \['model.layers.1.self_attn.v_proj.lora_B.weight'\], unexpected 0"),
    (lambda d: rewrite_weights(d, lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
                                                      torch.zeros(4, 48)})),
     r"missing 0 tensor\(s\) \[\], unexpected 1 tensor\(s\) \['model.layers.0.mlp.up_proj.lora_A.weight'\]"),
    (lambda d: rewrite_weights(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight":
                                                      torch.zeros(4, 48)})), "without PEFT's 'base_model.model.'"),
    (lambda d: rewrite_weights(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                                      torch.zeros(4, 47)})),
     r"model.layers.0.self_attn.q_proj.lora_A.weight has shape \(4, 47\), the model expects \(4, 48\)"),
])
def test_load_adapter_bad_contents(saved_adapter, corruption, message):
    corruption(saved_adapter)
    with pytest.raises(ValueError, match=message):
        lora.load_adapter(tiny_hf_model(), saved_adapter)


def test_load_adapter_rank_mismatch_with_applied_lora(saved_adapter):
    model = lora.apply_lora(tiny_hf_model(), lora.LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 48\), the model expects \(2, 48\)"):
        lora.load_adapter(model, saved_adapter)


# ---------------------------------------------------------------------------------------------------------
# The same on our own model.py (loaded from a checkpoint transformers saved), the model the project trains
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    base = tiny_hf_model(seed=4)
    folder = tmp_path_factory.mktemp("tiny_llama")
    base.save_pretrained(str(folder))
    return base, folder


def test_our_model_training_step_equals_peft(tiny_checkpoint):
    """LoRA on model.py, logits only at label positions (logits_at), vs peft on transformers' full logits."""
    import model as our_model
    base, folder = tiny_checkpoint
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.2, target_modules=ALL_TARGETS)
    ours = lora.apply_lora(our_model.load_model(folder, dtype=torch.float32), config).train()
    randomize_adapters(ours)
    twin = peft_twin(base, ours, config).train()
    ids = input_ids(shape=(3, 13))
    label_mask = torch.zeros(3, 13, dtype=torch.bool)
    label_mask[:, 8:12] = True
    labels = ids[:, 9:13].reshape(-1)  # the token after each label position, row-major like tensor[mask]
    torch.manual_seed(11)
    ours_logits = ours(ids, logits_at=label_mask).float()  # (12, V)
    nn.functional.cross_entropy(ours_logits, labels).backward()
    torch.manual_seed(11)
    peft_logits = twin(ids).logits[label_mask]  # (12, V) out of (3, 13, V)
    nn.functional.cross_entropy(peft_logits, labels).backward()
    assert (ours_logits - peft_logits).abs().max().item() <= 1e-5
    peft_grads = {peft_name(n): p.grad for n, p in twin.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(peft_grads) == set(lora.lora_state_dict(ours))
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_our_model_adapters_move_both_ways_and_merge(tiny_checkpoint, tmp_path):
    import model as our_model
    base, folder = tiny_checkpoint
    ids = input_ids()
    config = lora.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
    ours = lora.apply_lora(our_model.load_model(folder, dtype=torch.float32), config)
    randomize_adapters(ours, seed=5)
    lora.save_adapter(ours, config, tmp_path / "ours", base_model_path=str(folder))
    into_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        ours_logits = ours(ids).float()
        assert (ours_logits - logits_of(into_peft, ids)).abs().max().item() <= 1e-5
        assert (ours_logits - logits_of(base, ids)).abs().max().item() > 1e-2

    into_peft.save_pretrained(str(tmp_path / "peft"))  # and back: PEFT's file into a fresh model.py model
    reloaded = our_model.load_model(folder, dtype=torch.float32)
    assert lora.load_adapter(reloaded, tmp_path / "peft") == config
    with torch.no_grad():
        assert (reloaded(ids).float() - ours_logits).abs().max().item() <= 1e-5
        lora.merge_lora(reloaded)
        assert (reloaded(ids).float() - ours_logits).abs().max().item() <= 1e-5
    assert set(reloaded.state_dict()) == set(our_model.load_model(folder, dtype=torch.float32).state_dict())


def test_load_adapter_into_applied_lora_takes_the_files_alpha(tmp_path):
    base = tiny_hf_model()
    config = lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    ours = with_lora(base, config).eval()
    lora.save_adapter(ours, config, tmp_path / "adapter", base_model_path="tiny")
    other = lora.apply_lora(copy.deepcopy(base), lora.LoraConfig(r=4, alpha=1, dropout=0.5)).eval()
    assert lora.load_adapter(other, tmp_path / "adapter") == config
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(logits_of(other, ids), logits_of(ours, ids))

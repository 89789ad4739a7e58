"""LoRA for the BEAR reference: a hand-written low-rank adapter layer, and adapters saved in PEFT's format.

LoRA (Hu et al., 2021, eq. 3) freezes a pretrained weight W0 and learns a low-rank update:

    h = W0 x + (alpha / r) * B A x        A: (r, in), B: (out, r), r << min(in, out)

A starts kaiming-uniform and B at zero, so the update is zero and training starts exactly at the base model
(microsoft/LoRA loralib). Dropout acts on the adapter's input only; the frozen path W0 x never sees it.

Module and tensor names follow PEFT so that adapters move both ways between this code and transformers + peft:
a wrapped projection keeps nn.Linear's `weight` / `bias`, and its adapter lives in `lora_A.weight` /
`lora_B.weight`. In a file, PEFT prefixes every key with `base_model.model.` (its PeftModel -> LoraModel ->
model wrappers), e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

Adapter dtype: the LoRA tensors are kept in fp32 even when the base model is bf16. This is what peft 0.21 does
by default (get_peft_model / PeftModel.from_pretrained upcast bf16/fp16 adapters with autocast_adapter_dtype=
True), and it is the safer training default: Adam updates of size ~1e-4 * |w| vanish in bf16's 8-bit mantissa.
As in PEFT, the layer input is cast to fp32 for the adapter path and the sum is cast back to the model dtype.

The oracle is peft itself: tests/test_lora.py compares logits, a dropout training step's gradients and merged
weights with transformers + peft, and moves adapter files both ways.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cli import write_atomically, write_text_atomic

# The seven linear projections of a Llama block that LoRA may target (module names mirror Hugging Face's).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_KEY_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel) .model (the LM)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    r: int = 8  # rank of the update B A
    alpha: int = 16  # the update is scaled by alpha / r (so changing r does not change the initial step size)
    dropout: float = 0.05  # on the adapter input only
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty; name at least one of " + ", ".join(LORA_TARGETS))
        unknown = [name for name in self.target_modules if name not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LoraConfig.target_modules: unknown module name(s) {unknown}; "
                             f"choose from {list(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """nn.Linear with a frozen base `weight` (and `bias`) plus a trainable low-rank update (Hu et al., eq. 3)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base tensors are taken over as they are (same storage, same names): no copy of the model.
        self.weight = base.weight  # (out, in), frozen
        self.bias = base.bias  # (out,) or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # A as nn.Linear's own default (kaiming-uniform, a = sqrt 5), B zero: B A = 0, training starts at W0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.train(base.training)  # new modules start in train mode; an eval() model must stay in eval (no dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) in the model dtype
        base_out = F.linear(x, self.weight, self.bias)  # (..., out) model dtype
        adapter_in = self.dropout(x.to(self.lora_A.weight.dtype))  # (..., in) adapter dtype (fp32)
        update = self.lora_B(self.lora_A(adapter_in)) * self.scaling  # (..., r) -> (..., out)
        return (base_out + update).to(base_out.dtype)  # the same casts as PEFT's lora.Linear.forward

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, (out, in), in fp32 (merging is done in fp32 and cast once, as PEFT does on CPU)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by its module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


def apply_lora(model: nn.Module, config: LoraConfig, dtype=torch.float32) -> nn.Module:
    """Wrap every nn.Linear whose last name is in config.target_modules (as PEFT matches a list of names) in a
    LoRALinear, in place, and freeze every other parameter. `dtype` is the adapter dtype (fp32, see the header)."""
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers (call it once, or merge_lora first)")
    targets = [(name, module) for name, module in model.named_modules()
               if name.rpartition(".")[2] in config.target_modules]
    if not targets:
        raise ValueError(f"apply_lora: no module of the model is named any of {list(config.target_modules)}")
    for param in model.parameters():  # freeze first: the base model (tied lm_head included) is never trained
        param.requires_grad_(False)
    for name, module in targets:
        if type(module) is not nn.Linear:
            raise ValueError(f"apply_lora: module {name} is a {type(module).__name__}, not an nn.Linear")
        _replace_module(model, name, LoRALinear(module, config.r, config.alpha, config.dropout, dtype=dtype))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (`...q_proj.lora_A.weight`)."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")}


# ---------------------------------------------------------------------------------------------------------
# PEFT's on-disk format: adapter_config.json + adapter_model.safetensors
# ---------------------------------------------------------------------------------------------------------

def _peft_config_dict(config: LoraConfig, base_model_path: str) -> dict:
    """The fields peft 0.21's LoraConfig reads; everything not written here takes PEFT's default on load."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": [name for name in LORA_TARGETS if name in config.target_modules],  # block order
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }


def save_adapter(model: nn.Module, config: LoraConfig, out_dir, base_model_path: str) -> None:
    """Write the adapter in PEFT's format; each file is written to `<file>.tmp` and then renamed into place."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (apply_lora or load_adapter first)")
    applied = {name.rpartition(".")[2] for name in layers}
    if applied != set(config.target_modules):
        raise ValueError(f"save_adapter: the model has LoRA on {sorted(applied)} but the config names "
                         f"{sorted(config.target_modules)}")
    for name, layer in layers.items():
        if layer.r != config.r or layer.scaling != config.scaling:
            raise ValueError(f"save_adapter: layer {name} has r={layer.r}, alpha={layer.alpha} but the config "
                             f"has r={config.r}, alpha={config.alpha}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_KEY_PREFIX + name: tensor.detach().cpu().contiguous()
               for name, tensor in lora_state_dict(model).items()}
    write_atomically(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(_peft_config_dict(config, base_model_path), indent=2, sort_keys=True) + "\n"
    write_text_atomic(out_dir / ADAPTER_CONFIG, text)


def _read_peft_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"adapter config not found: {path}")
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(fields).__name__}")
    if fields.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {fields.get('peft_type')!r}, only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in fields:
            raise ValueError(f"{path}: field {field!r} is missing")
    # PEFT options that change the maths; this implementation does plain LoRA only, so refuse rather than
    # silently compute something else.
    plain = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none"}
    for field, expected in plain.items():
        if fields.get(field, expected) != expected:
            raise ValueError(f"{path}: {field}={fields[field]!r} is not supported (only {field}={expected!r})")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if fields.get(field):
            raise ValueError(f"{path}: {field}={fields[field]!r} is not supported (plain LoRA only)")
    return fields


def load_adapter(model: nn.Module, adapter_dir, dtype=torch.float32) -> LoraConfig:
    """Load a PEFT-format LoRA adapter into `model`: applies LoRA first if the model has none, then loads
    strictly (every adapter tensor of the model present in the file, nothing extra, shapes equal)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    fields = _read_peft_config(adapter_dir / ADAPTER_CONFIG)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"adapter weights not found: {weights_path}"
                                + (" (only .safetensors is read, not adapter_model.bin)"
                                   if (adapter_dir / "adapter_model.bin").exists() else ""))
    try:
        file_tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
        raise ValueError(f"{weights_path}: corrupt or truncated safetensors file ({err})") from None
    not_peft = [key for key in file_tensors if not key.startswith(PEFT_KEY_PREFIX)]
    if not_peft:
        raise ValueError(f"{weights_path}: key(s) without PEFT's '{PEFT_KEY_PREFIX}' prefix: {not_peft[:3]}")
    tensors = {key[len(PEFT_KEY_PREFIX):]: tensor for key, tensor in file_tensors.items()}

    target_modules = fields["target_modules"]
    if isinstance(target_modules, str):  # PEFT allows a regex here; the file's keys say what it matched
        target_modules = {key.split(".")[-3] for key in tensors}
    if not isinstance(target_modules, (list, set)) or not all(isinstance(name, str) for name in target_modules):
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: target_modules must be a list of module names")
    unknown = sorted(set(target_modules) - set(LORA_TARGETS))
    target_modules = [name for name in LORA_TARGETS if name in target_modules] + unknown  # block order (PEFT: any)
    try:
        config = LoraConfig(r=fields["r"], alpha=fields["lora_alpha"], dropout=fields.get("lora_dropout", 0.0),
                            target_modules=tuple(target_modules))
    except ValueError as err:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: {err}") from None

    if not lora_layers(model):
        apply_lora(model, config, dtype=dtype)
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {len(missing)} tensor(s) "
                         f"{missing[:3]}, unexpected {len(unexpected)} tensor(s) {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)  # state_dict tensors share storage with the parameters; casts dtype
    for layer in lora_layers(model).values():  # the file's alpha and dropout win over a previous apply_lora
        layer.alpha, layer.scaling = config.alpha, config.scaling
        layer.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        layer.dropout.train(layer.training)
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W = W0 + (alpha / r) B A, and put plain nn.Linear layers back,
    in place. The result has the base model's exact state-dict keys (it saves as an ordinary checkpoint)."""
    for name, layer in lora_layers(model).items():
        merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        with torch.no_grad():
            weight = (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype)  # (out, in)
        merged.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            merged.bias = layer.bias
        _replace_module(model, name, merged)
    return model

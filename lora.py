"""LoRA (Hu et al., 2021, eq. 3) for the BEAR reference, and adapters in PEFT's on-disk format.

    h = W0 x + (alpha / r) * B A x        W0 frozen, A: (r, in), B: (out, r), r << min(in, out)

Names follow PEFT, so adapters move both ways between this code and transformers + peft. The adapter
stays fp32 on a bf16 model, as in peft 0.21: Adam steps of ~1e-4 * |w| would vanish in bf16's 8-bit
mantissa. The oracle is peft itself: tests/test_lora.py compares logits, a dropout training step's
gradients and merged weights with transformers + peft, and moves adapter files both ways.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cli import read_json, write_atomically, write_text_atomic

# The seven linear projections of a Llama block that LoRA may target (Hugging Face's module names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_KEY_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel) .model (the LM)
# PEFT options that change the maths: we write plain LoRA and refuse a file that asks for more.
PLAIN_LORA = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "use_dora": False,
              "use_rslora": False}
NO_PATTERNS = {"rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
               "layers_to_transform": None}


@dataclass
class LoraConfig:
    r: int = 8  # rank of the update B A
    alpha: int = 16  # the update is scaled by alpha / r (changing r keeps the initial step size)
    dropout: float = 0.05  # on the adapter input only
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):  # the one check of train.py's --lora_* flags and of an adapter's file
        def _number(value, kind):  # an int (for kind float: an int or a float), never a bool
            return isinstance(value, (int, kind)) and not isinstance(value, bool)
        self.target_modules = tuple(self.target_modules)
        if not (_number(self.r, int) and self.r >= 1):
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not (_number(self.alpha, float) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not (_number(self.dropout, float) and 0 <= self.dropout < 1):
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty; name at least one of "
                             + ", ".join(LORA_TARGETS))
        unknown = [name for name in self.target_modules if name not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LoraConfig.target_modules: unknown module name(s) {unknown}; "
                             f"choose from {list(LORA_TARGETS)}")


class LoRALinear(nn.Module):
    """nn.Linear's frozen `weight` (and `bias`) plus a trainable low-rank update (eq. 3)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # (out, in), frozen, the same storage
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None  # (out,)
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # weight A (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # weight B (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # A as nn.Linear's default (kaiming-uniform, a = sqrt 5), B zero: B A = 0, start at W0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.train(base.training)  # new modules start in train mode; an eval() model stays in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) in the model dtype
        base_out = F.linear(x, self.weight, self.bias)  # (..., out) model dtype
        adapter_in = self.dropout(x.to(self.lora_A.weight.dtype))  # (..., in) adapter dtype (fp32)
        update = self.lora_B(self.lora_A(adapter_in)) * self.scaling  # (..., r) -> (..., out)
        return (base_out + update).to(base_out.dtype)  # the casts of PEFT's lora.Linear.forward


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


def apply_lora(model: nn.Module, config: LoraConfig, dtype=torch.float32) -> nn.Module:
    """Wrap every nn.Linear whose last name is in config.target_modules (as PEFT matches a list of
    names) in a LoRALinear, in place, and freeze every other parameter. dtype: the adapter's."""
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers "
                         "(call it once, or merge_lora first)")
    targets = [(name, module) for name, module in model.named_modules()
               if name.rpartition(".")[2] in config.target_modules]
    if not targets:
        raise ValueError("apply_lora: no module of the model is named any of "
                         f"{list(config.target_modules)}")
    for param in model.parameters():  # freeze first: the base model (tied lm_head too) never trains
        param.requires_grad_(False)
    for name, module in targets:
        assert type(module) is nn.Linear, f"{name} is a {type(module).__name__}, not an nn.Linear"
        layer = LoRALinear(module, config.r, config.alpha, config.dropout, dtype=dtype)
        _replace_module(model, name, layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (`...q_proj.lora_A.weight`)."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")}


# ---- PEFT's on-disk format: adapter_config.json + adapter_model.safetensors ---------------------

def save_adapter(model: nn.Module, config: LoraConfig, out_dir, base_model_path: str) -> None:
    """Write the adapter in PEFT's format, each file whole or not at all."""
    applied = {name.rpartition(".")[2] for name in lora_layers(model)}
    if not applied:
        raise ValueError("save_adapter: the model has no LoRA layers "
                         "(apply_lora or load_adapter first)")
    if applied != set(config.target_modules):
        raise ValueError(f"save_adapter: the model has LoRA on {sorted(applied)} but the config "
                         f"names {sorted(config.target_modules)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_KEY_PREFIX + name: tensor.detach().cpu().contiguous()
               for name, tensor in lora_state_dict(model).items()}
    write_atomically(out_dir / "adapter_model.safetensors",
                     lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    # The fields peft 0.21's LoraConfig reads (any other takes PEFT's default on load).
    fields = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(base_model_path),
              "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
              "target_modules": [name for name in LORA_TARGETS if name in config.target_modules],
              "init_lora_weights": True, "inference_mode": True, "layers_pattern": None,
              "revision": None, **PLAIN_LORA, **NO_PATTERNS}
    text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    write_text_atomic(out_dir / "adapter_config.json", text)


def load_adapter(model: nn.Module, adapter_dir, dtype=torch.float32, dropout=None) -> LoraConfig:
    """Load a PEFT-format LoRA adapter into `model` (applying LoRA first if it has none), strictly:
    every adapter tensor of the model is in the file, nothing else is, and the shapes are equal.
    `dropout` replaces the file's (a run that continues an adapter trains with its own)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise FileNotFoundError(f"adapter config not found: {config_path}")
    fields = read_json(config_path)
    if fields.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {fields.get('peft_type')!r}, "
                         "only 'LORA' adapters are supported")
    unsupported = [f for f, plain in PLAIN_LORA.items() if fields.get(f, plain) != plain]
    unsupported += [f for f in NO_PATTERNS if fields.get(f)]
    if unsupported:
        raise ValueError(f"{config_path}: " + ", ".join(f"{f}={fields[f]!r}" for f in unsupported)
                         + " is not supported (plain LoRA only)")
    if not weights_path.is_file():
        raise FileNotFoundError(f"adapter weights not found: {weights_path}")
    try:
        file_tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors has its own error type for a truncated or corrupt file
        raise ValueError(f"{weights_path}: corrupt or truncated safetensors file ({err})") from None
    not_peft = [key for key in file_tensors if not key.startswith(PEFT_KEY_PREFIX)]
    if not_peft:
        raise ValueError(f"{weights_path}: key(s) without PEFT's '{PEFT_KEY_PREFIX}' prefix: "
                         f"{not_peft[:3]}")
    tensors = {key[len(PEFT_KEY_PREFIX):]: tensor for key, tensor in file_tensors.items()}

    target_modules = fields["target_modules"]
    if isinstance(target_modules, str):  # PEFT allows a regex; the file's keys say what it matched
        target_modules = {key.split(".")[-3] for key in tensors}
    unknown = sorted(set(target_modules) - set(LORA_TARGETS))
    target_modules = [name for name in LORA_TARGETS if name in target_modules] + unknown
    try:
        config = LoraConfig(r=fields["r"], alpha=fields["lora_alpha"],
                            dropout=fields.get("lora_dropout", 0.0) if dropout is None else dropout,
                            target_modules=target_modules)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None

    if not lora_layers(model):
        apply_lora(model, config, dtype=dtype)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {len(missing)} "
                         f"tensor(s) {missing[:3]}, unexpected {len(unexpected)} tensor(s) "
                         f"{unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    for name, tensor in tensors.items():
        expected[name].copy_(tensor)  # state_dict() tensors are detached views of the parameters
    for layer in lora_layers(model).values():  # the file's alpha and dropout win over apply_lora's
        layer.alpha, layer.scaling = config.alpha, config.alpha / config.r
        layer.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        layer.dropout.train(layer.training)
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W = W0 + (alpha / r) B A, and put plain nn.Linear
    layers back, in place: the result has the base model's exact state-dict keys."""
    for name, layer in lora_layers(model).items():
        merged = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        # (alpha / r) B A, (out, in): in fp32 and cast once, as PEFT does on CPU
        delta = (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling
        weight = (layer.weight.float() + delta).to(layer.weight.dtype)
        merged.weight, merged.bias = nn.Parameter(weight, requires_grad=False), layer.bias
        _replace_module(model, name, merged)
    return model

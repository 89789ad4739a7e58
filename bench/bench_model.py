"""Speed and memory of model.py + lora.py against transformers + peft (issue 2, "Speed and memory").

On SmolLM2-135M (bf16, CPU), with identical inputs (a batch of real Office test prompts with their targets):
  * a LoRA training step (forward + backward), ours vs transformers + peft. Ours projects to the vocabulary only
    at the label positions (model(input_ids, logits_at=label_mask)); transformers computes every position's
    logits and lets `labels=` pick them, as a user of transformers would;
  * a no-grad forward with full (B, T, V) logits, ours vs transformers;
  * the training step's achieved FLOP/s as a fraction of this machine's bf16 `a @ b` rate, measured in this run;
  * peak RSS while loading (each library in a fresh subprocess) against the checkpoint's size (goal <= 1.1x).
The machine's cores are shared, so the two sides are timed interleaved and the median of the repeats is kept.

    python bench/bench_model.py [--batch-size 4] [--repeats 5]
"""
import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402  (the stages are flat files at the repo root)
import lora  # noqa: E402
import model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


@dataclass
class BenchConfig:
    model_dir: str = str(Path.home() / ".cache" / "bear-tests" / "smollm2")
    data_dir: str = str(REPO.parent / "shared" / "data" / "amazon")
    batch_size: int = 4  # Office test prompts per batch
    repeats: int = 5  # timed runs per side (after one warm-up); the median is reported
    matmul_size: int = 2048  # n of the bare bf16 (n, n) @ (n, n) that measures the machine's peak


# ---------------------------------------------------------------------------------------------------------
# Inputs: real Office prompts (SPEC §1) + '"Title"' + EOS, right-padded
# ---------------------------------------------------------------------------------------------------------

def office_batch(config: BenchConfig, tokenizer) -> dict:
    folder = Path(config.data_dir) / "Office"
    titles = {int(k): v for k, v in json.loads((folder / "id2name4Rec.json").read_text()).items()}
    with open(folder / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))[: config.batch_size]
    info = data.DATASETS["office"]
    sequences, prompt_lengths = [], []
    for row in rows:
        *history, target = json.loads(row["item_ids"])
        prompt = tokenizer.encode(data.build_prompt(info, [titles[i] for i in history[-10:]]))
        if tokenizer.add_bos:
            prompt = [tokenizer.bos_id] + prompt
        sequences.append(prompt + tokenizer.encode(data.target_text(titles[target])) + [tokenizer.eos_id])
        prompt_lengths.append(len(prompt))
    length = max(map(len, sequences))
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    label_mask = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, T) positions whose NEXT token is a target
    hf_labels = torch.full((len(rows), length), -100, dtype=torch.long)  # transformers shifts these itself
    for row, (tokens, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        label_mask[row, prompt_length - 1: len(tokens) - 1] = True
        hf_labels[row, prompt_length:len(tokens)] = torch.tensor(tokens[prompt_length:])
    labels = input_ids[:, 1:][label_mask[:, :-1]]  # (N,) the token after each label position, row-major
    return {"input_ids": input_ids, "label_mask": label_mask, "labels": labels, "hf_labels": hf_labels}


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------

def interleaved_medians(functions: dict, repeats: int) -> dict:
    """Run each function once to warm up, then `repeats` rounds of all of them in turn; median seconds each."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bf16_matmul_rate(n: int, repeats: int) -> float:
    """FLOP/s of a bare bf16 (n, n) @ (n, n): the physical limit for this model's matmuls on this machine."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    seconds = interleaved_medians({"mm": lambda: a @ b}, repeats * 2)["mm"]
    return 2 * n ** 3 / seconds


def training_step_flops(config, batch_tokens: int, seq_len: int, batch_size: int, label_tokens: int,
                        lora_config) -> float:
    """Matmul FLOPs of one LoRA step of ours. The base weights are frozen, so the backward pass of each linear
    layer computes only the input gradient (1x the forward, not the 2x of full fine-tuning). Attention is counted
    as the full T x T product (SDPA's causal kernel on CPU computes about that)."""
    h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d
    linear_params = h * (q_out + 2 * kv_out) + q_out * h + 3 * h * config.intermediate_size  # per layer
    sizes = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
             "gate_proj": (h, config.intermediate_size), "up_proj": (h, config.intermediate_size),
             "down_proj": (config.intermediate_size, h)}
    lora_params = sum(lora_config.r * sum(sizes[name]) for name in lora_config.target_modules)
    forward = (2 * batch_tokens * (linear_params + lora_params) * layers
               + 4 * batch_size * seq_len ** 2 * config.num_attention_heads * d * layers  # QK^T and PV
               + 2 * label_tokens * h * config.vocab_size)  # lm_head at label positions only
    backward = (2 * batch_tokens * linear_params * layers  # input gradients of the frozen layers
                + 3 * 2 * batch_tokens * lora_params * layers  # LoRA: input and both weight gradients
                + 8 * batch_size * seq_len ** 2 * config.num_attention_heads * d * layers
                + 2 * label_tokens * h * config.vocab_size)
    return forward + backward


LOAD_SCRIPT = """
import sys, json, torch
def rss():  # bytes: total resident, its peak, anonymous (heap copies) and file-backed (memory-mapped weights)
    fields = {'VmRSS': 'rss', 'VmHWM': 'peak', 'RssAnon': 'anon', 'RssFile': 'file'}
    return {fields[line.split(':')[0]]: int(line.split()[1]) * 1024
            for line in open('/proc/self/status') if line.split(':')[0] in fields}
which, path, repo = sys.argv[1:4]
sys.path.insert(0, repo)
torch.ones(1).sum()  # torch's own lazy start-up is not loading, and neither is the one-time import of the
with torch.device('meta'):  # meta-tensor machinery (~70 MiB of Python modules, whatever the model's size) that
    torch.nn.Embedding(1, 1)  # building any model on the meta device triggers, ours and transformers' alike
if which == 'ours':
    import model
    load = lambda: model.load_model(path, dtype=torch.bfloat16)
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
before = rss()
m = load()
with torch.no_grad():  # read every weight once: memory-mapped tensors only become resident when touched
    for p in m.parameters():
        p.reshape(-1)[::512].float().sum()  # one element per 1 KiB: every page, no full-size temporary
print(json.dumps({'before': before, 'after': rss()}))
"""


def loading_peak_rss(which: str, model_dir: str) -> dict:
    """RSS while loading, in a fresh process, before and after (read after touching every weight once, so lazily
    memory-mapped tensors count in full)."""
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, which, model_dir, str(REPO)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in fields(BenchConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    config = BenchConfig(**vars(parser.parse_args(argv)))

    import peft  # the oracles, for the comparison only
    import transformers

    model_dir = Path(config.model_dir)
    tokenizer = load_tokenizer(model_dir)
    batch = office_batch(config, tokenizer)
    batch_size, seq_len = batch["input_ids"].shape
    label_tokens = int(batch["label_mask"].sum())
    print(f"SmolLM2-135M bf16 on CPU ({torch.get_num_threads()} threads), batch {batch_size} Office prompts, "
          f"T = {seq_len} (right-padded), {label_tokens} label tokens, median of {config.repeats}")

    ours = model.load_model(model_dir, dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    ids = batch["input_ids"]

    # No-grad forward, full (B, T, V) logits on both sides.
    with torch.no_grad():
        logits_gap = (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()
        forward = interleaved_medians({"ours": lambda: ours(ids), "theirs": lambda: theirs(ids)}, config.repeats)

    # LoRA training step: the same adapter (non-zero B) on both sides, dropout active.
    lora_config = lora.LoraConfig()
    lora.apply_lora(ours, lora_config).train()
    with torch.no_grad():
        for tensor in lora.lora_state_dict(ours).values():
            tensor.normal_(0, 0.02)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(
        r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
        target_modules=list(lora_config.target_modules), task_type="CAUSAL_LM"))
    peft.set_peft_model_state_dict(theirs, {"base_model.model." + k: v for k, v in lora.lora_state_dict(ours).items()})
    theirs.train()

    def ours_loss():
        logits = ours(ids, logits_at=batch["label_mask"])  # (N, V): the lm_head runs only at label positions
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    def theirs_loss():
        return theirs(input_ids=ids, labels=batch["hf_labels"]).loss  # (B, T, V) logits, loss on the labels

    def step(module, loss_fn):
        module.zero_grad(set_to_none=True)
        loss_fn().backward()

    with torch.no_grad():
        ours.eval(), theirs.eval()
        loss_gap = abs(ours_loss().item() - theirs_loss().item())
    ours.train(), theirs.train()
    train = interleaved_medians({"ours": lambda: step(ours, ours_loss), "theirs": lambda: step(theirs, theirs_loss)},
                                config.repeats)

    peak_rate = bf16_matmul_rate(config.matmul_size, config.repeats)
    flops = training_step_flops(ours.config, batch_size * seq_len, seq_len, batch_size, label_tokens, lora_config)
    checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    load_ours, load_theirs = loading_peak_rss("ours", str(model_dir)), loading_peak_rss("theirs", str(model_dir))

    print(f"same inputs, same answers: base logits max |delta| = {logits_gap:.3f}, LoRA eval loss |delta| = "
          f"{loss_gap:.4f} (bf16, same adapter)")
    print(f"LoRA training step (fwd + bwd): ours {train['ours']:.3f} s, transformers + peft {train['theirs']:.3f} s"
          f"  -> speed-up {train['theirs'] / train['ours']:.2f}x")
    print(f"no-grad forward (full logits):  ours {forward['ours']:.3f} s, transformers {forward['theirs']:.3f} s"
          f"  -> speed-up {forward['theirs'] / forward['ours']:.2f}x")
    achieved = flops / train["ours"]
    print(f"training step: {flops / 1e9:.1f} GFLOP in {train['ours']:.3f} s = {achieved / 1e9:.1f} GFLOP/s = "
          f"{achieved / peak_rate:.0%} of bare bf16 a @ b ({config.matmul_size}^3: {peak_rate / 1e9:.1f} GFLOP/s)")
    print(f"loading, peak RSS growth in a fresh process / checkpoint size ({checkpoint_bytes / 2**20:.0f} MiB):")
    for name, rss in (("ours", load_ours), ("transformers", load_theirs)):
        before, after = rss["before"], rss["after"]
        growth = {key: (after[key] - before[key]) / checkpoint_bytes for key in ("anon", "file")}
        print(f"  {name:12s} {(after['peak'] - before['rss']) / checkpoint_bytes:.2f}x  (memory-mapped file pages "
              f"{growth['file']:.2f}x + anonymous memory {growth['anon']:.2f}x; process peak "
              f"{after['peak'] / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

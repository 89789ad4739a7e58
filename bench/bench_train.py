"""Training throughput of train.py's step on SmolLM2-135M (bf16, CPU), side by side in one run:

  1. ours (model.py + lora.py + loss.py, logits only at the label positions) vs a plain transformers + peft
     loop (full (b, T, V) logits, cross-entropy with -100 labels) on the SAME micro-batch: label tokens / s;
  2. the step-time ratios of the losses: bear / sft, bear / msl, obj31 / sft (issue 4's goals: bear <= 1.05x,
     obj31 < 2.5x), sdpo / sft and sdpo-bear / sdpo (the same prompts; S-DPO's reference log-probs, computed
     once per run, are not part of a step);
  3. the validation pass's share of an epoch at the paper's sizes (10,000 training windows, Office's 1,925
     validation windows, B = 10), from the measured time per training window and per validated window.

    python bench/bench_train.py [--model ~/.cache/bear-tests/smollm2] [--batch 4] [--repeats 3] [--valid 8]

Timings are medians over --repeats steps after one warm-up step. Ratios, not absolute numbers, are the
result: the absolute ones depend on the machine and on what else runs on it.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
from bench_model import interleaved_medians  # noqa: E402  (this folder is on sys.path when run as a script)
import train  # noqa: E402
from cli import Distributed  # noqa: E402
from eval import evaluate  # noqa: E402
from beam import BeamConfig  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def our_step(model, optimizer, batch, micro, trie, config, tokenizer, preference=None):
    def step():  # (N,) per label position; S-DPO: (U,) per prompt
        per_position = train.label_position_losses(model, batch, micro, trie, config, tokenizer, None, preference)
        (per_position.sum() / per_position.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def peft_step(model, optimizer, batch):
    input_ids = batch["input_ids"]  # (b, T)
    labels = torch.full_like(input_ids, -100)
    labels[:, 1:][batch["label_mask"][:, :-1]] = batch["labels"]  # HF shifts labels inside the loss
    attention_mask = torch.ones_like(input_ids)
    pad_tail = torch.zeros_like(input_ids, dtype=torch.bool)  # right padding: mask it as HF users do
    for row in range(input_ids.shape[0]):
        last = int(batch["label_mask"][row].nonzero().max()) + 1  # position of the EOS label
        pad_tail[row, last + 1:] = True
    attention_mask[pad_tail] = 0

    def step():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache" / "bear-tests" / "smollm2"))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "amazon"))
    parser.add_argument("--dataset", default="office")
    parser.add_argument("--batch", type=int, default=4, help="windows per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--valid", type=int, default=8, help="validation windows to time")
    parser.add_argument("--losses", default="sft,msl,bear,obj31,sdpo,sdpo-bear")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = load_tokenizer(args.model)
    dataset = data.load_dataset(data.DataConfig(dataset=args.dataset, data_dir=args.data_dir))
    trie = data.build_trie(dataset, tokenizer)
    micro = data.encode_examples(dataset.train[:args.batch], dataset, tokenizer, trie)
    batch = data.collate_train(micro, tokenizer.pad_id)
    tokens = batch["num_label_tokens"]
    print(f"SmolLM2-135M bf16, CPU ({torch.get_num_threads()} threads); micro-batch of {args.batch} {args.dataset} "
          f"windows: {tuple(batch['input_ids'].shape)} input ids, {tokens} label tokens")

    steps = {}
    model = load_model(args.model, dtype=torch.bfloat16)
    apply_lora(model, train.lora_config(train.TrainConfig()))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    negatives = data.sample_negatives(dataset.train[:args.batch], dataset.titles, 3, seed=42)  # (U, 3)
    preference = negatives, torch.zeros(args.batch, 4, dtype=torch.float64)  # the reference's values: no cost
    for loss in args.losses.split(","):
        config = train.TrainConfig(dataset=args.dataset, model=args.model, loss=loss)
        steps[loss] = our_step(model, optimizer, batch, micro, trie, config, tokenizer,
                               preference if loss in train.PREFERENCE_LOSSES else None)

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    reference = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    reference = get_peft_model(reference, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                     target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    reference.train()
    reference_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4,
                                            weight_decay=0.0)
    steps["transformers+peft sft"] = peft_step(reference, reference_optimizer, batch)

    seconds = interleaved_medians(steps, args.repeats)
    for name, value in seconds.items():
        print(f"  {'ours ' + name if name in train.LOSSES else name:22s} {value:7.2f} s/step  "
              f"{tokens / value:8.1f} label tok/s", flush=True)
    seconds["peft"] = seconds.pop("transformers+peft sft")

    model.eval()
    beam_config = BeamConfig(beam_width=10, batch_size=args.valid)
    start = time.perf_counter()
    evaluate(model, dataset, tokenizer, trie, dataset.valid[:args.valid], beam_config, Distributed())
    valid_per_window = (time.perf_counter() - start) / args.valid

    print("\nratios (same run, same batch):")
    if "sft" in seconds:
        print(f"  throughput ours sft / transformers+peft sft: {seconds['peft'] / seconds['sft']:.2f}x")
    for num, den in (("bear", "sft"), ("bear", "msl"), ("obj31", "sft"), ("sdpo", "sft"), ("sdpo-bear", "sdpo")):
        if num in seconds and den in seconds:
            print(f"  step time {num} / {den}: {seconds[num] / seconds[den]:.3f}x")
    for loss in ("sft", "bear"):
        if loss in seconds:
            train_time = 10000 / args.batch * seconds[loss]
            valid_time = 1925 * valid_per_window
            print(f"  validation share of a {loss} epoch (10,000 train + 1,925 valid windows, B=10): "
                  f"{valid_time / (train_time + valid_time):.1%}  ({valid_per_window:.2f} s per validated window, "
                  f"{seconds[loss] / args.batch:.2f} s per trained window)")


if __name__ == "__main__":
    main()

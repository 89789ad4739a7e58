"""Forward + backward time of the training losses side by side, at realistic sizes.

    python bench/bench_loss.py [--positions 2000] [--repeats 7] [--dtype bf16] [--threads 1]

N label positions with next-token valid sets drawn like an item trie's (most positions allow 1-5 tokens, a few
allow thousands), for the Llama-3 vocabulary (128256) and SmolLM2's (49152). Each loss is timed from the
(N, V) logits (a leaf in the model's dtype) to their gradient; the timings of the different losses are
interleaved round by round and the median is reported, so the ratios share the machine's load. Goal (issue 4):
bear / msl and bear(base=sft) / sft at most 1.05.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loss  # noqa: E402


def trie_like_valid_sets(num_positions, vocab_size, labels, generator):
    """COO (row, token) pairs: 2% of positions with 500-5000 valid tokens (the first title tokens), 10% with
    6-50, the rest with 1-5 (deep inside a title, mostly a single continuation). The label is always valid."""
    rows, tokens = [], []
    for i in range(num_positions):
        u = float(torch.rand(1, generator=generator))
        if u < 0.02:
            size = int(torch.randint(500, 5001, (1,), generator=generator))
        elif u < 0.12:
            size = int(torch.randint(6, 51, (1,), generator=generator))
        else:
            size = [1, 1, 1, 2, 3, 5][int(torch.randint(6, (1,), generator=generator))]
        others = torch.randint(vocab_size, (size * 2,), generator=generator).unique()
        others = others[others != labels[i]][: size - 1]
        valid = torch.cat([labels[i : i + 1], others])
        rows.append(torch.full_like(valid, i))
        tokens.append(valid)
    return torch.cat(rows), torch.cat(tokens)


def time_forward_backward(fn, logits):
    leaf = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(leaf).sum().backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, logits {args.dtype}, "
          f"N = {args.positions}, median of {args.repeats}")

    for vocab_size in (128256, 49152):
        gen = torch.Generator().manual_seed(0)
        logits = (2 * torch.randn(args.positions, vocab_size, generator=gen)).to(dtype)
        labels = torch.randint(vocab_size, (args.positions,), generator=gen)
        rows, tokens = trie_like_valid_sets(args.positions, vocab_size, labels, gen)
        logits, labels, rows, tokens = (t.to(device) for t in (logits, labels, rows, tokens))
        sizes = torch.bincount(rows, minlength=args.positions)
        losses = {
            "sft": lambda z: loss.sft(z, labels),
            "bear(sft)": lambda z: loss.bear(z, labels, rows, tokens, base="sft"),
            "msl": lambda z: loss.msl(z, labels, rows, tokens),
            "bear(msl)": lambda z: loss.bear(z, labels, rows, tokens),
        }
        times = {name: [] for name in losses}
        for round_index in range(args.repeats + 1):  # round 0 warms up
            for name, fn in losses.items():
                sync()
                elapsed = time_forward_backward(fn, logits)
                sync()
                if round_index:
                    times[name].append(elapsed)
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nV = {vocab_size}: M = {rows.numel()} valid pairs, |V_t| max {int(sizes.max())}, "
              f"{float((sizes == 1).float().mean()):.0%} single-token positions")
        for name, seconds in median.items():
            print(f"  {name:10s} forward+backward {seconds * 1000:8.1f} ms")
        print(f"  ratio bear(msl) / msl = {median['bear(msl)'] / median['msl']:.3f}")
        print(f"  ratio bear(sft) / sft = {median['bear(sft)'] / median['sft']:.3f}")
        print(f"  ratio msl / sft       = {median['msl'] / median['sft']:.3f}")


if __name__ == "__main__":
    main()

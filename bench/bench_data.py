"""Clothing (22948 items, 44351 train windows) from CSV to training batches, prompt batches and the item trie.

    python bench/bench_data.py [--dataset clothing] [--data-dir ../shared/data/amazon] [--tokenizer DIR] [--batch 16]

Prints the time of each stage, the peak memory, and, side by side, what the authors' dense vocabulary-wide mask
(one vocabulary-size row per label token, about 30 GB for 10k samples) would take for the same batches.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def load_tokenizer(path: Path):
    try:
        from tokenizer import load_tokenizer
        return load_tokenizer(path), "model.load_tokenizer"
    except (ImportError, AttributeError):   # the model stage not there yet: the HF library as a stand-in
        sys.path.insert(0, str(REPO / "tests"))
        from test_data import HFTokenizer
        return HFTokenizer(path / "tokenizer.json", "<|begin_of_text|>", "<|end_of_text|>", True), "HF tokenizers"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "amazon"))
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "llama3"))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    tokenizer, source = load_tokenizer(Path(args.tokenizer))
    baseline = peak_rss_mb()
    times = {}   # name -> (wall seconds, CPU seconds): the machine is shared, so CPU time is the steadier one

    start, cpu = time.perf_counter(), time.process_time()
    dataset = data.load_dataset(data.DataConfig(args.dataset, data_dir=args.data_dir))
    times["read CSVs + splits"] = (time.perf_counter() - start, time.process_time() - cpu)

    start, cpu = time.perf_counter(), time.process_time()
    trie = data.build_trie(dataset, tokenizer)
    times["trie (encode titles + build)"] = (time.perf_counter() - start, time.process_time() - cpu)

    start, cpu = time.perf_counter(), time.process_time()
    train = data.encode_examples(dataset.train, dataset, tokenizer, trie)
    times["encode train sample"] = (time.perf_counter() - start, time.process_time() - cpu)

    start, cpu = time.perf_counter(), time.process_time()
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in dataset.valid + dataset.test]
    times["encode valid+test prompts"] = (time.perf_counter() - start, time.process_time() - cpu)

    start, cpu = time.perf_counter(), time.process_time()
    batches = [data.collate_train(train[i:i + args.batch], tokenizer.pad_id) for i in range(0, len(train), args.batch)]
    prompt_batches = [data.collate_prompts(prompts[i:i + args.batch], tokenizer.pad_id)
                      for i in range(0, len(prompts), args.batch)]
    times["collate all batches"] = (time.perf_counter() - start, time.process_time() - cpu)

    start, cpu = time.perf_counter(), time.process_time()
    valid_pairs = sum(len(trie.valid_next(b["label_nodes"])[0]) for b in batches)
    times["valid_next for every label"] = (time.perf_counter() - start, time.process_time() - cpu)
    peak = peak_rss_mb()

    # Side by side on the same batches: the dense mask (label tokens x vocabulary, bool) the authors build.
    vocab = tokenizer.vocab_size
    label_tokens = sum(b["num_label_tokens"] for b in batches)
    dense_gb = label_tokens * vocab / 1e9
    sample = batches[:20]
    start = time.perf_counter()
    for b in sample:
        trie.valid_next(b["label_nodes"])
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for b in sample:
        rows, tokens = trie.valid_next(b["label_nodes"])
        dense = torch.zeros(b["num_label_tokens"], vocab, dtype=torch.bool)     # (N, V)
        dense[rows, tokens] = True
    dense_time = time.perf_counter() - start

    print(f"{dataset.info.folder} with the Llama-3 tokenizer ({source}), batch {args.batch}:")
    print(f"  {len(dataset.titles)} items, train pool read from CSV, {len(dataset.train)} train / {len(dataset.valid)} "
          f"valid / {len(dataset.test)} test windows; trie {trie.num_nodes} nodes")
    for note in dataset.notes:
        print(f"  note: {note}")
    for name, (wall, cpu) in times.items():
        print(f"  {name:32s} {wall:7.2f} s wall {cpu:7.2f} s CPU")
    print(f"  {'total':32s} {sum(w for w, _ in times.values()):7.2f} s wall {sum(c for _, c in times.values()):7.2f} s CPU"
          f"   (target < 30 s)")
    print(f"  {len(batches)} training batches ({label_tokens} label tokens, {valid_pairs} valid (node, token) pairs), "
          f"{len(prompt_batches)} prompt batches")
    print(f"  peak RSS {peak:.0f} MB ({peak - baseline:.0f} MB above the {baseline:.0f} MB after imports)")
    print(f"  dense label x vocabulary mask for these {len(train)} samples: {dense_gb:.1f} GB "
          f"(authors: ~30 GB for 10k samples) -> ours {(peak - baseline) / 1e3 / dense_gb:.4f} of it")
    print(f"  20 batches: COO valid_next {ours * 1e3:.0f} ms vs building the dense mask {dense_time * 1e3:.0f} ms "
          f"({dense_time / ours:.1f}x)")


if __name__ == "__main__":
    main()

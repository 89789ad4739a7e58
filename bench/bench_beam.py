"""Speed of beam.py on SmolLM2-135M, bf16, CPU, Office test prompts, measured side by side in one run.

1. Constrained beam search (B = 10): users/second of beam.beam_search against transformers' constrained
   `generate(num_beams=B)` driven by a memoised trie lookup (a dict from generated tokens to the trie node, the
   valid tokens read straight off the CSR arrays), and how many users got identical outputs.
2. Exact top-K (beam.exact_topk) against exhaustive scoring of every item (each title teacher-forced on top of
   the prompt's KV cache, in chunks); the exhaustive time is measured on the first `--exhaustive-chunks`
   chunks of one user and scaled to the whole catalogue (stated in the output).

    python bench/bench_beam.py --users 16 --max-history 10
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import beam  # noqa: E402
import data  # noqa: E402
import model as llama  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


@torch.no_grad()
def exhaustive_scores(model, prompt, trie, pad_id, chunk, max_chunks):
    """Total masked log-prob of every distinct title, teacher-forced in chunks on the prompt cache.
    Returns (scores of the chunks done, number of chunks done, number of chunks in all)."""
    cache, logits = beam.prefill(model, [prompt], pad_id)
    titles = sorted(set(trie.item_tokens.values()))
    chunks = [titles[i:i + chunk] for i in range(0, len(titles), chunk)]
    scores = {}
    for seqs in chunks[:max_chunks]:
        depth = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), depth), pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        new_mask = (torch.arange(depth)[None] < lengths[:, None]).long()
        rows = cache.select(torch.zeros(len(seqs), dtype=torch.long))                 # n rows on one prompt
        out = model(ids[:, :-1], attention_mask=torch.cat([rows.cached_mask(), new_mask[:, :-1]], 1),
                    cache=rows).float()                                                  # (n, depth - 1, V)
        out = torch.cat([logits.expand(len(seqs), -1)[:, None], out], 1)             # (n, depth, V)
        for r, s in enumerate(seqs):
            nodes = torch.tensor(trie.path(s))
            row, token = trie.valid_next(nodes)
            valid = out[r, row, token]
            lse = torch.full((len(s),), -math.inf).scatter_reduce(0, row, valid, "amax")
            lse = lse + torch.log(torch.zeros(len(s)).index_add(0, row, torch.exp(valid - lse[row])))
            scores[s] = float((out[r, torch.arange(len(s)), torch.tensor(s)] - lse).sum())
    return scores, min(max_chunks, len(chunks)), len(chunks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache" / "bear-tests" / "smollm2"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon"))
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="users per pass, both implementations")
    parser.add_argument("--topk-users", type=int, default=4)
    parser.add_argument("--exhaustive-chunks", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--skip-search", action="store_true", help="only the exact top-K part")
    parser.add_argument("--skip-topk", action="store_true", help="only the beam search part")
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    dataset = data.load_dataset(data.DataConfig("office", data_dir=args.data, max_history=args.max_history))
    tokenizer = load_tokenizer(args.model)
    trie = data.build_trie(dataset, tokenizer)
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in dataset.test[:args.users]]
    ours = llama.load_model(args.model, dtype=torch.bfloat16)
    hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    width, longest = 10, max(len(t) for t in trie.item_tokens.values())
    print(f"{len(prompts)} Office test users, mean prompt {sum(map(len, prompts)) / len(prompts):.0f} tokens, "
          f"B = {width}, bf16, {torch.get_num_threads()} threads")

    if not args.skip_search:
        search_benchmark(args, ours, hf, trie, tokenizer, prompts, width, longest)
    if not args.skip_topk:
        topk_benchmark(args, ours, trie, tokenizer, prompts)


def transformers_constrained_search(hf, prompts, trie, tokenizer, width, batch_size, max_new_tokens):
    """transformers' stock constrained beam search, as a user of transformers would run it: `generate(num_beams=B)`
    on `batch_size` users at a time (each prompt prefilled B times), driven by tests/test_beam.py's memoised trie
    processor (masking before the softmax). Returns per user [(frozenset of item ids, score)], best first, like
    beam.beam_search; placeholder hypotheses (scored about -1e9 when fewer than B items are reachable) are dropped."""
    from test_beam import TrieLogitsProcessor  # the oracle's memoised trie processor (imports transformers)
    results = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        input_ids, attention_mask = data.collate_prompts(batch, tokenizer.pad_id)
        processor = TrieLogitsProcessor(trie, input_ids.shape[1], mask_before=True)
        out = hf.generate(input_ids=input_ids.to(hf.device), attention_mask=attention_mask.to(hf.device),
                          num_beams=width, num_return_sequences=width, length_penalty=0.0, do_sample=False,
                          max_new_tokens=max_new_tokens, logits_processor=[processor], eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id, return_dict_in_generate=True, output_scores=True)
        for user in range(len(batch)):
            result = []
            for seq, score in zip(out.sequences[user * width:(user + 1) * width].tolist(),
                                  out.sequences_scores[user * width:(user + 1) * width].tolist()):
                generated = tuple(seq[input_ids.shape[1]:])
                if score > -1e6:
                    result.append((trie.leaf_items[processor.node(generated[:generated.index(tokenizer.eos_id) + 1])],
                                   float(score)))
            results.append(result)
    return results


def search_benchmark(args, ours, hf, trie, tokenizer, prompts, width, longest):
    start, cpu_start = time.perf_counter(), time.process_time()
    found = beam.beam_search(ours, prompts, trie, tokenizer.eos_id, tokenizer.pad_id,
                             beam.BeamConfig(beam_width=width, batch_size=args.batch_size))
    ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    start, cpu_start = time.perf_counter(), time.process_time()
    expected = transformers_constrained_search(hf, prompts, trie, tokenizer, width, args.batch_size, longest + 1)
    hf_s, hf_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    same_items = sum([i for i, _ in f] == [i for i, _ in e] for f, e in zip(found, expected))
    print(f"beam search: ours {len(prompts) / ours_s:.3f} users/s ({ours_s:.1f} s), transformers generate "
          f"{len(prompts) / hf_s:.3f} users/s ({hf_s:.1f} s): {hf_s / ours_s:.2f}x (CPU time: ours {ours_cpu:.1f} s, "
          f"transformers {hf_cpu:.1f} s: {hf_cpu / ours_cpu:.2f}x); identical item lists "
          f"{same_items}/{len(prompts)} (bf16: different batch shapes round differently, so near-ties can swap)")


def topk_benchmark(args, ours, trie, tokenizer, prompts):
    users = prompts[:args.topk_users]
    start = time.perf_counter()
    top = beam.exact_topk(ours, users, trie, 10, tokenizer.eos_id, tokenizer.pad_id,
                          beam.BeamConfig(batch_size=args.batch_size))
    topk_s = (time.perf_counter() - start) / len(users)
    start = time.perf_counter()
    scores, done, total = exhaustive_scores(ours, users[0], trie, tokenizer.pad_id, args.chunk,
                                            args.exhaustive_chunks)
    exhaustive_s = (time.perf_counter() - start) * total / done
    best = sorted(scores.values(), reverse=True)[:3]
    print(f"exact top-10: {topk_s:.1f} s/user; exhaustive scoring of all {len(set(trie.item_tokens.values()))} "
          f"titles: {exhaustive_s:.1f} s/user (measured {done}/{total} chunks, scaled): "
          f"{exhaustive_s / topk_s:.1f}x; user 0's exact top-3 scores {[round(s, 3) for _, s in top[0][:3]]}, "
          f"best in the exhaustive chunks {[round(s, 3) for s in best]}")


if __name__ == "__main__":
    main()

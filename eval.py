"""Stage 7: evaluate a trained checkpoint with the trie-constrained beam search (SPEC §4, §5).

    python eval.py --ckpt out/                       # NDCG@5/10, HR@5/10 -> out/metrics.json
    python eval.py --ckpt out/ --pruning --dump preds.jsonl
    torchrun --nproc_per_node 8 eval.py --ckpt out/  # the test set sharded over the processes

--ckpt is a train.py --out folder (its best-validation checkpoint) or one checkpoint in it; the rest
comes from its train_config.json and PEFT adapter. train.py validates with `evaluate` every epoch.
Oracles: naive_beam_search in tests/test_beam.py, and transformers + peft in tests/test_eval.py.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import beam
import data
from cli import (Distributed, Progress, build_parser, cli_main, init_distributed, option,
                 read_json, resolve_checkpoint, resolve_model, shard_bounds, write_json_atomic,
                 write_text_atomic)
from lora import load_adapter
from model import DTYPES, load_model, weights_sha256
from tokenizer import load_tokenizer

CUTOFFS = (5, 10)  # the K of NDCG@K / HR@K / PR@K (SPEC §5)


def evaluate(model, dataset, tokenizer, trie, examples, beam_config, dist: Distributed,
             pruning=False, keep_results=False, label="test") -> tuple[dict, list]:
    """NDCG@K / HR@K (K = 5, 10) of the constrained beam search over `examples`, each rank
    searching its contiguous shard, the per-metric sums all-reduced. With `pruning`, also PR@K and
    the violation rate from the exact top-K search. Returns (metrics, this rank's records)."""
    start, stop = shard_bounds(len(examples), dist.rank, dist.world)
    shard, top, eos, pad = examples[start:stop], max(CUTOFFS), tokenizer.eos_id, tokenizer.pad_id
    targets = [example.target for example in shard]
    prompts = [data.prompt_tokens(dataset.prompt(example), tokenizer) for example in shard]
    which = "" if dist.world == 1 else " (rank 0's shard)"  # every rank runs its shard at one pace
    progress = Progress(f"{label} beam search{which}", len(shard), rank=dist.rank)
    if pruning:  # and each target teacher-forced on the same prefill: its tokens' ranks rank_t
        results, forced = beam.search_and_teacher_force(model, prompts, targets, trie, eos, pad,
                                                        beam_config, progress)
    else:
        results = beam.beam_search(model, prompts, trie, eos, pad, beam_config, progress)
    ranks = [beam.rank_of(target, found) for target, found in zip(targets, results)]  # 0-based/None
    # Sums over this shard (mean x count), all-reduced below: the whole split's metric on any world.
    sums = {f"{name}@{k}": metric(ranks, k) * len(ranks)
            for name, metric in (("ndcg", beam.ndcg_at), ("hr", beam.hit_at)) for k in CUTOFFS}
    if pruning:
        exact = beam.exact_topk(model, prompts, trie, top, eos, pad, beam_config, progress=Progress(
            f"{label} exact top-{top}{which}", len(shard), rank=dist.rank))
        pruned = {}
        for k in CUTOFFS:
            eligible, pruned[k] = beam.pruned_positives(targets, results, exact, k)
            sums[f"eligible@{k}"], sums[f"pruned@{k}"] = len(eligible), len(pruned[k])
        # Fig. 4: the pruned top-10 positives that break the necessary condition p_t >= beta_t at
        # some step, i.e. some token ranks B or lower among the valid ones (rank_t >= B)
        sums["violated"] = sum(max(forced[i][0]) >= beam_config.beam_width for i in pruned[top])
    records = [{"user_id": example.user_id, "target": example.target,
                "beams": [{"items": sorted(items), "score": score} for items, score in found]}
               for example, found in zip(shard, results)] if keep_results else []

    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names] + [len(shard)], dtype=torch.float64,
                          device=dist.device)
    dist.all_reduce_sum(totals)
    totals = dict(zip(names + ["count"], totals.tolist()))
    count = int(totals["count"])
    metrics = {f"{name}@{k}": totals[f"{name}@{k}"] / max(count, 1)
               for name in ("ndcg", "hr") for k in CUTOFFS}
    if pruning:  # PR@K: the share of the exact top-K positives that the beam search did not return
        for key, part, whole in [*[(f"pr@{k}", f"pruned@{k}", f"eligible@{k}") for k in CUTOFFS],
                                 ("violation_rate", "violated", f"pruned@{top}")]:
            metrics[key] = totals[part] / totals[whole] if totals[whole] else 0.0  # 0 if no whole
    metrics["num_examples"] = count
    return metrics, records


@dataclass
class EvalConfig:
    ckpt: str = option("", "a train.py --out folder, or one checkpoint folder in it")
    split: str = option("test", "which split to rank", choices=("test", "valid"))
    limit: int = option(0, "only the first N windows of the split (0 = all); a partial result goes "
                           "to metrics-<split>-limit<N>.json")
    data_dir: str = option("", "data root, if not where the run was trained (default: the one "
                               "recorded in the checkpoint, else $BEAR_DATA, else ./data)")
    model: str = option("", "base model folder or hub id, if not the one recorded in the "
                            "checkpoint (a warning line when its weights are not those trained on)")
    pruning: bool = option(False, "add PR@5/10 and the violation rate (exact top-K)")
    dump: str = option("", "write per-window predictions to this .jsonl file")
    batch: int = option(16, "users per beam-search pass")
    length_penalty: float = option(0.0, "0 ranks by total log-prob (SPEC §4); 1.0 reproduces the "
                                        "authors' evaluation")
    mask_after_softmax: bool = option(False, "score with full-vocabulary log-probs (stock "
                                             "constrained generation)")


def run_eval(config: EvalConfig, dist: Distributed) -> dict:
    if not config.ckpt:
        raise ValueError("--ckpt is required (a train.py --out folder)")
    if config.limit < 0 or config.batch < 1:
        raise ValueError(f"--limit must be >= 0 and --batch >= 1, got {config.limit} and "
                         f"{config.batch}")
    run_dir = Path(config.ckpt)
    checkpoint = resolve_checkpoint(run_dir)
    trained = read_json(checkpoint / "train_config.json")
    if trained.get("prompt_template", data.PROMPT) != data.PROMPT:
        raise ValueError(f"{checkpoint / 'train_config.json'}: trained with a different prompt "
                         "template than data.PROMPT; evaluate with the code version that "
                         "trained it")
    source = resolve_model(config.model) if config.model else \
        resolve_model(trained["model"], revision=trained.get("model_revision"))
    recorded = trained.get("weights_sha256")  # the weights trained on, wherever they live now
    if recorded and dist.rank == 0 and weights_sha256(source.folder) != recorded:
        print(f"warning: {source.folder} does not hold the weights this adapter was trained on "
              f"(sha256 {recorded[:12]}...); its results will differ", file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(source.folder)
    root = trained["data_dir"]  # the run's data root where this machine has it, else the defaults
    data_dir = config.data_dir or (root if root and Path(root).is_dir() else None)
    dataset = data.load_dataset(data.DataConfig(dataset=trained["dataset"], data_dir=data_dir,
                                                train_samples=trained["train_samples"],
                                                seed=trained["seed"]))
    trie = data.build_trie(dataset, tokenizer)
    examples = getattr(dataset, config.split)[:config.limit or None]  # --limit 0: all
    model = load_model(source.folder, dtype=DTYPES[trained["dtype"]], device=dist.device).eval()
    load_adapter(model, checkpoint)  # LoRA layers take the model's eval mode (no dropout)
    beam_config = beam.BeamConfig(beam_width=trained["beam_width"], batch_size=config.batch,
                                  mask_before_softmax=not config.mask_after_softmax,
                                  length_penalty=config.length_penalty)
    started = time.time()
    metrics, records = evaluate(model, dataset, tokenizer, trie, examples, beam_config, dist,
                                pruning=config.pruning, keep_results=bool(config.dump),
                                label=config.split)
    records = dist.gather(records) if config.dump else []
    report = {"checkpoint": checkpoint.name, "split": config.split, **metrics,
              "beam_width": trained["beam_width"], "length_penalty": config.length_penalty,
              "mask_before_softmax": not config.mask_after_softmax}
    if dist.rank == 0:
        print(f"{trained['dataset']} {config.split} ({metrics['num_examples']} windows, checkpoint "
              f"{checkpoint.name}, {time.time() - started:.0f} s)")
        names = [name for name in metrics if name != "num_examples"]
        print(" | ".join(f"{name.upper():>8}" for name in names))
        print(" | ".join(f"{metrics[name]:8.4f}" for name in names))
        # Only a whole test split is THE result; a quick look (--limit) or valid goes beside it.
        name = "metrics.json" if config.split == "test" and not config.limit else \
            f"metrics-{config.split}" + (f"-limit{config.limit}" if config.limit else "") + ".json"
        write_json_atomic(run_dir / name, report)
        print(f"wrote {run_dir / name}", flush=True)
        if config.dump:
            write_text_atomic(config.dump, "".join(json.dumps(record) + "\n" for record in records))
    # The ranks leave together: an idle rank that tears its gloo group down while rank 0 still
    # writes can abort (SIGABRT, "terminate called without an active exception"). Not in close():
    # a rank that raised alone would wait there, not exit and let torchrun stop the rest.
    dist.barrier()
    return report


def main(argv=None) -> int:
    parser = build_parser(EvalConfig, "Rank the test split with the constrained beam search.")
    config = EvalConfig(**vars(parser.parse_args(argv)))
    dist = init_distributed()
    try:
        run_eval(config, dist)
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))

"""Stage 7: evaluate a trained checkpoint with the trie-constrained beam search (SPEC §4, §5).

    python eval.py --ckpt out/                       # NDCG@5/10, HR@5/10 on the test split -> out/metrics.json
    python eval.py --ckpt out/ --pruning --dump preds.jsonl
    torchrun --nproc_per_node 8 eval.py --ckpt out/  # the test set sharded over the processes

Everything needed comes from the checkpoint: the base-model path, dataset, data sample and beam width from
train_config.json, the LoRA settings from the PEFT adapter_config.json, and the prompt template from data.py
(recorded in the config and checked). --ckpt is a training --out folder (its best-validation checkpoint is
used) or one checkpoint folder inside it.

train.py validates with `evaluate` at the end of every epoch. The oracles: `naive_beam_search` in
tests/test_beam.py for the search, and tests/test_eval.py's run of transformers + peft on the trained adapter.
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import beam
import data
from cli import (Distributed, Progress, build_parser, cli_main, init_distributed, read_json, resolve_checkpoint,
                 resolve_model, shard_bounds, write_json_atomic, write_text_atomic)
from lora import load_adapter
from model import DTYPES, load_model
from tokenizer import load_tokenizer

CUTOFFS = (5, 10)  # the K of NDCG@K / HR@K / PR@K (SPEC §5)


# ---------------------------------------------------------------------------------------------------------
# Sharded ranking metrics (SPEC §5)
# ---------------------------------------------------------------------------------------------------------

def evaluate(model, dataset, tokenizer, trie, examples, beam_config, dist: Distributed, pruning=False,
             keep_results=False, label="test") -> tuple[dict, list]:
    """NDCG@K / HR@K (K = 5, 10) of the constrained beam search over `examples`, each rank searching its
    contiguous shard with the plain model and the per-metric sums all-reduced. With `pruning`, also PR@K and
    the violation rate from the exact top-K search. Returns (metrics, this rank's per-example records)."""
    start, stop = shard_bounds(len(examples), dist.rank, dist.world)
    shard = examples[start:stop]
    targets = [example.target for example in shard]
    prompts = [data.prompt_tokens(dataset.prompt(example), tokenizer) for example in shard]
    which = "" if dist.world == 1 else " (rank 0's shard)"   # every rank runs its own shard at the same pace
    with torch.no_grad():
        results = beam.beam_search(model, prompts, trie, tokenizer.eos_id, tokenizer.pad_id, beam_config,
                                   progress=Progress(f"{label} beam search{which}", len(shard), rank=dist.rank)) \
            if shard else []
    ranks = [beam.rank_of(target, returned) for target, returned in zip(targets, results)]  # 0-based or None
    # Sums over this shard (mean x count), all-reduced below: the metric of the whole split on any world size.
    sums = {f"{name}@{k}": metric(ranks, k) * len(ranks)
            for name, metric in (("ndcg", beam.ndcg_at), ("hr", beam.hit_at)) for k in CUTOFFS}
    if pruning:
        exact = beam.exact_topk(model, prompts, trie, max(CUTOFFS), tokenizer.eos_id, tokenizer.pad_id,
                                beam_config, progress=Progress(f"{label} exact top-{max(CUTOFFS)}{which}", len(shard),
                                                               rank=dist.rank)) if shard else []
        pruned = {}
        for k in CUTOFFS:
            eligible, pruned[k] = beam.pruned_positives(targets, results, exact, k)
            sums[f"eligible@{k}"], sums[f"pruned@{k}"] = len(eligible), len(pruned[k])
        # Fig. 4: which of the pruned top-10 positives break the necessary condition p_t >= beta_t somewhere.
        sums["violated"] = sum(beam.violates_necessary_condition(model, prompts[i], targets[i], trie, beam_config)
                               for i in pruned[max(CUTOFFS)])
    records = [{"user_id": example.user_id, "target": example.target,
                "beams": [{"items": sorted(items), "score": score} for items, score in returned]}
               for example, returned in zip(shard, results)] if keep_results else []

    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names] + [len(shard)], dtype=torch.float64, device=dist.device)
    dist.all_reduce_sum(totals)
    totals = dict(zip(names + ["count"], totals.tolist()))
    count = int(totals["count"])
    metrics = {f"{name}@{k}": totals[f"{name}@{k}"] / max(count, 1) for name in ("ndcg", "hr") for k in CUTOFFS}
    if pruning:
        for k in CUTOFFS:  # PR@K: share of the exact top-K positives that the beam search did not return
            metrics[f"pr@{k}"] = totals[f"pruned@{k}"] / totals[f"eligible@{k}"] if totals[f"eligible@{k}"] else 0.0
        pruned_top = totals[f"pruned@{max(CUTOFFS)}"]
        metrics["violation_rate"] = totals["violated"] / pruned_top if pruned_top else 0.0
    metrics["num_examples"] = count
    return metrics, records


# ---------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    ckpt: str = field(default="", metadata={"help": "a train.py --out folder, or one checkpoint folder in it"})
    split: str = field(default="test", metadata={"help": "which split to rank", "choices": ("test", "valid")})
    limit: int = field(default=0, metadata={"help": "only the first N windows of the split (0 = all); a partial "
                                                    "result goes to metrics-<split>-limit<N>.json"})
    data_dir: str = field(default="", metadata={"help": "data root, if not where the run was trained (default: "
                                                        "the one recorded in the checkpoint)"})
    pruning: bool = field(default=False, metadata={"help": "add PR@5/10 and the violation rate (exact top-K)"})
    dump: str = field(default="", metadata={"help": "write per-window predictions to this .jsonl file"})
    batch: int = field(default=16, metadata={"help": "users per beam-search pass"})
    length_penalty: float = field(default=0.0, metadata={"help": "0 ranks by total log-prob (SPEC §4); 1.0 "
                                                                 "reproduces the authors' evaluation"})
    mask_after_softmax: bool = field(default=False, metadata={"help": "score with full-vocabulary log-probs "
                                                                      "(stock constrained generation)"})


def run_eval(config: EvalConfig, dist: Distributed) -> dict:
    if not config.ckpt:
        raise ValueError("--ckpt is required (a train.py --out folder)")
    if config.limit < 0 or config.batch < 1:
        raise ValueError(f"--limit must be >= 0 and --batch >= 1, got {config.limit} and {config.batch}")
    run_dir = Path(config.ckpt)
    checkpoint = resolve_checkpoint(run_dir)
    trained = read_json(checkpoint / "train_config.json")
    if trained.get("prompt_template", data.PROMPT) != data.PROMPT:
        raise ValueError(f"{checkpoint / 'train_config.json'}: trained with a different prompt template than "
                         f"data.PROMPT; evaluate with the code version that trained it")
    source = resolve_model(trained["model"], revision=trained.get("model_revision"))  # the weights it trained on
    tokenizer = load_tokenizer(source.folder)
    dataset = data.load_dataset(data.DataConfig(dataset=trained["dataset"],
                                                data_dir=config.data_dir or trained["data_dir"] or None,
                                                train_samples=trained["train_samples"], seed=trained["seed"]))
    trie = data.build_trie(dataset, tokenizer)
    examples = getattr(dataset, config.split)
    examples = examples[:config.limit] if config.limit else examples
    model = load_model(source.folder, dtype=DTYPES[trained["dtype"]], device=dist.device)
    load_adapter(model, checkpoint)
    model.eval()
    beam_config = beam.BeamConfig(beam_width=trained["beam_width"], batch_size=config.batch,
                                  mask_before_softmax=not config.mask_after_softmax,
                                  length_penalty=config.length_penalty)
    started = time.time()
    metrics, records = evaluate(model, dataset, tokenizer, trie, examples, beam_config, dist,
                                pruning=config.pruning, keep_results=bool(config.dump), label=config.split)
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
        # Only a whole test split is THE result; a quick look (--limit) or the validation split goes beside it.
        name = "metrics.json" if config.split == "test" and not config.limit else \
            f"metrics-{config.split}" + (f"-limit{config.limit}" if config.limit else "") + ".json"
        write_json_atomic(run_dir / name, report)
        print(f"wrote {run_dir / name}", flush=True)
        if config.dump:
            write_text_atomic(config.dump, "".join(json.dumps(record) + "\n" for record in records))
    # The ranks leave together: an idle rank that tears its gloo group down while rank 0 is still writing can
    # abort in the teardown (SIGABRT, "terminate called without an active exception"). Success path only: in
    # close(), a rank that raised alone would wait here instead of exiting and letting torchrun stop the rest.
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

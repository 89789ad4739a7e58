"""Stage 7: evaluate a trained checkpoint with the trie-constrained beam search (SPEC §4, §5).

    python eval.py --ckpt out/                       # NDCG@5/10, HR@5/10 on the test split -> out/metrics.json
    python eval.py --ckpt out/ --pruning --dump preds.jsonl
    torchrun --nproc_per_node 8 eval.py --ckpt out/  # the test set sharded over the processes

Everything needed comes from the checkpoint: the base-model path, dataset, data sample and beam width from
train_config.json, the LoRA settings from the PEFT adapter_config.json, and the prompt template from data.py
(recorded in the config and checked). --ckpt is a training --out folder (its best-validation checkpoint is
used) or one checkpoint folder inside it.

This file also holds the pieces train.py shares for its per-epoch validation: the process-group set-up, the
sharding and the sharded, all-reduced ranking metrics.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

import beam
import data
from lora import load_adapter
from model import load_model, load_tokenizer, resolve_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
CUTOFFS = (5, 10)  # the K of NDCG@K / HR@K / PR@K (SPEC §5)


# ---------------------------------------------------------------------------------------------------------
# Processes: one, or torchrun's N (NCCL on GPUs, gloo on CPU)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            torch_dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed() -> Distributed:
    """Under torchrun (WORLD_SIZE > 1) join the process group; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch_dist.init_process_group("gloo")
    return Distributed(rank=torch_dist.get_rank(), world=torch_dist.get_world_size(), device=device)


def all_reduce_sum(tensor: torch.Tensor, dist: Distributed) -> None:
    if dist.world > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `count` items: the first count % world ranks get one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class Progress:
    """A progress line for a long pass: `what: done/total unit | rate | ~time left`, printed only once the pass
    has run a few seconds (short passes stay silent). On a terminal it is redrawn in place every second; into a
    log file (stdout not a terminal) it is one line every `every` seconds, so the log stays readable. Rank 0
    only. Call it with the number done so far."""

    def __init__(self, what: str, total: int, unit: str = "windows", every: float = 30.0, rank: int = 0):
        self.what, self.total, self.unit, self.rank = what, total, unit, rank
        self.tty = sys.stdout.isatty()
        self.every = 1.0 if self.tty else every
        self.start = self.last = time.time()
        self.shown = False

    def __call__(self, done: int) -> None:
        now = time.time()
        finished = done >= self.total
        if self.rank != 0 or (now - self.last < self.every and not (finished and self.shown)):
            return
        self.last, self.shown = now, True
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.what}: {done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | ~{format_seconds(left)} left"
        if self.tty:
            print("\r" + line + ("\n" if finished else ""), end="", flush=True)
        else:
            print(line, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def write_json_atomic(path, obj) -> None:
    """Write `path` whole or not at all (a .tmp file renamed over it). NaN/inf are refused: they are not JSON."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)



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
    all_reduce_sum(totals, dist)
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


def gather_records(records: list, dist: Distributed) -> list:
    """Every rank's records, in example order (the shards are contiguous), on every rank."""
    if dist.world == 1:
        return records
    everything = [None] * dist.world
    torch_dist.all_gather_object(everything, records)
    return [record for part in everything for record in part]


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


def resolve_checkpoint(path: Path) -> Path:
    """A run folder -> its best checkpoint (checkpoint.json, written last by train.py); a checkpoint folder
    -> itself."""
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {path}: no such folder")
    manifest = path / "checkpoint.json"
    if manifest.exists():
        fields = data.read_json(manifest)
        if not isinstance(fields, dict) or not isinstance(fields.get("best", fields.get("last")), str):
            raise ValueError(f"{manifest}: names no checkpoint folder (no \"last\"); the file is damaged")
        return path / fields.get("best", fields["last"])
    if (path / "adapter_config.json").exists() and (path / "train_config.json").exists():
        return path
    raise FileNotFoundError(f"--ckpt {path}: neither a training run (no checkpoint.json) nor a checkpoint "
                            f"folder (adapter_config.json + train_config.json)")


def run_eval(config: EvalConfig, dist: Distributed) -> dict:
    if not config.ckpt:
        raise ValueError("--ckpt is required (a train.py --out folder)")
    if config.limit < 0 or config.batch < 1:
        raise ValueError(f"--limit must be >= 0 and --batch >= 1, got {config.limit} and {config.batch}")
    run_dir = Path(config.ckpt)
    checkpoint = resolve_checkpoint(run_dir)
    trained = data.read_json(checkpoint / "train_config.json")
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
    records = gather_records(records, dist) if config.dump else []
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
            tmp = Path(config.dump + ".tmp")
            with open(tmp, "w") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp, config.dump)
    return report


def cli_main(main, argv=None, stopped_errors=()) -> int:
    """Run `main(argv)`; a bad input (ValueError / FileNotFoundError) or a stopped run prints one line
    `error: ...` (on rank 0 only: every rank meets the same bad input) and exits 2 (1 for a stopped run); Ctrl-C
    prints one line and exits 130, the shell's code for SIGINT (files are only ever replaced whole, so nothing
    half-written is left). Under torchrun the line also goes into the launcher's own failure summary."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, *stopped_errors) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        record_for_torchrun(f"error: {err}")
        return 1 if isinstance(err, stopped_errors) else 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("error: interrupted (Ctrl-C); completed checkpoints and result files are intact", file=sys.stderr,
                  flush=True)
        return 130


def record_for_torchrun(message: str) -> None:
    """torchrun prints each failed child's error file (TORCHELASTIC_ERROR_FILE) in its final summary, where a
    reader looks first; without it the summary says only `error_file: <N/A>` below ~50 lines of launcher
    traceback. The format is torch.distributed.elastic's (what its @record decorator writes)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and int(os.environ.get("RANK", "0")) == 0:
        error = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                "timestamp": str(int(time.time()))}}}
        Path(path).write_text(json.dumps(error))


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (`error: ...`) instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(config_class, description: str) -> argparse.ArgumentParser:
    """argparse from a config dataclass: one --flag per field, help and choices from the field metadata."""
    parser = OneLineErrorParser(description=description)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + " (default: %(default)s)")
    return parser


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

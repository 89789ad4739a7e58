"""Stage 6: LoRA fine-tuning with SFT, MSL, BEAR or Obj 3.1, on 1 to N processes (SPEC §3, §7).

    python train.py --dataset office --loss bear --model <HF Llama folder> --out out/
    torchrun --nproc_per_node 8 train.py --dataset toy --loss bear --model <Llama-3.x folder>

One optimizer step consumes one GLOBAL batch (default 128 windows), whatever the number of processes:
the global batch is split over the ranks, each rank's share into micro-batches, and the loss of every
micro-batch is summed over its label positions and divided by the number of label tokens in the WHOLE global
batch. Summing the gradients over micro-batches and ranks therefore gives exactly the gradient of the mean
per-token loss of the global batch: the same on 1 or 8 processes, for any micro-batch size, even when the
global batch does not divide evenly (nanoGPT's `loss / accumulation_steps` is only right when every
micro-batch holds the same number of label tokens).

Data parallelism is done by hand rather than with the DistributedDataParallel wrapper: the trainable tensors
are the LoRA adapters only (a few MB), so one all-reduce of their flattened gradient per optimizer step costs
nothing next to the forward passes, and it lets ranks run DIFFERENT numbers of micro-batches (an uneven split,
or a rank with no example at all in the last, short batch of an epoch), which the wrapper's one-all-reduce-
per-backward protocol cannot do without dummy passes. It also removes the wrapper's classic deadlock: the
validation search calls the plain model on every rank's shard.

Exact resume: the data order of an epoch is a permutation seeded by (seed, epoch); the learning rate is a
function of the step; dropout's random state is re-seeded from (seed, step, rank) at every step. So the step
number plus the adapter and the AdamW moments is the whole state, and a run killed at any point and resumed
with --resume logs the same losses and ends with the same adapter as one that never stopped.

Read top to bottom: the config, one micro-batch's per-position losses (loss.py does the math), the run
(`train` -> `train_step`, `validate`, and `start_run` that loads everything), then the pure data order and
learning rate, the --out folder and checkpoints, and the command line. The oracles, in tests/test_train.py: two
gloo processes against one, a SIGKILLed-and-resumed run against an uninterrupted one, and transformers' linear
schedule; tests/test_lora.py checks a training step against peft's.

Shapes as in loss.py: N label positions of a micro-batch, V vocabulary, M valid (position, token) pairs.
"""
import argparse
import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
import loss as losses
from beam import BeamConfig, prefix_thresholds
from cli import (MANIFEST_FILE, Distributed, ModelSource, Progress, build_parser, cli_main, format_seconds,
                 init_distributed, read_json, read_manifest, resolve_model, shard_bounds, write_json_atomic)
from eval import evaluate
from lora import LoraConfig, apply_lora, load_adapter, save_adapter
from model import DEFAULT_MODEL, DTYPES, load_model
from tokenizer import load_tokenizer

LOSSES = ("sft", "msl", "bear", "obj31")
CONFIG_FILE = "train_config.json"  # the run's TrainConfig, in --out and in every checkpoint folder
STATE_FILE = "trainer_state.pt"  # optimizer moments, step, best metric, log length (beside the adapter files)
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    dataset: str = field(default="", metadata={"help": "office | book | toy | clothing, or the path of a dataset "
                                                       "folder of your own (required)"})
    loss: str = field(default="bear", metadata={"help": "training objective (SPEC §3)", "choices": LOSSES})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "base model: a Hugging Face Llama folder, or a hub "
                                                                "id org/name[@revision] (needs huggingface_hub; "
                                                                "read from the local cache when there)"})
    out: str = field(default="out", metadata={"help": "checkpoint folder"})
    epochs: int = field(default=10, metadata={"help": "passes over the training sample"})
    global_batch: int = field(default=128, metadata={"help": "windows per optimizer step, over all processes"})
    micro_batch: int = field(default=8, metadata={"help": "windows per forward/backward pass on one process"})
    lr: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps, then linear decay to 0"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (transformers' Trainer "
                                                                "default, used by the authors); 0 = off"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (update scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default="q_proj,v_proj", metadata={"help": "comma-separated module names"})
    beam_width: int = field(default=10, metadata={"help": "B: BEAR's beta_t rank, Obj 3.1's and the "
                                                          "validation search's beam width"})
    lam: float = field(default=0.6875, metadata={"help": "lambda of eq. 3.5. The authors' `topk_weight` "
                                                         "lambda' (which their README, and most likely the "
                                                         "paper's lambda range [0.1, 5.0], call lambda) maps to "
                                                         "lam = lambda' * xi (their Toy default 0.25 -> 0.6875)"})
    xi: float = field(default=2.75, metadata={"help": "xi, the sigmoid temperature of eq. 3.4 / 3.1"})
    tau: float = field(default=1.0, metadata={"help": "softmax temperature of MSL (and BEAR's MSL base)"})
    surrogate: str = field(default="paper", metadata={"help": "BEAR's regulariser: paper (eq. 3.4), or "
                                                              "violators (OUR ablation, -log sigmoid(-Delta/xi): "
                                                              "pushes the violating tokens hardest)",
                                                      "choices": losses.SURROGATES})
    normalize: str = field(default="tokens", metadata={"help": "tokens: divide the summed loss by the global "
                                                               "batch's label-token count; authors (BEAR only): "
                                                               "their per-micro-batch sum(w_t CE_t) / sum(w_t) "
                                                               "over positions with > 1 valid token, averaged "
                                                               "over the micro-batches",
                                                       "choices": ("tokens", "authors")})
    base: str = field(default="msl", metadata={"help": "base loss under BEAR / Obj 3.1: msl (the authors' code; "
                                                       "masked probabilities) or sft (full-vocabulary)",
                                               "choices": ("msl", "sft")})
    train_samples: int = field(default=10000, metadata={"help": "windows sampled from train with --seed "
                                                                "(0 = all of train)"})
    seed: int = field(default=42, metadata={"help": "data sample, data order, LoRA init and dropout"})
    dtype: str = field(default="bf16", metadata={"help": "base model dtype (the LoRA tensors and AdamW stay "
                                                         "fp32)", "choices": ("bf16", "fp32")})
    data_dir: str = field(default="", metadata={"help": "folder holding Office/, Toy/, ... "
                                                        "(default $BEAR_DATA, else ./data)"})
    eval_batch: int = field(default=16, metadata={"help": "users per validation beam-search pass"})
    save_every: int = field(default=0, metadata={"help": "also checkpoint every N steps (0 = epoch ends only)"})
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0 = all epochs)"})
    limit: int = field(default=0, metadata={"help": "use only the first N training windows (0 = all)"})
    valid_limit: int = field(default=0, metadata={"help": "validate on the first N windows (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "continue the run saved in --out"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run saved in --out"})


# ---------------------------------------------------------------------------------------------------------
# One micro-batch's per-position losses (SPEC §3)
# ---------------------------------------------------------------------------------------------------------

def label_position_losses(model, batch: dict, micro: list, trie, config: TrainConfig, tokenizer,
                          weight_sums: list | None = None) -> torch.Tensor:
    """Per-label-position losses (N,) fp32 of one micro-batch (the caller sums them and divides by the global
    label-token count). `micro` holds the batch's data.EncodedExample (Obj 3.1 needs the prompts). With
    `weight_sums` (--normalize authors), BEAR's detached weights summed over the positions with more than one
    valid token are appended to it: the authors' per-batch denominator."""
    device = batch["input_ids"].device
    logits = model(batch["input_ids"], logits_at=batch["label_mask"])  # (N, V) model dtype; upcast in the loss
    labels = batch["labels"]  # (N,)
    if config.loss == "sft":
        return losses.sft(logits, labels)  # eq. 2.1
    valid_row, valid_token = trie.valid_next(batch["label_nodes"].cpu())  # (M,), (M,) every trie-valid token
    valid_row, valid_token = valid_row.to(device), valid_token.to(device)
    if config.loss == "msl":
        return losses.msl(logits, labels, valid_row, valid_token, tau=config.tau)
    if config.loss == "bear":  # eq. 3.5; MSL as the base by default, as in the authors' code
        hyper = dict(beam_width=config.beam_width, lam=config.lam, xi=config.xi, tau=config.tau, base=config.base,
                     surrogate=config.surrogate)
        if weight_sums is not None:
            weights = losses.bear_token_weights(logits, labels, valid_row, valid_token, **hyper)  # (N,) detached
            several_valid = torch.bincount(valid_row, minlength=labels.numel()) > 1            # (N,)
            weight_sums.append(float(weights[several_valid].sum()))
        return losses.bear(logits, labels, valid_row, valid_token, **hyper)
    # Obj 3.1 (eq. 3.1): thresholds from a simulated constrained beam search under the current parameters (no
    # grad, dropout off), scored as the base loss trains: masked before the softmax at temperature tau for MSL,
    # full-vocabulary log-probs for SFT.
    prompts = [e.input_ids[:e.prompt_length].tolist() for e in micro]
    targets = [e.target for e in micro]
    model.eval()
    with torch.no_grad():
        thresholds = prefix_thresholds(model, prompts, targets, trie, tokenizer.eos_id, tokenizer.pad_id,
                                       BeamConfig(beam_width=config.beam_width,
                                                  mask_before_softmax=config.base == "msl"), tau=config.tau)  # (N,)
    model.train()
    target_lengths = torch.tensor([len(e.target_nodes) for e in micro])
    label_example = torch.repeat_interleave(torch.arange(len(micro)), target_lengths)  # (N,) window of each label
    return losses.obj31(logits, labels, valid_row, valid_token, thresholds.to(device), label_example.to(device),
                        beam_width=config.beam_width, lam=config.lam, xi=config.xi, tau=config.tau, base=config.base)


# ---------------------------------------------------------------------------------------------------------
# The training run: set up once, then optimizer steps, validation at epoch ends, checkpoints
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a training run holds once set up (start_run): the model and its optimizer, the data, the step
    counter and the checkpoint bookkeeping. `state` is everything a checkpoint must save besides the adapter."""
    config: TrainConfig
    dist: Distributed
    source: ModelSource
    tokenizer: object
    dataset: data.Dataset
    trie: data.ItemTrie
    train_examples: list
    valid_examples: list
    model: torch.nn.Module
    params: list                 # the trainable LoRA tensors (fp32), in a fixed order on every rank
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    label_counts: list           # target tokens per training window
    state: dict                  # step, best_metric, best_step, epochs (validation records), log_bytes
    manifest: dict               # checkpoint.json: the last and the best complete checkpoint folders
    encoded: dict = field(default_factory=dict)   # window index -> data.EncodedExample, tokenised when first used

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def encode(self, indices) -> list:
        for i in indices:
            if i not in self.encoded:
                self.encoded[i] = data.encode_examples([self.train_examples[i]], self.dataset, self.tokenizer,
                                                       self.trie)[0]
        return [self.encoded[i] for i in indices]


def train(config: TrainConfig, given: set[str], dist: Distributed) -> dict:
    run = start_run(config, given, dist)
    config, state, out = run.config, run.state, run.out  # a --resume runs the saved config
    if state["step"] >= run.total_steps:
        if dist.rank == 0:
            print(f"{out}: already trained for {state['step']} steps, nothing to do", flush=True)
        return state

    log = open(out / LOG_FILE, "a") if dist.rank == 0 else None
    start_time, start_step = time.time(), state["step"]
    run.model.train()
    while state["step"] < run.total_steps:
        record = train_step(run)
        step, epoch = record["step"], record["epoch"]
        if dist.rank == 0:
            log.write(json.dumps(record, allow_nan=False) + "\n")
            log.flush()
            rate = (time.time() - start_time) / (step - start_step)
            print(f"step {step}/{run.total_steps} | epoch {epoch} | loss {record['loss']:.4f} | "
                  f"lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} label tok/s | {rate:.2f} s/step | "
                  f"~{format_seconds(rate * (run.total_steps - step))} left", flush=True)

        end_of_epoch = step % run.steps_per_epoch == 0 or step == run.total_steps
        if end_of_epoch:
            record = validate(run, epoch)
            if dist.rank == 0:
                log.write(json.dumps(record, allow_nan=False) + "\n")
                log.flush()
        if end_of_epoch or (config.save_every and step % config.save_every == 0):
            if dist.rank == 0:
                state["optimizer"] = run.optimizer.state_dict()
                state["log_bytes"] = log.tell()
                run.manifest = save_checkpoint(out, run.model, run.config, run.source, state, run.manifest)
                del state["optimizer"]
            dist.barrier()  # nobody runs ahead of a checkpoint that may yet fail to write
    if log:
        log.close()
    if dist.rank == 0:
        print(f"done: best valid NDCG@10 {state['best_metric']:.4f} at step {state['best_step']} "
              f"({out / run.manifest['best']})", flush=True)
    return state


def train_step(run: Run) -> dict:
    """One AdamW step on the global batch of step `run.state["step"]`: forward and backward over this rank's
    micro-batches, the gradients summed over the micro-batches and the ranks (see the module docstring for why
    dividing by the GLOBAL label-token count makes that sum the batch-mean gradient), clipped, applied.
    Returns the step's log record."""
    config, dist, step = run.config, run.dist, run.state["step"]
    epoch, step_in_epoch = divmod(step, run.steps_per_epoch)
    order = epoch_order(len(run.train_examples), config.seed, epoch)
    global_batch = order[step_in_epoch * config.global_batch:(step_in_epoch + 1) * config.global_batch]
    global_label_tokens = sum(run.label_counts[i] for i in global_batch)  # every rank knows the whole batch
    start, stop = shard_bounds(len(global_batch), dist.rank, dist.world)
    my_batch = global_batch[start:stop]  # this rank's share; ranks may differ by one window (or hold none)
    # --normalize authors: each micro-batch's loss is its own weighted mean, averaged over every rank's
    # micro-batches of this global batch (their Trainer's gradient accumulation and DDP's averaging).
    global_micro_batches = sum(math.ceil(len(range(*shard_bounds(len(global_batch), r, dist.world)))
                                         / config.micro_batch) for r in range(dist.world))

    step_start = time.time()
    reseed_dropout(config.seed, step, dist.rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    progress = Progress(f"step {step + 1}/{run.total_steps}" + (" (rank 0's share)" if dist.world > 1 else ""),
                        len(my_batch), rank=dist.rank)  # a global batch of 128 takes minutes on a CPU
    for first in range(0, len(my_batch), config.micro_batch):
        micro = run.encode(my_batch[first:first + config.micro_batch])  # data.EncodedExample
        batch = data.collate_train(micro, run.tokenizer.pad_id)
        batch = {k: v.to(dist.device) if torch.is_tensor(v) and k != "label_nodes" else v  # nodes: trie, CPU
                 for k, v in batch.items()}
        weight_sums = [] if config.normalize == "authors" else None
        per_position = label_position_losses(run.model, batch, micro, run.trie, config, run.tokenizer,
                                             weight_sums)  # (N,) one loss per label position
        # Divide by the GLOBAL label count: summed over micro-batches and ranks this is the batch mean.
        divisor = global_label_tokens if weight_sums is None else \
            (weight_sums[0] + 1e-8) * global_micro_batches  # the authors' 1e-8
        (per_position.sum() / divisor).backward()
        loss_sum += per_position.detach().sum().double() * (global_label_tokens / divisor)
        progress(first + len(micro))

    # Sum gradients (and the loss) over ranks: one all-reduce of the flattened LoRA gradients.
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in run.params])
    flat = torch.cat([flat.double(), loss_sum.reshape(1)])
    dist.all_reduce_sum(flat)
    batch_loss = float(flat[-1]) / global_label_tokens
    stop_unless_finite("loss", batch_loss, step + 1, run)
    offset = 0
    for param in run.params:
        param.grad = flat[offset:offset + param.numel()].view_as(param).to(param.dtype)
        offset += param.numel()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm or math.inf))  # global
    stop_unless_finite("gradient norm", grad_norm, step + 1, run)
    lr = learning_rate(step, run.total_steps, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["step"] = step + 1
    seconds = time.time() - step_start
    return {"step": step + 1, "epoch": epoch + 1, "loss": batch_loss, "lr": lr, "grad_norm": grad_norm,
            "label_tokens": global_label_tokens, "tokens_per_s": global_label_tokens / seconds}


def validate(run: Run, epoch: int) -> dict:
    """The end-of-epoch validation search; the best epoch by NDCG@10 becomes the run's `best` checkpoint."""
    state, dist = run.state, run.dist
    run.model.eval()
    valid_start = time.time()
    beam_config = BeamConfig(beam_width=run.config.beam_width, batch_size=run.config.eval_batch)
    metrics, _ = evaluate(run.model, run.dataset, run.tokenizer, run.trie, run.valid_examples, beam_config, dist,
                          label=f"epoch {epoch} validation")
    run.model.train()
    record = {"epoch": epoch, "step": state["step"], "valid": metrics, "valid_s": time.time() - valid_start}
    state["epochs"].append(record)
    if state["best_metric"] is None or metrics["ndcg@10"] > state["best_metric"]:
        state["best_metric"], state["best_step"] = metrics["ndcg@10"], state["step"]
    if dist.rank == 0:
        print(f"epoch {epoch}: valid NDCG@10 {metrics['ndcg@10']:.4f} HR@10 {metrics['hr@10']:.4f} "
              f"({metrics['num_examples']} windows, {record['valid_s']:.0f} s)", flush=True)
    return record


class TrainingStopped(RuntimeError):
    """A run that cannot go on (a NaN loss): exit 1 with the message, the last good checkpoint kept."""


def stop_unless_finite(what: str, value: float, step: int, run: Run) -> None:
    """A NaN / inf loss or gradient stops the run before the optimizer touches the adapter. Every rank sees
    the same all-reduced value, so every rank stops at the same step (no rank is left waiting)."""
    if not math.isfinite(value):
        kept = run.out / run.manifest["last"] if run.manifest.get("last") else "none was written yet"
        raise TrainingStopped(f"{what} is {value} at step {step}; stopped without updating the adapter. "
                              f"Last good checkpoint (kept): {kept}")


def start_run(config: TrainConfig, given: set[str], dist: Distributed) -> Run:
    """Check --out, load the model, data and optimizer, resume from the last checkpoint or start fresh. Everything
    that can fail on a bad input is loaded before anything is written."""
    config = prepare_out_dir(config, given, dist)
    out = Path(config.out)
    # A resumed run uses the very weights it started with (a hub id's recorded commit).
    saved_revision = read_json(out / CONFIG_FILE).get("model_revision") \
        if config.resume and (out / CONFIG_FILE).exists() else None
    source = resolve_model(config.model, revision=saved_revision)
    if dist.rank == 0:
        print(f"model: {config.model}" + (f" (revision {source.revision}, {source.folder})" if source.hub_id else ""),
              flush=True)
    tokenizer = load_tokenizer(source.folder)
    fetch_on_first_use(config, dist)
    dataset = data.load_dataset(data.DataConfig(dataset=config.dataset, data_dir=config.data_dir or None,
                                                train_samples=config.train_samples, seed=config.seed))
    trie = data.build_trie(dataset, tokenizer)
    train_examples = dataset.train[:config.limit] if config.limit else dataset.train
    valid_examples = dataset.valid[:config.valid_limit] if config.valid_limit else dataset.valid
    if dist.rank == 0:
        for note in dataset.notes:  # e.g. Book / Clothing: validation held out of train
            print(f"note: {note}", flush=True)
    if dist.world > len(train_examples):
        raise ValueError(f"{dist.world} processes but only {len(train_examples)} training windows: "
                         f"use at most {len(train_examples)} processes (or a larger --limit)")
    model = load_model(source.folder, dtype=DTYPES[config.dtype], device=dist.device)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    apply_lora(model, lora_config(config))
    params = [param for _, param in sorted(model.named_parameters()) if param.requires_grad]  # LoRA A, B (fp32)
    for param in params:  # rank 0's init everywhere (cheap insurance against a rank-dependent RNG)
        dist.broadcast(param.data)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    steps_per_epoch = math.ceil(len(train_examples) / config.global_batch)  # the last batch may be short
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    label_counts = [len(trie.item_tokens[example.target]) for example in train_examples]  # per window

    manifest = read_manifest(out) if config.resume else None
    state = {"step": 0, "best_metric": None, "best_step": None, "epochs": [], "log_bytes": 0}
    if manifest:
        checkpoint = out / manifest["last"]
        load_adapter(model, checkpoint)
        state = read_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        if dist.rank == 0:
            print(f"resuming {out} from step {state['step']} ({checkpoint.name})", flush=True)
    if dist.rank == 0:
        if config.overwrite:
            remove_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CONFIG_FILE, config_record(config, source))
        if (out / LOG_FILE).exists():  # drop what a killed run logged after its last checkpoint
            os.truncate(out / LOG_FILE, state["log_bytes"])
        delete_unreferenced_checkpoints(out, manifest or {})
        for tmp in out.glob("step-*.tmp"):
            shutil.rmtree(tmp)
    dist.barrier()  # --out is ready before any rank trains
    return Run(config, dist, source, tokenizer, dataset, trie, train_examples, valid_examples, model, params,
               optimizer, steps_per_epoch, total_steps, label_counts, state, manifest or {})


# ---------------------------------------------------------------------------------------------------------
# Data order and the learning rate: pure functions of (seed, epoch, step), so resuming needs no RNG state
# ---------------------------------------------------------------------------------------------------------

def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's example order, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up then linear decay to 0, exactly transformers' get_linear_schedule_with_warmup (the
    authors' Trainer): step k (0-based) uses lr * k / warmup during warm-up, so the very first update is 0."""
    if step < config.warmup_steps:
        return config.lr * step / max(1, config.warmup_steps)
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))


def reseed_dropout(seed: int, step: int, rank: int) -> None:
    """Dropout masks depend only on (seed, step, rank): an exactly resumable random state."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------------------
# The --out folder: refuse to mix runs; resume from the manifest
# ---------------------------------------------------------------------------------------------------------

def prepare_out_dir(config: TrainConfig, given: set[str], dist: Distributed) -> TrainConfig:
    """Check --out against --resume / --overwrite. Returns the config to run (a resume's saved one)."""
    out = Path(config.out)
    saved_path = out / CONFIG_FILE
    if not saved_path.exists():
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        check_config(config)
        return config
    if config.overwrite:  # the old run is removed once the new one has loaded without error (train())
        check_config(config)
        return config
    saved = read_config(saved_path)
    if not config.resume:
        raise ValueError(f"--out {out} already holds a run ({CONFIG_FILE}: --loss {saved.loss} on "
                         f"{saved.dataset}); pass --resume to continue it or --overwrite to replace it")
    differing = [name for name in given - RESUME_MAY_CHANGE if getattr(config, name) != getattr(saved, name)]
    if differing:
        name = differing[0]
        raise ValueError(f"--resume: --{name.replace('_', '-')} {getattr(config, name)} differs from the saved "
                         f"run's {getattr(saved, name)} ({saved_path}); start a new run in another --out")
    resumed = dataclasses.replace(saved, **{name: getattr(config, name) for name in RESUME_MAY_CHANGE})
    check_config(resumed)
    return resumed


def fetch_on_first_use(config: TrainConfig, dist: Distributed) -> None:
    """A paper dataset whose folder is missing from the data root: fetch the authors' release into it (rank 0,
    the others wait), or, offline, one line on how to point at the data; a failed fetch leaves no folder."""
    if config.dataset.lower() not in data.DATASETS:
        return
    folder = Path(config.data_dir) / data.DATASETS[config.dataset.lower()].folder
    if dist.rank == 0 and not folder.exists():
        created = [path for path in (folder.parent, folder) if not path.exists()]
        print(f"{folder} is missing: fetching the authors' release (python data.py --download)", flush=True)
        try:
            for line in data.download_dataset(data.DataConfig(dataset=config.dataset, data_dir=config.data_dir)):
                print(line, flush=True)
        except ConnectionError as err:
            for path in reversed(created):
                shutil.rmtree(path, ignore_errors=True)
            raise ValueError(f"missing dataset folder {folder}, and fetching it failed ({err}); point --data-dir or "
                             f"$BEAR_DATA at the folder that holds {folder.name}/") from None
    dist.barrier()


def config_record(config: TrainConfig, source: ModelSource) -> dict:
    """What train_config.json holds: the flags, the weights actually used (folder, and the commit of a hub id, so
    that eval.py and --resume load the same ones), and the prompt template eval.py checks against."""
    return {**dataclasses.asdict(config), "model_folder": source.folder, "model_revision": source.revision,
            "prompt_template": data.PROMPT}


def read_config(path: Path) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = read_json(path)
    if not isinstance(saved, dict) or not {"dataset", "loss", "model"} <= set(saved):
        raise ValueError(f"{path}: not a train.py config; the file is damaged")
    return TrainConfig(**{k: v for k, v in saved.items() if k in names})


def remove_run(out: Path) -> None:
    """--overwrite: delete only what a run of train.py / eval.py writes, never other files in --out."""
    for path in [*out.glob("step-*"), out / MANIFEST_FILE, out / CONFIG_FILE, out / LOG_FILE, out / "metrics.json"]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILE
    try:
        # On the CPU, as a fresh run's AdamW step counters are; load_state_dict moves the moments to the params.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: cannot be read ({str(err).splitlines()[0]}); the checkpoint is damaged: "
                         f"start again with --overwrite, or restore the file") from None


def save_checkpoint(out: Path, model, config: TrainConfig, source: ModelSource, state: dict,
                    manifest: dict) -> dict:
    """Write the checkpoint of `state["step"]` into a temporary folder, rename it into place, then replace the
    manifest. A kill at any moment leaves the manifest naming complete folders only: the previous checkpoint
    until the new manifest has been renamed over it, the new one after."""
    name = f"step-{state['step']:08d}"
    tmp, final = out / (name + ".tmp"), out / name
    for stale in (tmp, final):  # leftovers of a killed attempt at this very step (never in the manifest)
        if stale.exists():
            shutil.rmtree(stale)
    save_adapter(model, lora_config(config), tmp, base_model_path=config.model)  # PEFT format
    torch.save(state, tmp / STATE_FILE)
    write_json_atomic(tmp / CONFIG_FILE, config_record(config, source))
    os.rename(tmp, final)
    manifest = {**manifest, "last": name, "step": state["step"]}
    if state["best_step"] == state["step"]:
        manifest["best"] = name
    manifest["best_metric"] = state["best_metric"]
    write_json_atomic(out / MANIFEST_FILE, manifest)
    delete_unreferenced_checkpoints(out, manifest)
    return manifest


def delete_unreferenced_checkpoints(out: Path, manifest: dict) -> None:
    keep = {manifest.get("last"), manifest.get("best")}
    for path in out.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

# Flags that may differ between a run and its --resume (they do not change what is computed).
RESUME_MAY_CHANGE = {"resume", "overwrite", "out", "save_every", "eval_batch"}


def parse_config(argv) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the flags given explicitly (a --resume may omit the others)."""
    parser = build_parser(TrainConfig, "LoRA fine-tuning of an LLM recommender with SFT / MSL / BEAR / Obj 3.1 "
                                       "(under torchrun for several processes).")
    config = TrainConfig(**vars(parser.parse_args(argv)))
    for action in parser._actions:  # a second parse with no defaults tells which flags were typed
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    # Absolute paths, so that eval.py and --resume find the model and data from any working directory and shell
    # (the data root given by $BEAR_DATA is recorded too). A hub id stays as typed; train() records its commit.
    if config.model and Path(config.model).expanduser().is_dir():
        config.model = str(Path(config.model).expanduser().resolve())
    config.data_dir = str(Path(config.data_dir or os.environ.get("BEAR_DATA") or "data").expanduser().resolve())
    if config.dataset.lower() not in data.DATASETS and Path(config.dataset).expanduser().is_dir():
        config.dataset = str(Path(config.dataset).expanduser().resolve())  # a dataset folder of your own
    return config, given


def check_config(config: TrainConfig) -> None:
    if not config.dataset:
        raise ValueError("--dataset is required (office, book, toy, clothing, or a dataset folder)")
    if not config.model:
        raise ValueError("--model must name a Hugging Face Llama folder or a hub id")
    positive = ["epochs", "global_batch", "micro_batch", "lora_r", "beam_width", "eval_batch"]
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    for name in ["warmup_steps", "save_every", "max_steps", "limit", "valid_limit", "max_grad_norm", "train_samples"]:
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for name in ["lr", "xi", "tau", "lam", "max_grad_norm", "lora_dropout"]:   # "inf" and "nan" parse as floats
        if not math.isfinite(getattr(config, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(config, name)}")
    for name in ["lr", "xi", "tau"]:
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(config, name)}")
    if config.lam < 0:  # it would reward pushing positive tokens OUT of the top-B, the opposite of eq. 3.4
        raise ValueError(f"--lam must be >= 0 (0 = the base loss alone), got {config.lam}")
    if config.base == "sft" and config.tau != 1.0:
        raise ValueError(f"--tau {config.tau} applies only to the MSL base (--base msl)")
    if config.loss != "bear" and (config.surrogate != "paper" or config.normalize != "tokens"):
        raise ValueError(f"--surrogate and --normalize apply only to --loss bear, got --loss {config.loss}")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    lora_config(config)  # validates r, alpha, dropout and the target names


def lora_config(config: TrainConfig) -> LoraConfig:
    targets = tuple(name.strip() for name in config.lora_targets.split(",") if name.strip())
    return LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets)


def main(argv=None) -> int:
    config, given = parse_config(argv)
    dist = init_distributed()
    try:
        train(config, given, dist)
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, stopped_errors=(TrainingStopped,)))

"""Stage 6: LoRA fine-tuning with SFT, MSL, BEAR or Obj 3.1, on 1 to N processes (SPEC §3, §7).

    python train.py --dataset office --loss bear --model <HF Llama folder> --out out/
    torchrun --nproc_per_node 8 train.py --dataset toy --loss bear --model <Llama-3.x folder>

One optimizer step consumes one GLOBAL batch (default 128 windows), split over the ranks, each
share into micro-batches. A micro-batch's summed per-position loss is divided by the label-token
count of the WHOLE global batch, so the gradients summed over micro-batches and ranks are those of
the batch's mean per-token loss for any split (nanoGPT's `loss / accumulation_steps` needs every
micro-batch to hold as many label tokens). Data parallel by hand, not DDP: one all-reduce of the
few-MB LoRA gradient per step, and ranks may run different numbers of micro-batches. Exact resume:
the data order is seeded by (seed, epoch), the learning rate is a function of the step and dropout
is re-seeded from (seed, step, rank), so the step, adapter and AdamW moments are the whole state.

Oracles in tests/test_train.py: two gloo processes against one, a SIGKILLed-and-resumed run against
an uninterrupted one, transformers' schedule. Shapes as in loss.py (N label positions, V vocab).
"""
import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

import amazon
import data
import loss as losses
from beam import BeamConfig, prefix_thresholds, title_logits
from cli import (GB, MANIFEST_FILE, Distributed, Memory, Progress, RunStopped, build_parser,
                 cli_main, delete_unreferenced_checkpoints, fit_in_memory, format_seconds,
                 init_distributed, option, read_json, read_manifest, resolve_checkpoint,
                 resolve_model, shard_bounds, write_atomically, write_checkpoint, write_json_atomic)
from eval import evaluate
from lora import LoraConfig, apply_lora, load_adapter, save_adapter
from model import DEFAULT_MODEL, DTYPES, load_model, weights_sha256
from tokenizer import load_tokenizer

LOSSES = ("sft", "msl", "bear", "obj31", "sdpo", "sdpo-bear")
PREFERENCE_LOSSES = ("sdpo", "sdpo-bear")  # per prompt: a positive and n sampled negative titles
CONFIG_FILE = "train_config.json"  # the run's TrainConfig, in --out and in every checkpoint
STATE_FILE = "trainer_state.pt"  # AdamW moments, step, best metric, log length
REFERENCE_FILE = "sdpo_reference.pt"  # S-DPO: the negatives and their reference log-probabilities
LOG_FILE = "log.jsonl"


def auto_or_int(text: str) -> int | str:  # --micro-batch's type (argparse names it in errors)
    return text if text == "auto" else int(text)


@dataclasses.dataclass
class TrainConfig:
    dataset: str = option("", "office | book | toy | clothing, or a dataset folder (required)")
    loss: str = option("bear", "training objective (SPEC §3)", choices=LOSSES)
    model: str = option(DEFAULT_MODEL, "a Hugging Face Llama folder or hub id org/name[@revision]")
    out: str = option("out", "checkpoint folder")
    epochs: int = option(10, "passes over the training sample")
    global_batch: int = option(128, "windows per optimizer step, over all processes")
    micro_batch: int | str = option("auto", "windows per forward/backward on one process, or auto "
                                    "(the most that fit in memory, up to 8)", type=auto_or_int)
    max_memory: float = option(0.0, "GB a process may use (--micro-batch auto; 0 = all)")
    lr: float = option(1e-4, "peak AdamW learning rate")
    warmup_steps: int = option(20, "linear warm-up steps, then linear decay to 0")
    max_grad_norm: float = option(1.0, "gradient clipping (as transformers' Trainer); 0 = off")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha (update scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option("q_proj,v_proj", "comma-separated module names")
    beam_width: int = option(10, "B: BEAR's beta_t rank, the beam width of Obj 3.1 and validation")
    lam: float = option(0.6875, "lambda of eq. 3.5: the authors' `topk_weight` (their README's and "
                        "likely the paper's lambda) times xi (their Toy 0.25 -> 0.6875)")
    xi: float = option(2.75, "xi, the sigmoid temperature of eq. 3.4 / 3.1")
    tau: float = option(1.0, "softmax temperature of MSL (and BEAR's MSL base)")
    surrogate: str = option("paper", "BEAR's regulariser: eq. 3.4, or OUR ablation -log sigmoid("
                            "-Delta/xi)", choices=losses.SURROGATES)
    normalize: str = option("tokens", "loss / the global batch's label tokens, or the authors' per-"
                            "micro-batch sum(w_t CE_t) / sum(w_t)", choices=("tokens", "authors"))
    base: str = option("msl", "base loss of BEAR / Obj 3.1", choices=("msl", "sft"))
    init_adapter: str = option("", "start from this adapter (a run or checkpoint); sdpo: SFT's")
    dpo_beta: float = option(1.0, "S-DPO's beta (official default 1)")
    negatives: int = option(3, "S-DPO's sampled negative titles per window (official default 3)")
    negative_seed: int = option(42, "seed of S-DPO's negatives, drawn once per window")
    reg_softmax: str = option("full", "sdpo-bear: p_t and beta_t over the vocabulary (as S-DPO) or "
                              "V_t (masked, as MSL)", choices=("full", "masked"))
    train_samples: int = option(10000, "windows sampled from train with --seed (0 = all)")
    seed: int = option(42, "data sample, data order, LoRA init and dropout")
    dtype: str = option("bf16", "base model dtype (LoRA, AdamW: fp32)", choices=("bf16", "fp32"))
    data_dir: str = option("", "folder holding Office/, Toy/, ... (default $BEAR_DATA, or ./data)")
    eval_batch: int = option(16, "users per validation beam-search pass")
    save_every: int = option(0, "also checkpoint every N steps (0 = epoch ends only)")
    max_steps: int = option(0, "stop after N optimizer steps (0 = all epochs)")
    limit: int = option(0, "use only the first N training windows (0 = all)")
    valid_limit: int = option(0, "validate on the first N windows (0 = all)")
    resume: bool = option(False, "continue the run saved in --out")
    overwrite: bool = option(False, "replace the run saved in --out")


# ------------------------------------------------------ One micro-batch's per-position losses (§3)
def label_position_losses(model, batch: dict, micro: list, trie, config: TrainConfig, tokenizer,
                          weight_sums: list | None = None, preference=None) -> torch.Tensor:
    """Per-label-position losses (N,) fp32 of the micro-batch `micro` (data.EncodedExample); S-DPO:
    per-prompt losses (U,), `preference` = its (negatives (U, n), reference log-probs (U, 1 + n)).
    BEAR's weights summed over positions with > 1 valid token go to `weight_sums` (--normalize
    authors)."""
    if config.loss in PREFERENCE_LOSSES:
        return preference_losses(model, micro, *preference, trie, config, tokenizer.pad_id)
    logits = model(batch["input_ids"], logits_at=batch["label_mask"])  # (N, V); upcast in the loss
    labels = batch["labels"]  # (N,)
    if config.loss == "sft":
        return losses.sft(logits, labels)  # eq. 2.1
    valid_row, valid_token = trie.valid_next(batch["label_nodes"].cpu())  # (M,), (M,)
    valid_row, valid_token = valid_row.to(logits.device), valid_token.to(logits.device)
    if config.loss == "msl":
        return losses.msl(logits, labels, valid_row, valid_token, tau=config.tau)
    if config.loss == "bear":  # eq. 3.5; MSL as the base by default, as in the authors' code
        hyper = dict(beam_width=config.beam_width, lam=config.lam, xi=config.xi, tau=config.tau,
                     base=config.base, surrogate=config.surrogate)
        if weight_sums is not None:
            weights = losses.bear_token_weights(logits, labels, valid_row, valid_token, **hyper)
            several_valid = torch.bincount(valid_row, minlength=labels.numel()) > 1  # (N,)
            weight_sums.append(float(weights[several_valid].sum()))
        return losses.bear(logits, labels, valid_row, valid_token, **hyper)
    # Obj 3.1 (eq. 3.1): thresholds from a constrained beam search under the current parameters (no
    # grad, dropout off), scored as the base loss trains (masked at temperature tau, or full-vocab).
    model.eval()
    with torch.no_grad():
        search = BeamConfig(beam_width=config.beam_width, mask_before_softmax=config.base == "msl")
        thresholds = prefix_thresholds(model, prompts_of(micro), [e.target for e in micro], trie,
                                       tokenizer.eos_id, tokenizer.pad_id, search, tau=config.tau)
    model.train()
    target_lengths = torch.tensor([len(e.target_nodes) for e in micro])
    label_example = torch.repeat_interleave(torch.arange(len(micro)), target_lengths)  # (N,)
    return losses.obj31(logits, labels, valid_row, valid_token, thresholds.to(logits.device),
                        label_example.to(logits.device), beam_width=config.beam_width,
                        lam=config.lam, xi=config.xi, tau=config.tau, base=config.base)


# --------------------------------- S-DPO: a positive and n negative titles per prompt (SPEC §3)
def preference_losses(model, micro: list, negatives: torch.Tensor, reference: torch.Tensor, trie,
                      config: TrainConfig, pad_id: int) -> torch.Tensor:
    """S-DPO's (or S-DPO + BEAR's) loss of each prompt of `micro`, (U,) fp32."""
    items = title_items(micro, negatives)                                             # (U, 1 + n)
    logits, labels, title_of = title_logits(model, prompts_of(micro), items, trie, pad_id)  # (N, V)
    reference = reference.to(logits.device)                                           # (U, 1 + n)
    if config.loss == "sdpo":
        return losses.sdpo(logits, labels, title_of, reference, config.dpo_beta)
    valid_row, valid_token = trie.valid_next(torch.cat([  # (M,): the label positions' V_t
        trie.item_path(item) for item in items.reshape(-1).tolist()]))
    return losses.sdpo_bear(logits, labels, valid_row.to(logits.device),
                            valid_token.to(logits.device), title_of, reference, config.dpo_beta,
                            beam_width=config.beam_width, lam=config.lam, xi=config.xi,
                            base="sft" if config.reg_softmax == "full" else "msl")


def title_items(micro: list, negatives: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.tensor([[e.target] for e in micro]), negatives], dim=1)  # target first


@torch.no_grad()
def reference_log_probs(model, windows: list, negatives: torch.Tensor, trie, config: TrainConfig,
                        pad_id: int, dist: Distributed) -> torch.Tensor:
    """log pi_ref of every window's 1 + n titles, (W, 1 + n) float64: the starting adapter, dropout
    off. It never changes, so it is computed once, not at every step as the official trainer does.
    Fixed chunks, chunk c on rank c mod world: the same numbers for any world size."""
    model.eval()
    size, count = config.eval_batch, len(windows)
    chunks = list(range(0, count, size))[dist.rank::dist.world]
    progress = Progress("S-DPO reference log-probs", len(chunks) * size, rank=dist.rank)
    parts = []
    for done, start in enumerate(chunks):
        micro = windows[start:start + size]
        items = title_items(micro, negatives[start:start + size])                     # (u, 1 + n)
        logits, labels, title_of = title_logits(model, prompts_of(micro), items, trie, pad_id)
        log_probs = losses.title_log_probs(-losses.sft(logits, labels), title_of, items.shape)
        parts.append((start, log_probs.double().cpu()))
        progress((done + 1) * size)
    table = torch.empty(count, negatives.shape[1] + 1, dtype=torch.float64)
    for start, part in dist.gather(parts):
        table[start:start + len(part)] = part
    model.train()
    return table


# ------------------------------------ The run: set up once, then steps, validation and checkpoints
@dataclasses.dataclass
class Run:
    """A training run once set up (start_run): what every step, validation and checkpoint reads."""
    config: TrainConfig
    dist: Distributed
    record: dict                 # train_config.json: the flags, the weights used, the template
    tokenizer: object
    dataset: data.Dataset
    trie: data.ItemTrie
    train_examples: list         # data.EncodedExample, tokenised once
    model: torch.nn.Module
    params: list                 # the trainable LoRA tensors (fp32), in one order on every rank
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    state: dict                  # step, best metric and step, validation records, log length
    manifest: dict               # checkpoint.json: the last and the best complete checkpoints
    preference: tuple | None     # S-DPO: negatives (W, n), reference log-probs (W, 1 + n) float64


def train(config: TrainConfig, given: set[str], dist: Distributed) -> dict:
    run = start_run(config, given, dist)
    config, state, out = run.config, run.state, Path(run.config.out)  # a resume's saved config
    if state["step"] >= run.total_steps:
        dist.print(f"{out}: already trained for {state['step']} steps, nothing to do")
        return state
    start_time, start_step = time.time(), state["step"]
    run.model.train()
    # Rank 0 logs, line-buffered: every record is on disk once written. The other ranks: /dev/null.
    with open(out / LOG_FILE if dist.rank == 0 else os.devnull, "a", buffering=1) as log:
        while state["step"] < run.total_steps:
            record = train_step(run)
            step, epoch = record["step"], record["epoch"]
            log.write(json.dumps(record, allow_nan=False) + "\n")
            rate = (time.time() - start_time) / (step - start_step)
            left = format_seconds(rate * (run.total_steps - step))
            peak = f" | peak {max(record['peak_memory_gb']):.2f} GB/process" + \
                f" (max of {dist.world})" * (dist.world > 1) if step == start_step + 1 else ""
            dist.print(f"step {step}/{run.total_steps} | epoch {epoch} | loss {record['loss']:.4f}"
                       f" | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} label tok/s | "
                       f"{rate:.2f} s/step | ~{left} left{peak}")
            end_of_epoch = step % run.steps_per_epoch == 0 or step == run.total_steps
            if end_of_epoch:
                log.write(json.dumps(validate(run, epoch), allow_nan=False) + "\n")
            if end_of_epoch or (config.save_every and step % config.save_every == 0):
                if dist.rank == 0:
                    save_checkpoint(run, log_bytes=log.tell())
                dist.barrier()  # nobody runs ahead of a checkpoint that may yet fail to write
    if dist.rank == 0:  # the manifest is rank 0's
        print(f"done: best valid NDCG@10 {state['best_metric']:.4f} at step {state['best_step']} "
              f"({out / run.manifest['best']})", flush=True)
    return state


def train_step(run: Run) -> dict:
    """One AdamW step on this step's global batch: forward and backward over this rank's share,
    gradients summed over micro-batches and ranks, clipped, applied. Returns the log record."""
    config, dist, step = run.config, run.dist, run.state["step"]
    epoch, step_in_epoch = divmod(step, run.steps_per_epoch)
    order = epoch_order(len(run.train_examples), config.seed, epoch)
    start = step_in_epoch * config.global_batch
    batch_ids = order[start:start + config.global_batch]
    global_batch = [run.train_examples[i] for i in batch_ids]
    global_label_tokens = sum(len(e.target_nodes) for e in global_batch)  # known to every rank
    global_count = len(global_batch) if run.preference else global_label_tokens  # S-DPO: prompts
    shards = [shard_bounds(len(global_batch), r, dist.world) for r in range(dist.world)]
    my_ids = batch_ids[slice(*shards[dist.rank])]  # ranks differ by one window at most
    my_batch = [run.train_examples[i] for i in my_ids]
    # --normalize authors: each micro-batch's weighted mean, averaged over all ranks' micro-batches.
    global_micro_batches = sum(math.ceil((b - a) / config.micro_batch) for a, b in shards)
    step_start, memory = time.time(), Memory(dist.device)  # its peak from here
    reseed_dropout(config.seed, step, dist.rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    which = " (rank 0's share)" if dist.world > 1 else ""  # 128 windows take minutes on a CPU
    progress = Progress(f"step {step + 1}/{run.total_steps}{which}", len(my_batch), rank=dist.rank)
    for first in range(0, len(my_batch), config.micro_batch):
        micro = my_batch[first:first + config.micro_batch]
        ids = my_ids[first:first + config.micro_batch]
        batch = data.collate_train(micro, run.tokenizer.pad_id, dist.device)
        weight_sums = [] if config.normalize == "authors" else None
        preference = run.preference and tuple(table[ids] for table in run.preference)
        per_position = label_position_losses(run.model, batch, micro, run.trie, config,
                                             run.tokenizer, weight_sums, preference)  # (N,)
        # Divide by the GLOBAL label count: summed over micro-batches and ranks, the batch mean.
        divisor = global_count if weight_sums is None else \
            (weight_sums[0] + 1e-8) * global_micro_batches  # the authors' 1e-8
        (per_position.sum() / divisor).backward()
        loss_sum += per_position.detach().sum().double() * (global_count / divisor)
        progress(first + len(micro))

    # Sum the gradients (and the loss) over ranks: one all-reduce of the flat LoRA gradients.
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in run.params])
    flat = torch.cat([flat.double(), loss_sum.reshape(1)])
    dist.all_reduce_sum(flat)
    batch_loss = float(flat[-1]) / global_count
    for param, grad in zip(run.params, flat[:-1].split([p.numel() for p in run.params])):
        param.grad = grad.view_as(param).to(param.dtype)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm or math.inf))
    for what, value in (("loss", batch_loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):  # all-reduced: every rank stops here, none is left waiting
            kept = run.manifest and Path(config.out) / run.manifest["last"]
            raise RunStopped(f"{what} is {value} at step {step + 1}; stopped without updating "
                                  f"the adapter. Last good checkpoint (kept): "
                                  f"{kept or 'none was written yet'}")
    lr = learning_rate(step, run.total_steps, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["step"] = step + 1
    return {"step": step + 1, "epoch": epoch + 1, "loss": batch_loss, "lr": lr,
            "grad_norm": grad_norm, "label_tokens": global_label_tokens,
            "tokens_per_s": global_label_tokens / (time.time() - step_start),
            "peak_memory_gb": dist.gather([round(memory.peak() / GB, 3)])}  # per rank


def prompts_of(micro: list) -> list[list[int]]:
    return [e.input_ids[:e.prompt_length].tolist() for e in micro]


def validate(run: Run, epoch: int) -> dict:
    """The end-of-epoch validation search; the best epoch by NDCG@10 is the `best` checkpoint."""
    state, started = run.state, time.time()
    run.model.eval()
    search = BeamConfig(beam_width=run.config.beam_width, batch_size=run.config.eval_batch)
    examples = run.dataset.valid[:run.config.valid_limit or None]
    metrics, _ = evaluate(run.model, run.dataset, run.tokenizer, run.trie, examples, search,
                          run.dist, label=f"epoch {epoch} validation")
    run.model.train()
    record = {"epoch": epoch, "step": state["step"], "valid": metrics,
              "valid_s": time.time() - started}
    state["epochs"].append(record)
    if state["best_metric"] is None or metrics["ndcg@10"] > state["best_metric"]:
        state["best_metric"], state["best_step"] = metrics["ndcg@10"], state["step"]
    run.dist.print(f"epoch {epoch}: valid NDCG@10 {metrics['ndcg@10']:.4f} HR@10 "
                   f"{metrics['hr@10']:.4f} ({metrics['num_examples']} windows, "
                   f"{record['valid_s']:.0f} s)")
    return record


def start_run(config: TrainConfig, given: set[str], dist: Distributed) -> Run:
    """Check --out, load the model, data and optimizer, resume or start fresh. Everything that can
    fail on a bad input is loaded before anything is written."""
    config, saved = prepare_out_dir(config, given)
    out = Path(config.out)
    source = resolve_model(config.model, revision=saved.get("model_revision"))
    dist.print(f"model: {config.model}"
               + (f" (revision {source.revision}, {source.folder})" if source.hub_id else ""))
    tokenizer = load_tokenizer(source.folder)
    amazon.fetch_if_missing(config.dataset, config.data_dir, dist)
    dataset = data.load_dataset(data.DataConfig(dataset=config.dataset, data_dir=config.data_dir,
                                                train_samples=config.train_samples,
                                                seed=config.seed))
    for note in dataset.notes:  # e.g. Book / Clothing: validation held out of train
        dist.print(f"note: {note}")
    trie = data.build_trie(dataset, tokenizer)
    windows = data.encode_examples(dataset.train[:config.limit or None], dataset, tokenizer, trie)
    if dist.world > len(windows):
        raise ValueError(f"{dist.world} processes but only {len(windows)} training windows: "
                         f"use at most {len(windows)} processes (or a larger --limit)")
    negatives = data.sample_negatives(  # drawn once, from the seed: the same on every rank
        dataset.train[:config.limit or None], dataset.titles, config.negatives,
        config.negative_seed) if config.loss in PREFERENCE_LOSSES else None
    model = load_model(source.folder, dtype=DTYPES[config.dtype], device=dist.device)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    if config.init_adapter:  # its rank, alpha and targets; the dropout is --lora-dropout's
        config = adopt_adapter_shape(config, given, load_adapter(model, config.init_adapter,
                                                                 dropout=config.lora_dropout))
    else:
        apply_lora(model, lora_config(config))
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]  # LoRA A, B (fp32)
    for param in params:  # rank 0's init everywhere (insurance against a rank-dependent RNG)
        dist.broadcast(param.data)
    micro_batch, reason = config.micro_batch, None
    if micro_batch == "auto" and "micro_batch_chosen" in saved:  # resumed: same split, same sums
        micro_batch, reason = saved["micro_batch_chosen"], saved["micro_batch_reason"]
    elif micro_batch == "auto":
        micro_batch, reason = choose_micro_batch(model, windows, trie, config, tokenizer, dist,
                                                 negatives)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # betas, eps: defaults
    steps_per_epoch = math.ceil(len(windows) / config.global_batch)  # the last may be short
    total_steps = min(steps_per_epoch * config.epochs, config.max_steps or math.inf)
    # Beside the flags, the weights used (a hub id's commit: eval.py, --resume; their hash, checked
    # by eval.py wherever they live) and the prompt template.
    record = {**dataclasses.asdict(config), "model_folder": source.folder,
              "model_revision": source.revision, "prompt_template": data.PROMPT,
              "weights_sha256": weights_sha256(source.folder) if dist.rank == 0 else None}
    if reason:
        record.update(micro_batch_chosen=micro_batch, micro_batch_reason=reason)
        dist.print(f"micro-batch: auto -> {micro_batch} ({reason})")
    config = dataclasses.replace(config, micro_batch=micro_batch)  # "auto" stays in the record
    manifest = (read_manifest(out) if config.resume else None) or {}
    preference = None
    if negatives is not None and manifest:  # resumed: the reference computed when the run began
        preference = negatives, torch.load(out / REFERENCE_FILE, weights_only=True)["reference"]
    elif negatives is not None:  # before a resumed adapter replaces the starting one
        started = time.time()
        preference = negatives, reference_log_probs(model, windows, negatives, trie, config,
                                                    tokenizer.pad_id, dist)
        record["reference_log_probs_s"] = round(time.time() - started, 1)
    state = {"step": 0, "best_metric": None, "best_step": None, "epochs": [], "log_bytes": 0}
    if manifest:
        checkpoint = out / manifest["last"]
        load_adapter(model, checkpoint)
        try:  # on the CPU, as a fresh run's AdamW step counters; load_state_dict moves the moments
            state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise ValueError(f"{checkpoint / STATE_FILE}: cannot be read ("
                             f"{str(err).splitlines()[0]}); the checkpoint is damaged: start again "
                             f"with --overwrite, or restore the file") from None
        optimizer.load_state_dict(state.pop("optimizer"))
        dist.print(f"resuming {out} from step {state['step']} ({checkpoint.name})")
    if dist.rank == 0:
        if config.overwrite:  # only what we write (step-* below), never other files in --out
            for name in (MANIFEST_FILE, CONFIG_FILE, LOG_FILE, REFERENCE_FILE, "metrics.json"):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CONFIG_FILE, record)
        if preference and not manifest:
            write_atomically(out / REFERENCE_FILE, lambda path: torch.save(
                {"negatives": preference[0], "reference": preference[1]}, path))
        if (out / LOG_FILE).exists():  # drop what a killed run logged after its last checkpoint
            os.truncate(out / LOG_FILE, state["log_bytes"])
        delete_unreferenced_checkpoints(out, manifest)
    dist.barrier()  # --out is ready before any rank trains
    return Run(config, dist, record, tokenizer, dataset, trie, windows, model, params,
               optimizer, steps_per_epoch, total_steps, state, manifest, preference)


def adopt_adapter_shape(config: TrainConfig, given: set[str], lora: LoraConfig) -> TrainConfig:
    """The run's LoRA shape flags set to --init-adapter's; a flag typed otherwise is refused."""
    shape = dict(lora_r=lora.r, lora_alpha=lora.alpha, lora_targets=",".join(lora.target_modules))
    for name in given & set(shape):
        if lora_config(dataclasses.replace(config, **{name: shape[name]})) != lora_config(config):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(config, name)} differs from "
                             f"--init-adapter's {shape[name]} ({config.init_adapter})")
    return dataclasses.replace(config, **shape)


# -------------------------------------- --micro-batch auto: the most windows that fit, chosen once
def choose_micro_batch(model, windows: list, trie, config: TrainConfig, tokenizer,
                       dist: Distributed, negatives: torch.Tensor | None) -> tuple[int, str]:
    """The largest micro-batch, up to 8 and a rank's share of the global batch, whose forward and
    backward on the longest windows fit in memory (cli.fit_in_memory), the same on every rank."""
    longest = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids), reverse=True)
    model.train()

    def trial(count: int) -> None:  # a forward + backward on the `count` longest windows
        micro, ids = [windows[i] for i in longest[:count]], longest[:count]
        batch = data.collate_train(micro, tokenizer.pad_id, dist.device)
        preference = negatives is not None and (negatives[ids], torch.zeros(count, 1 + len(
            negatives[0]), dtype=torch.float64))  # the reference's value costs no memory
        label_position_losses(model, batch, micro, trie, config, tokenizer,
                              preference=preference).sum().backward()
        model.zero_grad(set_to_none=True)  # and no optimizer step; dropout is re-seeded every step

    cap = min(8, math.ceil(config.global_batch / dist.world))
    return fit_in_memory(trial, cap, config.max_memory, dist)


# ------------------------- The data order and the learning rate: functions of (seed, epoch, step)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's example order, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up then linear decay to 0, exactly transformers' get_linear_schedule_with_warmup
    (the authors' Trainer): step k (0-based) uses lr * k / warmup, so the first update is 0."""
    if step < config.warmup_steps:
        return config.lr * step / max(1, config.warmup_steps)
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))


def reseed_dropout(seed: int, step: int, rank: int) -> None:
    """Dropout masks depend only on (seed, step, rank): an exactly resumable random state."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


# --------------------------------------------- The --out folder: one run, resumed from its manifest
def prepare_out_dir(config: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict]:
    """--out against --resume / --overwrite: the config to run, checked, and a resume's record."""
    out, path, recorded = Path(config.out), Path(config.out) / CONFIG_FILE, {}
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if path.exists() and not config.overwrite:  # --overwrite: the old run is removed once loaded
        recorded = read_json(path)
        if not isinstance(recorded, dict) or not {"dataset", "loss", "model"} <= set(recorded):
            raise ValueError(f"{path}: not a train.py config; the file is damaged")
        saved = TrainConfig(**{k: v for k, v in recorded.items()
                               if k in TrainConfig.__dataclass_fields__})
        if not config.resume:
            raise ValueError(f"--out {out} already holds a run ({CONFIG_FILE}: --loss {saved.loss} "
                             f"on {saved.dataset}); pass --resume to continue it or --overwrite to "
                             f"replace it")
        for name in given - RESUME_MAY_CHANGE:
            if getattr(config, name) != getattr(saved, name):
                raise ValueError(f"--resume: --{name.replace('_', '-')} {getattr(config, name)} "
                                 f"differs from the saved run's {getattr(saved, name)} "
                                 f"({path}); start a new run in another --out")
        config = dataclasses.replace(saved, **{k: getattr(config, k) for k in RESUME_MAY_CHANGE})
    check_config(config)
    return config, recorded


def save_checkpoint(run: Run, log_bytes: int) -> None:
    """This step's adapter, trainer state and config as a checkpoint (cli.write_checkpoint)."""
    config, state, out = run.config, run.state, Path(run.config.out)

    def fill(folder: Path) -> None:
        save_adapter(run.model, lora_config(config), folder, base_model_path=config.model)  # PEFT
        torch.save({**state, "optimizer": run.optimizer.state_dict(), "log_bytes": log_bytes},
                   folder / STATE_FILE)
        write_json_atomic(folder / CONFIG_FILE, run.record)
    run.manifest = write_checkpoint(out, state["step"], fill, run.manifest,
                                    best=state["best_step"] == state["step"],
                                    best_metric=state["best_metric"])


# ----------------------------------------------------------------------------- The command line
RESUME_MAY_CHANGE = {"resume", "overwrite", "out", "save_every", "eval_batch"}  # not the maths


def parse_config(argv) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the flags given explicitly (a --resume may omit the others)."""
    parser = build_parser(TrainConfig, "LoRA fine-tuning of an LLM recommender with SFT / MSL / "
                                       "BEAR / Obj 3.1 (under torchrun for several processes).")
    config = TrainConfig(**vars(parser.parse_args(argv)))
    for action in parser._actions:  # a second parse with no defaults tells which flags were typed
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    # Absolute paths, found from anywhere (a $BEAR_DATA root too); a hub id stays as typed.
    if config.model and Path(config.model).expanduser().is_dir():
        config.model = str(Path(config.model).expanduser().resolve())
    config.data_dir = str(data.resolve_data_root(config.data_dir).resolve())
    if config.init_adapter:  # a run folder: its best checkpoint
        folder = Path(config.init_adapter).expanduser()
        config.init_adapter = str((resolve_checkpoint(folder) if (folder / MANIFEST_FILE).exists()
                                   else folder).resolve())
    if config.dataset.lower() not in data.DATASETS and Path(config.dataset).expanduser().is_dir():
        config.dataset = str(Path(config.dataset).expanduser().resolve())  # a folder of your own
    return config, given


def check_config(config: TrainConfig) -> None:
    """What the user typed, checked once, cheapest first, before anything is loaded or written."""
    if not config.dataset:
        raise ValueError("--dataset is required (office, book, toy, clothing, or a dataset folder)")
    if config.dataset.lower() not in data.DATASETS:  # then a folder of your own, or unknown
        data.locate_dataset(config.dataset, config.data_dir)  # the data stage's one-line error
    if not config.model:
        raise ValueError("--model must name a Hugging Face Llama folder or a hub id")
    for wanted, bad, names in [
            (">= 1", lambda v: v < 1, "epochs global_batch micro_batch beam_width eval_batch "
                                      "negatives"),
            (">= 0", lambda v: v < 0, "warmup_steps save_every max_steps limit valid_limit "
                                      "max_grad_norm train_samples max_memory"),
            ("a finite number", lambda v: not math.isfinite(v),  # "nan" and "inf" parse as floats
             "lr xi tau lam max_grad_norm lora_dropout max_memory dpo_beta"),
            ("> 0", lambda v: not v > 0, "lr xi tau dpo_beta")]:
        for name in names.split():
            if (value := getattr(config, name)) != "auto" and bad(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")
    if config.lam < 0:  # it would push positive tokens OUT of the top-B, the opposite of eq. 3.4
        raise ValueError(f"--lam must be >= 0 (0 = the base loss alone), got {config.lam}")
    if config.base == "sft" and config.tau != 1.0:
        raise ValueError(f"--tau {config.tau} applies only to the MSL base (--base msl)")
    if config.loss != "bear" and (config.surrogate != "paper" or config.normalize != "tokens"):
        raise ValueError(f"--surrogate and --normalize apply only to --loss bear, got --loss "
                         f"{config.loss}")
    if config.init_adapter and not (Path(config.init_adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--init-adapter {config.init_adapter}: no adapter_config.json there "
                         f"(give a train.py run or checkpoint folder, or a PEFT LoRA adapter)")
    preference = config.loss in PREFERENCE_LOSSES
    if preference and not config.init_adapter:
        raise ValueError(f"--loss {config.loss} starts from an SFT adapter, also its frozen "
                         f"reference: give --init-adapter (a train.py --loss sft run)")
    if not preference and (config.dpo_beta, config.negatives, config.negative_seed) != (1.0, 3, 42):
        raise ValueError(f"--dpo-beta, --negatives and --negative-seed apply only to --loss sdpo "
                         f"and sdpo-bear, got --loss {config.loss}")
    if config.reg_softmax != "full" and config.loss != "sdpo-bear":
        raise ValueError(f"--reg-softmax applies only to --loss sdpo-bear, not {config.loss}")
    if config.normalize == "authors" and config.micro_batch == "auto":
        raise ValueError("--normalize authors divides by each micro-batch's weights, so the "
                         "micro-batch is part of the loss: give it, e.g. --micro-batch 8")
    if config.max_memory and config.micro_batch != "auto":
        raise ValueError("--max-memory applies to --micro-batch auto only")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    lora_config(config)  # LoraConfig checks r, alpha, dropout and the target names


def lora_config(config: TrainConfig) -> LoraConfig:
    targets = tuple(name.strip() for name in config.lora_targets.split(",") if name.strip())
    return LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      target_modules=targets)


def main(argv=None) -> int:
    config, given = parse_config(argv)
    dist = init_distributed()
    try:
        train(config, given, dist)
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))

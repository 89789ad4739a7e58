"""The reproduction study: do the paper's claims hold in this code? (SPEC §8; paper Fig. 4/6, Tables 2 and 5)

    python bench/study.py --preset cpu --dataset toy            # every unit not yet done (resumable), the report
    python bench/study.py --preset cpu --dataset toy --report   # every number again from results/cpu-toy/ alone

--dataset is a paper dataset (office, the default; book, toy, clothing) or a dataset folder of your own;
--data-dir, $BEAR_DATA or ./data holds the paper's (a missing one is downloaded, as train.py does); --model is a
folder or a hub id. Results go to results/<preset>-<dataset>/, checkpoints to out-study/<preset>-<dataset>/.

The protocol, in the order `run_study` executes it (every step a UNIT, skipped when its result exists):

 1. popularity   the B most frequent training targets, for every test user (a floor any model must beat)
 2. msl-lr*      MSL at each learning rate of the preset, extended past an edge that wins (msl_grid); each
                 run keeps its best epoch on VALIDATION (train.py's checkpoint), so the grid chooses the
                 learning rate and the number of steps
 3. bear-*       BEAR at the chosen lr over a small (lambda', xi) grid, chosen on validation NDCG@10
 4. sft-*        SFT at the chosen lr
 5. test/*       each chosen model on the test split: the constrained beam search (B = 10, mask before the
                 softmax, length penalty 0), the target under teacher forcing on the same prefill (every
                 token's rank among its valid tokens: the necessary condition, Fig. 4), and for the targets that
                 could be in the exact top-K the exact best-first top-K search (PR@K, Fig. 6)
 6. obj31, bear with the authors' normalisation, bear with the "violators" surrogate (our ablation): trained
    at the chosen lr and BEAR's chosen (lambda', xi), then tested the same way
 7. where the runs above predate the weights' recorded hash: MSL and the chosen BEAR again on these weights;
    then MSL and BEAR under the authors' evaluation (length penalty 1.0; evaluation only, the same runs)
 8. RQ5 (Fig. 8): BEAR one factor at a time around the chosen (lambda', xi); the scale point: MSL and the
    chosen BEAR on scale_samples training windows
 9. SFT under the authors' evaluation (mask after the softmax; retrained first on these weights where the
    first predates them); S-DPO over sdpo_lr_grid from that SFT run, S-DPO + BEAR at the chosen rate (Fig. 7),
    each tested under ours and with the mask after the softmax (S-DPO trains the full softmax, as SFT)

Never is anything selected on test. A unit writes its folder under --results atomically (as NAME.tmp, then
renamed), so rerunning skips finished units, and an interrupted training resumes from its last checkpoint in
--work (train.py --resume); an interrupted test evaluation resumes from its partial examples file. The
report (`--report`) reads only the results folder: per-example records, training logs, configs.

Paired bootstrap CIs resample test examples (seeded); PR@K is a ratio, recomputed on every resample.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CUTOFFS = (5, 10)


@dataclass(frozen=True)
class Preset:
    """Everything that sizes the study. A preset is data: `cpu` and `paper` run the same code."""
    dataset: str
    model: str
    data_dir: str
    train_samples: int
    epochs: int
    global_batch: int
    micro_batch: int
    warmup_steps: int
    lr_grid: tuple            # MSL learning rates; the best on validation is shared by every loss
    lr_extensions: int        # rates added past a winning edge of lr_grid (msl_grid)
    bear_grid: tuple          # (lambda', xi) pairs: lambda' is the authors' topk_weight, our --lam = lambda' * xi
    valid_limit: int          # validation windows per epoch (0 = all)
    test_limit: int           # at most this many test windows, a seeded sample of a larger split (0 = all)
    beam_width: int = 10
    eval_batch: int = 16      # users per search pass
    save_every: int = 8       # checkpoint every N steps, so a kill loses at most N steps
    nproc: int = 1            # training processes (torchrun when > 1)
    dtype: str = "bf16"
    seed: int = 42
    bootstrap: int = 2000     # paired bootstrap resamples
    chunk: int = 64           # test windows between two appends to the partial examples file
    # RQ5 (Fig. 8): BEAR one factor at a time around its chosen (lambda', xi): these lambda' at the chosen
    # xi, and these xi at the chosen lambda' (points equal to the chosen one are not run twice)
    sweep_topk_weights: tuple = ()
    sweep_xis: tuple = ()
    scale_samples: int = 0    # a scale point: MSL and the chosen BEAR again on this many windows (0 = none)
    sdpo_lr_grid: tuple = ()  # S-DPO's learning rates (from the SFT run); () = no S-DPO arms


PRESETS = {
    # This 2-core CPU: SmolLM2-135M-Instruct (the hub id; here the hub cache `smollm2-hf --hf-cache` builds). A
    # training unit is 64 steps of 16 windows (2 epochs of 512 windows), a test unit at most 2,000 test windows:
    # all of Office's 1,925, a seeded sample of Toy's 4,794 (the whole split would take ~1 h per unit); about
    # 15 + 25 min per unit alone on the machine, twice that with two units side by side.
    "cpu": Preset(dataset="office", model="HuggingFaceTB/SmolLM2-135M-Instruct", data_dir="",
                  train_samples=512, epochs=2,
                  global_batch=16, micro_batch=8, warmup_steps=2, lr_grid=(5e-4, 1e-3, 2e-3), lr_extensions=2,
                  bear_grid=((0.25, 2.75), (1.0, 1.0), (3.0, 0.5)), valid_limit=200, test_limit=2000,
                  sweep_topk_weights=(0.1, 1.0, 5.0), sweep_xis=(0.5, 1.0), scale_samples=2048,
                  sdpo_lr_grid=(2e-4, 5e-4)),  # about SFT's / 10, as the official 1e-5 against SFT's 1e-4
    # SPEC §7 on 8 GPUs: Llama-3.2-3B, 10k windows, 10 epochs, global batch 128, lr 1e-4.
    "paper": Preset(dataset="office", model="meta-llama/Llama-3.2-3B", data_dir="", train_samples=10000,
                    epochs=10, global_batch=128, micro_batch=8, warmup_steps=20, lr_grid=(1e-4,), lr_extensions=0,
                    bear_grid=((0.25, 2.75), (1.0, 1.0), (3.0, 0.5)), valid_limit=0, test_limit=0,
                    save_every=20, nproc=8, sweep_topk_weights=(0.1, 1.0, 5.0), sweep_xis=(0.5, 1.0),
                    sdpo_lr_grid=(1e-5,)),  # the official S-DPO learning rate
}


class StudyError(RuntimeError):
    """A unit failed (its train.py exited non-zero, a result file is missing): one line, exit 2."""


# ---------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------

def run_study(preset: Preset, results: Path, work: Path) -> None:
    started = time.time()
    write_json(results / "preset.json", dataclasses.asdict(preset))
    popularity_unit(preset, results)

    msl_runs = msl_grid(preset, results, work)
    msl = select(msl_runs)
    drop_adapters(msl_runs, msl)
    lr = msl["config"]["lr"]
    bear_runs = [train_unit(preset, results, work, f"bear-lr{lr:g}-tw{tw:g}-xi{xi:g}", loss="bear", lr=lr,
                            lam=tw * xi, xi=xi) for tw, xi in preset.bear_grid]
    bear = select(bear_runs)
    drop_adapters(bear_runs, bear)
    lam, xi = bear["config"]["lam"], bear["config"]["xi"]
    tw = round(lam / xi, 6)  # lambda', the authors' topk_weight
    sft = train_unit(preset, results, work, f"sft-lr{lr:g}", loss="sft", lr=lr)
    write_json(results / "selection.json", {"msl": msl["name"], "bear": bear["name"], "lr": lr,
                                            "topk_weight": tw, "xi": xi, "lam": lam})

    # The comparison the paper is about first, so a study stopped early has it: BEAR vs MSL, then SFT, base.
    for arm, run in (("msl", msl), ("bear", bear), ("sft", sft), ("base", None)):
        evaluate_unit(preset, results, work, arm, run)
    for arm, name, flags in (("obj31", f"obj31-lr{lr:g}-tw{tw:g}-xi{xi:g}", dict(loss="obj31")),
                             ("bear-authors-norm", f"bearnorm-lr{lr:g}-tw{tw:g}-xi{xi:g}",
                              dict(loss="bear", normalize="authors")),
                             ("bear-violators", f"bearviol-lr{lr:g}-tw{tw:g}-xi{xi:g}",
                              dict(loss="bear", surrogate="violators"))):
        run = train_unit(preset, results, work, name, lr=lr, lam=lam, xi=xi, **flags)
        evaluate_unit(preset, results, work, arm, run)
    # RQ5 and the scale point compare BEAR with an MSL trained on the same weights. Where the runs above predate
    # the weights' hash (train_config.json's weights_sha256) or used other weights, MSL and the chosen BEAR are
    # trained again on these, as `msl-w<hash>` and the sweep's own point at the chosen (lambda', xi).
    current = weights_hash(preset.model)
    if msl["config"].get("weights_sha256") != current:
        suffix = f"-w{current[:8]}"
        msl = train_unit(preset, results, work, f"msl-lr{lr:g}{suffix}", loss="msl", lr=lr)
        evaluate_unit(preset, results, work, f"msl{suffix}", msl)
        bear = train_unit(preset, results, work, f"bear-lr{lr:g}-tw{tw:g}-xi{xi:g}{suffix}", loss="bear", lr=lr,
                          lam=lam, xi=xi)
        evaluate_unit(preset, results, work, f"bear-tw{tw:g}-xi{xi:g}", bear)
    # The baselines as their authors evaluate them (evaluation only, the same runs; the report pairs each with
    # the run's test under our settings): MSL and BEAR at transformers' default length penalty 1.0.
    for arm, run in (("msl-lp1", msl), ("bear-lp1", bear)):
        evaluate_unit(preset, results, work, arm, run, length_penalty=1.0)
    # RQ5: lambda' and xi one at a time around BEAR's chosen point (run, like every unit, only if missing).
    for sweep_tw, sweep_xi in sweep_points(preset, tw, xi):
        run = train_unit(preset, results, work, f"bear-lr{lr:g}-tw{sweep_tw:g}-xi{sweep_xi:g}", loss="bear",
                         lr=lr, lam=sweep_tw * sweep_xi, xi=sweep_xi)
        evaluate_unit(preset, results, work, f"bear-tw{sweep_tw:g}-xi{sweep_xi:g}", run)
    # Scale: MSL and the chosen BEAR on more training windows, everything else the same.
    if preset.scale_samples:
        n = preset.scale_samples
        for arm, name, flags in ((f"msl-n{n}", f"msl-lr{lr:g}-n{n}", dict(loss="msl")),
                                 (f"bear-n{n}", f"bear-lr{lr:g}-tw{tw:g}-xi{xi:g}-n{n}",
                                  dict(loss="bear", lam=lam, xi=xi))):
            run = train_unit(preset, results, work, name, lr=lr, train_samples=n, **flags)
            evaluate_unit(preset, results, work, arm, run)
    # SFT searched as its authors search it, the mask after the softmax (on these weights, tested both ways).
    if sft["config"].get("weights_sha256") != current:
        sft = train_unit(preset, results, work, f"sft-lr{lr:g}-w{current[:8]}", loss="sft", lr=lr)
        evaluate_unit(preset, results, work, f"sft-w{current[:8]}", sft)
    evaluate_unit(preset, results, work, "sft-mask-after", sft, mask_before_softmax=False)
    # S-DPO and S-DPO + BEAR (Fig. 7) from this SFT run, also their frozen reference: S-DPO's learning rate
    # chosen on validation, S-DPO + BEAR at it with BEAR's chosen lambda and xi; the same negatives (seeded).
    if preset.sdpo_lr_grid:
        # A prompt brings its positive and 3 negatives (train.py's default), 4 sequences: a micro-batch of a quarter
        # of the prompts holds as many sequences as the other losses' (at 8 prompts S-DPO peaked at 21.5 GB on the
        # CPU preset and was killed for memory). The optimizer step is the same global batch either way.
        start = dict(init_adapter=sft["dir"] / "adapter", micro_batch=max(1, preset.micro_batch // 4))
        sdpo_runs = [train_unit(preset, results, work, f"sdpo-lr{rate:g}", loss="sdpo", lr=rate, **start)
                     for rate in preset.sdpo_lr_grid]
        sdpo = select(sdpo_runs)
        drop_adapters(sdpo_runs, sdpo)
        evaluate_unit(preset, results, work, "sdpo", sdpo)
        rate = sdpo["config"]["lr"]
        sdpo_bear = train_unit(preset, results, work, f"sdpobear-lr{rate:g}-tw{tw:g}-xi{xi:g}", loss="sdpo-bear",
                               lr=rate, lam=lam, xi=xi, **start)
        evaluate_unit(preset, results, work, "sdpo-bear", sdpo_bear)
        # S-DPO trains the full-vocabulary softmax, as SFT: also searched as SFT's authors search it.
        for arm, run in (("sdpo-mask-after", sdpo), ("sdpo-bear-mask-after", sdpo_bear)):
            evaluate_unit(preset, results, work, arm, run, mask_before_softmax=False)
    print(f"study: every unit done ({time.time() - started:.0f} s this invocation)", flush=True)


def msl_grid(preset: Preset, results: Path, work: Path) -> list[dict]:
    """MSL at each learning rate of the grid; while the best on validation is at an edge of the rates run so far,
    one more rate past that edge (x2 above, / 2 below), at most preset.lr_extensions more: the chosen rate is
    then one the curve falls away from on both sides, not where it may still be rising."""
    runs = [train_unit(preset, results, work, f"msl-lr{lr:g}", loss="msl", lr=lr) for lr in preset.lr_grid]
    for _ in range(preset.lr_extensions):
        rates, best = sorted(run["config"]["lr"] for run in runs), select(runs)["config"]["lr"]
        if best not in (rates[0], rates[-1]) or len(rates) < 2:
            break
        lr = best * 2 if best == rates[-1] else best / 2
        runs.append(train_unit(preset, results, work, f"msl-lr{lr:g}", loss="msl", lr=lr))
    return runs


def sweep_points(preset: Preset, tw: float, xi: float) -> list[tuple[float, float]]:
    """RQ5's one-factor-at-a-time points around the chosen (lambda', xi), the chosen point left out."""
    points = [(t, xi) for t in preset.sweep_topk_weights] + [(tw, x) for x in preset.sweep_xis]
    return [point for point in points if point != (tw, xi)]


def weights_hash(model: str) -> str:
    """The SHA-256 of the model's weights, as train.py records it (a hub id through its local snapshot)."""
    from cli import resolve_model
    from model import weights_sha256
    return weights_sha256(resolve_model(model).folder)


def select(runs: list[dict]) -> dict:
    """The run with the best validation NDCG@10 (its best epoch), then HR@10; ties go to the earlier grid point.
    Only validation numbers enter: the test split is never looked at before every choice is made."""
    return max(runs, key=lambda run: (run["best_valid"]["ndcg@10"], run["best_valid"]["hr@10"]))  # first max


def drop_adapters(runs: list[dict], chosen: dict) -> None:
    """Only the chosen run of a grid keeps its adapter in the results (about 2 MB each for SmolLM2)."""
    for run in runs:
        if run is not chosen:
            shutil.rmtree(run["dir"] / "adapter", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------

def popularity_unit(preset: Preset, results: Path) -> None:
    """Rank the B most frequent targets of the WHOLE training split (ties by item id) for every user, on the test
    split and on the validation windows the training runs are selected on (the floor they must clear there)."""
    import data
    for split, dest in (("test", results / "test" / "popularity"), ("valid", results / "valid" / "popularity")):
        if dest.exists():
            print(f"skip {split}/popularity (done)", flush=True)
            continue
        started = time.time()
        dataset = data.load_dataset(data.DataConfig(dataset=preset.dataset, data_dir=preset.data_dir,
                                                    train_samples=0, seed=preset.seed))
        counts = Counter(example.target for example in dataset.train)
        top = sorted(counts, key=lambda item: (-counts[item], item))[:preset.beam_width]
        windows = test_windows(dataset, preset) if split == "test" else \
            dataset.valid[:preset.valid_limit] if preset.valid_limit else dataset.valid
        records = [{"i": i, "user_id": e.user_id, "target": e.target,
                    "beam_rank": top.index(e.target) if e.target in top else None} for i, e in enumerate(windows)]
        commit_unit(dest, records, {"arm": "popularity", "top": top, "train_windows": len(dataset.train),
                                    "wall_s": time.time() - started})


def train_unit(preset: Preset, results: Path, work: Path, name: str, **flags) -> dict:
    """Train one configuration with train.py (torchrun when preset.nproc > 1), resuming a killed run; keep its
    config, log, manifest and best-validation adapter. Returns {name, config, best_valid, dir}."""
    dest = results / "runs" / name
    if not dest.exists():
        out = work / "runs" / name
        resuming = (out / "train_config.json").exists()
        argv = ["train.py", *train_argv(preset, out, **flags)] + (["--resume"] if resuming else [])
        launcher = [sys.executable] if preset.nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(preset.nproc)]
        print(f"unit runs/{name}: {'resuming' if resuming else 'training'} ({' '.join(map(str, argv[1:]))})",
              flush=True)
        started = time.time()
        code = subprocess.run(launcher + [str(a) for a in argv], cwd=REPO).returncode
        wall = add_wall_seconds(out / "study_wall.json", time.time() - started)
        if code != 0:
            raise StudyError(f"unit runs/{name}: train.py exited with {code} (its output is above)")
        manifest = json.loads((out / "checkpoint.json").read_text())
        tmp = Path(str(dest) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "adapter").mkdir(parents=True)
        for file in ("train_config.json", "log.jsonl", "checkpoint.json"):
            shutil.copy(out / file, tmp / file)
        for file in ("adapter_config.json", "adapter_model.safetensors", "train_config.json"):
            shutil.copy(out / manifest["best"] / file, tmp / "adapter" / file)
        write_json(tmp / "unit.json", {"wall_s": wall, "code": code_version()})
        os.replace(tmp, dest)
    else:
        print(f"skip runs/{name} (done)", flush=True)
    return read_run(dest)


def train_argv(preset: Preset, out: Path, **flags) -> list[str]:
    """train.py's flags for one training unit: the preset's sizes, then the unit's own flags."""
    argv = ["--dataset", preset.dataset, "--model", preset.model, "--data-dir", preset.data_dir, "--out", out,
            "--train-samples", preset.train_samples, "--epochs", preset.epochs, "--global-batch",
            preset.global_batch, "--micro-batch", preset.micro_batch, "--warmup-steps", preset.warmup_steps,
            "--valid-limit", preset.valid_limit, "--eval-batch", preset.eval_batch, "--beam-width",
            preset.beam_width, "--dtype", preset.dtype, "--seed", preset.seed, "--save-every", preset.save_every]
    for flag, value in flags.items():
        argv += ["--" + flag.replace("_", "-"), value]
    return [str(a) for a in argv]


def evaluate_unit(preset: Preset, results: Path, work: Path, arm: str, run: dict | None, **settings) -> None:
    """Evaluate one model (the untuned base when run is None) on the test split, example by example; `settings`
    (beam.BeamConfig's mask_before_softmax, length_penalty) replace our protocol's and are recorded."""
    dest = results / "test" / arm
    if dest.exists():
        return print(f"skip test/{arm} (done)", flush=True)
    import torch
    import beam
    import data
    from cli import Progress, resolve_model
    from lora import load_adapter
    from model import DTYPES, load_model
    from tokenizer import load_tokenizer

    since = time.time()  # the wall time not yet added to wall_file
    # The weights the run recorded, as eval.py --ckpt loads them: a hub id at its commit, or a folder.
    trained = run["config"] if run is not None else {}
    source = resolve_model(trained.get("model", preset.model), revision=trained.get("model_revision"))
    partial, wall_file = work / "test" / f"{arm}.partial.jsonl", work / "test" / f"{arm}.wall.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    records = read_partial(partial)
    tokenizer = load_tokenizer(source.folder)
    dataset = data.load_dataset(data.DataConfig(dataset=preset.dataset, data_dir=preset.data_dir,
                                                train_samples=preset.train_samples, seed=preset.seed))
    trie = data.build_trie(dataset, tokenizer)
    test = test_windows(dataset, preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(source.folder, dtype=DTYPES[preset.dtype], device=device)
    if run is not None:
        load_adapter(model, run["dir"] / "adapter")
    model.eval()
    config = beam.BeamConfig(beam_width=preset.beam_width, batch_size=preset.eval_batch, **settings)
    progress = Progress(f"unit test/{arm}", len(test))
    print(f"unit test/{arm}: {len(test)} test windows ({len(records)} done before)", flush=True)
    with open(partial, "a") as f:
        for first in range(len(records), len(test), preset.chunk):
            chunk = test[first:first + preset.chunk]
            f.writelines(json.dumps(r) + "\n" for r in
                         evaluate_chunk(model, dataset, tokenizer, trie, chunk, first, config,
                                        lambda done: progress(first + done)))
            f.flush()
            add_wall_seconds(wall_file, time.time() - since)  # a killed unit keeps the time of its chunks
            since = time.time()
    records = read_partial(partial)
    commit_unit(dest, records, {"arm": arm, "run": run["name"] if run else None,
                                "wall_s": add_wall_seconds(wall_file, time.time() - since),
                                "code": code_version(), "settings": settings, "test_split": len(dataset.test)})
    partial.unlink()
    wall_file.unlink()


def evaluate_chunk(model, dataset, tokenizer, trie, chunk, first, config, progress) -> list[dict]:
    """Per test example: the beam's rank of the target, the returned items, the target's teacher-forced token
    ranks and total log-prob, and its rank in the EXACT top-K by total probability (None if not in it).

    The exact top-K search runs only where it can matter: if B returned items (real items, their total log-prob
    the beam's score x gen_len ** length_penalty) already beat the target's total log-prob, the target is not
    in the exact top-B, with no search. With the mask after the softmax (SFT as its authors search it) it does
    not run at all, and the records carry no exact rank (PR@K n/a): every token then costs a forward (p < 1
    even where the trie has one child) and the k-th item's total log-prob is far down, so the first 64 Office
    windows had not finished after 11 min, against about 1 min for the whole chunk with the mask before."""
    import beam
    import data
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in chunk]
    targets = [e.target for e in chunk]
    results, forced = beam.search_and_teacher_force(model, prompts, targets, trie, tokenizer.eos_id,
                                                    tokenizer.pad_id, config, progress)
    top = max(CUTOFFS)
    log_prob = [sum(f[2]) for f in forced]
    def total(items, score):  # gen_len = the item's tokens, EOS included
        return score * len(trie.item_tokens[min(items)]) ** config.length_penalty

    searched = config.mask_before_softmax  # with the mask after: no exact search, no exact fields
    need = [i for i, (target, returned) in enumerate(zip(targets, results)) if searched and
            sum(target not in items and total(items, score) > log_prob[i] for items, score in returned) < top]
    exact = dict(zip(need, beam.exact_topk(model, [prompts[i] for i in need], trie, top, tokenizer.eos_id,
                                           tokenizer.pad_id, config))) if need else {}
    return [{"i": first + i, "user_id": e.user_id, "target": e.target,
             "beam_rank": beam.rank_of(e.target, results[i]),
             "beam": [[sorted(items), round(score, 5)] for items, score in results[i]],
             "target_log_prob": round(log_prob[i], 5),
             **({"exact_searched": i in exact,
                 "exact_rank": beam.rank_of(e.target, exact[i][:top]) if i in exact else None} if searched else {}),
             "token_ranks": forced[i][0], "token_valid": forced[i][1]}
            for i, e in enumerate(chunk)]


# ---------------------------------------------------------------------------------------------------------
# Metrics, bootstrap and the report: from the results folder alone
# ---------------------------------------------------------------------------------------------------------

ARMS = ("popularity", "base", "sft", "msl", "bear", "obj31", "bear-authors-norm", "bear-violators")
ARM_LABELS = {"popularity": "popularity", "base": "base model (untuned)", "sft": "SFT", "msl": "MSL",
              "bear": "BEAR", "obj31": "Obj 3.1", "bear-authors-norm": "BEAR, authors' normalisation",
              "bear-violators": "BEAR, violators surrogate (our ablation)",
              "msl-lp1": "MSL, length penalty 1.0 (authors' evaluation)",
              "bear-lp1": "BEAR, length penalty 1.0 (authors' evaluation)",
              "sft-mask-after": "SFT, mask after the softmax (authors' evaluation)",
              "sdpo": "S-DPO (from SFT)", "sdpo-bear": "S-DPO + BEAR (from SFT)",
              "sdpo-mask-after": "S-DPO, mask after the softmax", "sdpo-bear-mask-after":
                  "S-DPO + BEAR, mask after the softmax"}
PAIRS = (("bear", "msl"), ("bear", "sft"), ("obj31", "bear"), ("bear-authors-norm", "bear"),
         ("bear-violators", "bear"), ("sdpo-bear", "sdpo"),
         ("bear-lp1", "msl-lp1"), ("bear-lp1", "sft-mask-after"),  # each searched as its authors search it
         ("sdpo-bear-mask-after", "sdpo-mask-after"), ("sdpo-mask-after", "sft-mask-after"))
CI_METRICS = ("ndcg@10", "hr@10", "pr@10", "nc_rate")


def per_example(records: list[dict], beam_width: int) -> dict[str, np.ndarray]:
    """Per-example columns whose sums (or ratios of sums) are the metrics; what the bootstrap resamples."""
    rank = np.array([np.inf if r["beam_rank"] is None else r["beam_rank"] for r in records], dtype=float)
    columns = {}
    for k in CUTOFFS:
        columns[f"hr@{k}"] = (rank < k).astype(float)
        columns[f"ndcg@{k}"] = np.where(rank < k, 1.0 / np.log2(np.minimum(rank, k) + 2), 0.0)
    if records and "token_ranks" in records[0]:
        violated = np.array([max(r["token_ranks"]) >= beam_width for r in records], dtype=float)
        columns["nc_rate"] = 1.0 - violated
    if records and "exact_rank" in records[0]:
        exact = np.array([np.inf if r["exact_rank"] is None else r["exact_rank"] for r in records], dtype=float)
        for k in CUTOFFS:
            columns[f"eligible@{k}"] = (exact < k).astype(float)
            columns[f"pruned@{k}"] = ((exact < k) & ~(rank < math.inf)).astype(float)
        columns["pruned_violated@10"] = columns["pruned@10"] * violated
    return columns


def metrics_from(columns: dict[str, np.ndarray], weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The metrics from the per-example columns; `weights` (R, n) resample counts give R values per metric."""
    n = len(next(iter(columns.values())))
    weights = np.ones((1, n)) if weights is None else weights
    sums = {name: weights @ column for name, column in columns.items()}
    out = {name: sums[name] / n for name in columns if "@" not in name or name.split("@")[0] in ("hr", "ndcg")}
    if "nc_rate" in columns:
        out["nc_rate"] = sums["nc_rate"] / n
    if "eligible@10" in columns:
        for k in CUTOFFS:
            out[f"pr@{k}"] = sums[f"pruned@{k}"] / np.maximum(sums[f"eligible@{k}"], 1)
        out["violation_share"] = sums["pruned_violated@10"] / np.maximum(sums["pruned@10"], 1)
    return out


COUNT_LABELS = {"hits": "hits@10", "eligible": "in the exact top-10", "pruned": "of those pruned",
                "pruned_violating": "pruned and violating", "violating": "violating the necessary condition",
                "violating_eligible": "violating and in the exact top-10"}


def counts(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """The test windows behind the ratios (Fig. 4/6's numerators and denominators), keyed as COUNT_LABELS; None
    for the exact top-10's where no exact search ran (the mask after the softmax)."""
    violating = 1.0 - columns["nc_rate"]
    exact = "eligible@10" in columns
    return {"hits": columns["hr@10"].sum(), "eligible": columns["eligible@10"].sum() if exact else None,
            "pruned": columns["pruned@10"].sum() if exact else None,
            "pruned_violating": columns["pruned_violated@10"].sum() if exact else None,
            "violating": violating.sum(),
            "violating_eligible": (violating * columns["eligible@10"]).sum() if exact else None}


def report(results: Path) -> str:
    preset = json.loads((results / "preset.json").read_text())
    width = preset["beam_width"]
    tested = [arm for arm in ARMS if (results / "test" / arm).exists()] + sorted(
        path.name for path in (results / "test").glob("*") if path.is_dir() and path.name not in ARMS) \
        if (results / "test").exists() else []
    arms = {arm: read_records(results / "test" / arm) for arm in tested}
    columns = {arm: per_example(records, width) for arm, records in arms.items()}
    point = {arm: {name: float(value[0]) for name, value in metrics_from(cols).items()}
             for arm, cols in columns.items()}
    runs = {path.name: read_run(path) for path in sorted((results / "runs").glob("*")) if path.is_dir()} \
        if (results / "runs").exists() else {}
    selection = json.loads((results / "selection.json").read_text()) if (results / "selection.json").exists() \
        else {}
    units = {arm: json.loads((results / "test" / arm / "unit.json").read_text()) for arm in arms}
    arm_run = {arm: unit.get("run") for arm, unit in units.items()}
    # BEAR's chosen point under the sweep's arm name (its test on the current weights where it was retrained).
    chosen_arm = f"bear-tw{selection.get('topk_weight', 0):g}-xi{selection.get('xi', 0):g}"

    rng = np.random.default_rng(preset["seed"])
    n = len(next(iter(arms.values()))) if arms else 0
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=preset["bootstrap"]) if n else None
    split = max((unit.get("test_split", n) for unit in units.values()), default=n)
    sampled = f" (a seeded sample of the split's {split})" if split > n else ""
    lines = [f"Preset: {preset['dataset']}, model `{Path(preset['model']).name}`, {preset['train_samples']} "
             f"training windows x {preset['epochs']} epochs, global batch {preset['global_batch']}, "
             f"{preset['warmup_steps']} warm-up steps, validation on the first {preset['valid_limit'] or 'all'} "
             f"validation windows, test on {n} test windows{sampled}, B = {width}, {preset['dtype']}, "
             f"seed {preset['seed']}, "
             f"{preset['bootstrap']} paired bootstrap resamples.", ""]

    lines += ["**Selection on validation** (NDCG@10 / HR@10 of each epoch's checkpoint; * = chosen):", "",
              "| run | loss | lr | lambda' | xi | epoch 1 | epoch 2+ | s/step |", "|---|---|---|---|---|---|---|---|"]
    if (results / "valid" / "popularity").exists():
        valid_popularity = metrics_from(per_example(read_records(results / "valid" / "popularity"), width))
        lines.append(f"| popularity (floor) | - | - | - | - | {float(valid_popularity['ndcg@10'][0]):.4f} / "
                     f"{float(valid_popularity['hr@10'][0]):.4f} | | - |")
    for name, run in runs.items():
        config, epochs = run["config"], run["valid"]
        cells = [f"{e['ndcg@10']:.4f} / {e['hr@10']:.4f}" for e in epochs]
        chosen = "*" if name in (selection.get("msl"), selection.get("bear")) else ""
        regularised = config["loss"] in ("bear", "obj31", "sdpo-bear")
        tw, xi = (f"{config['lam'] / config['xi']:g}", f"{config['xi']:g}") if regularised else ("-", "-")
        lines.append(f"| {name}{chosen} | {config['loss']} | {config['lr']:g} | {tw} | {xi} | "
                     f"{cells[0] if cells else ''} | {', '.join(cells[1:])} | {run['seconds_per_step']:.1f} |")

    names = ["ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10", "violation_share", "nc_rate"]
    lines += ["", "**Test** (our protocol: mask before the softmax, length penalty 0; PR@K = share of the "
                  "targets in the exact top-K by total probability that the beam search pruned; violation share = "
                  "pruned top-10 targets with some token below the top-B at its step; NC rate = share of ALL "
                  "test targets meeting the necessary condition at every token):", "",
              "| arm | run | " + " | ".join(names) + " | eligible@10 | s/step |",
              "|---|---|" + "---|" * (len(names) + 2)]
    for arm in arms:
        m = point[arm]
        run = runs.get(arm_run[arm])
        cells = [f"{m[name]:.4f}" if name in m else "n/a" for name in names]
        eligible = int(columns[arm]["eligible@10"].sum()) if "eligible@10" in columns[arm] else "n/a"
        label = ARM_LABELS.get(arm, arm)
        lines.append(f"| {label} | {arm_run[arm] or '-'} | " + " | ".join(cells) +
                     f" | {eligible} | {run['seconds_per_step']:.1f} |" if run else
                     f"| {label} | - | " + " | ".join(cells) + f" | {eligible} | - |")

    pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    # S-DPO's arms against the SFT they start from (retrained on the current weights where the first predates them).
    sft_arm = next((arm for arm in arms if arm.startswith("sft-w")), "sft")
    pairs += [(a, sft_arm) for a in ("sdpo", "sdpo-bear") if a in arms and sft_arm in arms]
    # ... and so is BEAR's chosen point (the pair bear-lp1 - sft-mask-after mirrors under the authors' settings).
    pairs += [(chosen_arm, sft_arm)] if sft_arm != "sft" and {chosen_arm, sft_arm} <= set(arms) else []
    # An arm under other search settings (the authors' evaluation) against the same run's test under ours.
    pairs += [(a, b) for a in arms if units[a].get("settings") for b in arms
              if arm_run[b] == arm_run[a] is not None and not units[b].get("settings")]
    counted = [arm for arm in arms if "nc_rate" in columns[arm]]
    if counted:  # the counts behind the ratios above, which the README's reading of the claims quotes
        lines += ["", "**Counts** (test windows): " + " / ".join(COUNT_LABELS.values()) + ":", ""]
        for arm in counted:
            lines.append(f"- {ARM_LABELS.get(arm, arm)}: " + " / ".join("n/a" if v is None else f"{v:.0f}"
                                                                       for v in counts(columns[arm]).values()))
        for a, b in pairs:  # every arm of PAIRS is a model arm, so both have the necessary-condition columns
            meets_a, meets_b = columns[a]["nc_rate"], columns[b]["nc_rate"]
            gained, lost = meets_a * (1.0 - meets_b), meets_b * (1.0 - meets_a)
            lines.append(f"- {a} against {b}: {gained.sum():.0f} targets meet the necessary condition only under "
                         f"{a} ({(gained * columns[a]['hr@10']).sum():.0f} of them hits@10 under {a}), "
                         f"{lost.sum():.0f} only under {b}")
    if pairs:
        lines += ["", "**Paired bootstrap 95% CIs** of the difference (first arm minus second):", "",
                  "| difference | " + " | ".join(CI_METRICS) + " |", "|---|" + "---|" * len(CI_METRICS)]
        for a, b in pairs:
            diff_a, diff_b = metrics_from(columns[a], weights), metrics_from(columns[b], weights)
            cells = []
            for name in CI_METRICS:
                if name not in point[a] or name not in point[b]:  # PR@K where no exact search ran
                    cells.append("n/a")
                    continue
                delta = point[a][name] - point[b][name]
                low, high = np.percentile(diff_a[name] - diff_b[name], [2.5, 97.5])
                cells.append(f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")

    def difference(a: str, b: str, name: str) -> str:
        low, high = np.percentile(metrics_from(columns[a], weights)[name] - metrics_from(columns[b], weights)[name],
                                  [2.5, 97.5])
        return f"{point[a][name] - point[b][name]:+.4f} [{low:+.4f}, {high:+.4f}]"

    sweep = sweep_arms(arms, selection)
    # The sweep's MSL: the one retrained on the sweep's weights where the study's own MSL predates them.
    baseline = next((arm for arm in arms if arm.startswith("msl-w")), "msl")
    if sweep and baseline in arms:
        lines += ["", "**Sensitivity to lambda' and xi** (RQ5, Fig. 8; one factor at a time around the chosen "
                      "point; the difference to MSL with its paired bootstrap 95% CI):", "",
                  "| lambda' | xi | arm | NDCG@10 | HR@10 | NC rate | NDCG@10 − MSL | HR@10 − MSL | NC rate − MSL |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (tw, xi), arm in sorted(sweep.items()):
            m = point[arm]
            lines.append(f"| {tw:g} | {xi:g} | {arm} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} | "
                         f"{m['nc_rate']:.4f} | " + " | ".join(difference(arm, baseline, name)
                                                             for name in ("ndcg@10", "hr@10", "nc_rate")) + " |")
        m = point[baseline]
        lines.append(f"| 0 (MSL) | - | {baseline} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} | {m['nc_rate']:.4f} | | | |")
        # A difference is paired only where both runs trained on the same weights (train_config.json's
        # weights_sha256; None for runs from before it was recorded).
        trained_on = {arm: runs[arm_run[arm]]["config"].get("weights_sha256") if arm_run[arm] in runs
                      else None for arm in [*sweep.values(), baseline]}
        other = [arm for arm in sweep.values() if trained_on[arm] != trained_on[baseline]]
        if other:
            lines += ["", f"Not comparable with MSL: {', '.join(other)} trained on other weights than MSL "
                          f"(weights_sha256 {trained_on[other[0]] or 'unrecorded'} against "
                          f"{trained_on[baseline] or 'unrecorded'}): the differences above mix the two builds."]
        sweep_figure(results, sweep, selection, point, columns, weights, baseline)
    scaled = sorted({arm.split("-n")[1] for arm in arms if arm.startswith(("msl-n", "bear-n"))}, key=int)
    # At the preset's size, MSL and the chosen BEAR trained on the weights the scale point trains on.
    bear_base = chosen_arm if baseline != "msl" and chosen_arm in arms else "bear"
    if scaled and {baseline, bear_base} <= set(arms):
        lines += ["", "**Scale** (the same protocol on more training windows; paired bootstrap 95% CIs):", "",
                  "| training windows | difference | " + " | ".join(CI_METRICS) + " | eligible@10 |",
                  "|---|---|" + "---|" * (len(CI_METRICS) + 1)]
        rows = [(preset["train_samples"], bear_base, baseline)]
        for n in scaled:
            rows += [(n, f"bear-n{n}", f"msl-n{n}"), (n, f"msl-n{n}", baseline)]
        for n, a, b in rows:
            if a in arms and b in arms:
                eligible = f"{columns[a]['eligible@10'].sum():.0f} / {columns[b]['eligible@10'].sum():.0f}"
                lines.append(f"| {n} | {a} − {b} | " + " | ".join(difference(a, b, name) for name in CI_METRICS)
                             + f" | {eligible} |")

    # Per training run: an arm that re-searches a run under other settings (the authors' evaluation) adds no cost.
    costs = {arm: runs[arm_run[arm]]["seconds_per_step"] for arm in arms
             if arm_run[arm] in runs and not units[arm].get("settings")}
    if "sft" in costs:
        lines += ["", "Training cost per step relative to SFT (median seconds per optimizer step, same machine): " +
                  ", ".join(f"{arm}/sft {costs[arm] / costs['sft']:.2f}x" for arm in costs if arm != "sft") + "."]
    wall = sum(r["wall_s"] for r in runs.values()) + sum(unit["wall_s"] for unit in units.values())
    lines += ["", f"Wall time of the units done so far: {wall / 3600:.2f} h "
                  f"({len(runs)} training runs, {len(arms)} test evaluations)."]
    figure(results, {arm: point[arm] for arm in arms if arm in ARMS}, columns, weights)
    text = "\n".join(lines) + "\n"
    (results / "report.md").write_text(text)
    return text


def pyplot():
    """matplotlib's pyplot off-screen, or None with a note: the figures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("note: matplotlib is not installed, no figure (pip install matplotlib)", flush=True)
    return plt


def bootstrap_bars(arms: list[str], name: str, point: dict, columns: dict, weights):
    """Each arm's value of metric `name` and its bootstrap 95% interval as error-bar lengths (2, n)."""
    values = [point[arm][name] for arm in arms]
    spread = [np.percentile(metrics_from(columns[arm], weights)[name], [2.5, 97.5]) for arm in arms]
    errors = [[v - lo for v, (lo, _) in zip(values, spread)], [hi - v for v, (_, hi) in zip(values, spread)]]
    return values, np.clip(errors, 0, None)


def figure(results: Path, point: dict, columns: dict, weights) -> None:
    """PR@10, the necessary-condition rate and NDCG@10 per arm with bootstrap 95% bars (in the spirit of Fig. 6)."""
    plt = pyplot()
    if plt is None:
        return
    panels = (("pr@10", "PR@10 (lower is better)"), ("nc_rate", "necessary-condition rate"),
              ("ndcg@10", "NDCG@10"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (name, title) in zip(axes, panels):
        arms = [arm for arm in point if name in point[arm]]
        values, errors = bootstrap_bars(arms, name, point, columns, weights)
        ax.bar(range(len(arms)), values, yerr=errors, capsize=3,
               color=["#d62728" if "bear" in arm else "#1f77b4" if arm in ("sft", "msl", "obj31") else "#7f7f7f"
                      for arm in arms])
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(results / "figure.png", dpi=120)
    plt.close(fig)


def sweep_arms(arms: dict, selection: dict) -> dict[tuple[float, float], str]:
    """(lambda', xi) -> test arm of every BEAR point of the sensitivity sweep, the chosen BEAR included."""
    points = {}
    for arm in arms:
        if arm.startswith("bear-tw"):
            tw, xi = arm.removeprefix("bear-tw").split("-xi")
            points[(float(tw), float(xi))] = arm
    chosen = selection and (float(selection["topk_weight"]), float(selection["xi"]))
    if points and "bear" in arms and chosen and chosen not in points:  # not retrained on the sweep's weights
        points[chosen] = "bear"
    return points


def sweep_figure(results: Path, sweep: dict, selection: dict, point: dict, columns: dict, weights,
                 baseline: str) -> None:
    """Fig. 8's layout: NDCG@10 and the necessary-condition rate against lambda' (at the chosen xi) and against
    xi (at the chosen lambda'), bootstrap 95% bars, MSL (lambda = 0) as a dashed line."""
    plt = pyplot()
    if plt is None:
        return
    tw0, xi0 = float(selection["topk_weight"]), float(selection["xi"])
    metrics = (("ndcg@10", "NDCG@10"), ("nc_rate", "necessary-condition rate"))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(8.4, 6.4), squeeze=False)
    for row, (name, title) in enumerate(metrics):
        for col, fixed in enumerate((lambda tw, xi: xi == xi0, lambda tw, xi: tw == tw0)):
            keys = sorted(key for key in sweep if fixed(*key))
            xs = [key[col] for key in keys]
            values, errors = bootstrap_bars([sweep[key] for key in keys], name, point, columns, weights)
            ax = axes[row][col]
            ax.errorbar(xs, values, yerr=errors, marker="o", capsize=3, color="#d62728", label="BEAR")
            ax.axhline(point[baseline][name], linestyle="--", color="#1f77b4", label="MSL (lambda = 0)")
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:g}" for x in xs], minor=False)
            ax.minorticks_off()
            ax.set_xlabel(f"lambda' (xi = {xi0:g})" if col == 0 else f"xi (lambda' = {tw0:g})")
            ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "figure-sensitivity.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

def test_windows(dataset, preset: Preset) -> list:
    """The test split, or where it has more than preset.test_limit windows a seeded sample of that many (in the
    split's order): the same windows for every arm, and for every test unit of a resumed study."""
    if not preset.test_limit or preset.test_limit >= len(dataset.test):
        return dataset.test
    keep = np.random.default_rng(preset.seed).choice(len(dataset.test), preset.test_limit, replace=False)
    return [dataset.test[i] for i in sorted(keep)]


def read_run(path: Path) -> dict:
    """A finished training unit: its config, per-epoch validation metrics and median seconds per step."""
    log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    manifest = json.loads((path / "checkpoint.json").read_text())
    valid = [record["valid"] for record in log if "valid" in record]
    best = next(record["valid"] for record in log if "valid" in record and record["step"] ==
                int(manifest["best"].split("-")[1]))
    step_seconds = [record["label_tokens"] / record["tokens_per_s"] for record in log if "loss" in record]
    return {"name": path.name, "dir": path, "config": json.loads((path / "train_config.json").read_text()),
            "valid": valid, "best_valid": best, "seconds_per_step": float(np.median(step_seconds)),
            "wall_s": json.loads((path / "unit.json").read_text())["wall_s"]}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "examples.jsonl").read_text().splitlines()]


def read_partial(path: Path) -> list[dict]:
    """The complete lines of a partial examples file (a kill may leave half a line: it is cut off)."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]
    if complete != text:
        path.write_text(complete)
    return [json.loads(line) for line in complete.splitlines()]


def commit_unit(dest: Path, records: list[dict], unit: dict) -> None:
    tmp = Path(str(dest) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json(tmp / "unit.json", unit)
    os.replace(tmp, dest)
    print(f"unit {dest.parent.name}/{dest.name} done ({unit['wall_s']:.0f} s)", flush=True)


def add_wall_seconds(path: Path, seconds: float) -> float:
    """Wall time of a unit summed over its (possibly interrupted) invocations, kept in the JSON file `path`."""
    total = (json.loads(path.read_text())["wall_s"] if path.exists() else 0.0) + seconds
    if path.parent.exists():
        write_json(path, {"wall_s": total})
    return total


def code_version() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The BEAR reproduction study (resumable).")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--results", default="", help="results folder (default results/<preset>-<dataset>)")
    parser.add_argument("--work", default="", help="checkpoints and partial files "
                                                   "(default out-study/<preset>-<dataset>)")
    parser.add_argument("--dataset", default="", help="office | book | toy | clothing, or a dataset folder "
                                                      "(default: the preset's, office)")
    parser.add_argument("--data-dir", default="", help="data root (default $BEAR_DATA, else ./data)")
    parser.add_argument("--model", default="", help="a folder or hub id (default: the preset's)")
    parser.add_argument("--report", action="store_true", help="only recompute the report from --results")
    args = parser.parse_args(argv)
    import amazon
    import cli
    import data
    preset = PRESETS[args.preset]
    dataset = args.dataset or preset.dataset
    folder = Path(dataset).expanduser()
    if dataset.lower() in data.DATASETS:
        dataset = name = dataset.lower()
    else:  # a folder of your own, named by its folder (data.locate_dataset refuses anything else)
        dataset, name = str(folder.resolve()) if folder.is_dir() else dataset, folder.resolve().name
    preset = dataclasses.replace(preset, dataset=dataset, model=args.model or preset.model,
                                 data_dir=str(data.resolve_data_root(args.data_dir or None).resolve()))
    results = Path(args.results or REPO / "results" / f"{args.preset}-{name}")
    work = Path(args.work or REPO / "out-study" / f"{args.preset}-{name}")
    try:  # the data first (a paper dataset missing from the root is downloaded): one error line
        if not args.report:
            amazon.fetch_if_missing(preset.dataset, preset.data_dir, cli.Distributed())
            data.locate_dataset(preset.dataset, preset.data_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        if not args.report:
            run_study(preset, results, work)
        print(report(results), flush=True)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

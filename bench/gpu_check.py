"""The GPU path, checked in one command: CUDA against the CPU, the users' commands on the card, and speed.

On a CUDA machine (the budget is 8 minutes, model creation included; sized for about 3 on an H100, but no GPU has
run it yet):
  1. Correctness, CUDA vs CPU, on a tiny random Llama (GQA 4:2, llama3 rope scaling, tied embeddings, Llama-3's
     vocabulary) that this script writes to disk without transformers:
       - fp32 logits of 4 real Office prompts, left-padded, at their last 8 positions;
       - beam.beam_search (B = 10, fp32) over the real Office item trie (Llama-3 tokens): the same ranked lists
         for 32 test prompts;
       - train.py's training loop (train.train) for 3 optimizer steps on each device, fp32 with Obj 3.1 (its
         simulated beam search runs inside the step) and bf16 with BEAR: the same per-step losses.
  2. The users' commands, through their command lines: `torchrun --nproc_per_node 1 train.py` (a reference run,
     and a run SIGKILLed when step 6 starts, then `--resume`d: the same losses and adapter as the reference), then
     `eval.py --ckpt RUN --pruning --limit 8`; and the collectives train.py / eval.py issue under several
     processes, in a one-process NCCL group (one GPU cannot hold two NCCL ranks, and with one process train.py
     opens no group at all).
  3. Speed on the card, random weights made on the device at Llama-3.2-1B's shape in bf16: our LoRA training
     step against transformers + peft on the same Office batch (tokens/s; the step's FLOP/s as a fraction of the
     bare bf16 matmul rate measured in the same run); our constrained beam search against transformers'
     constrained `generate` (users/s, B = 10, real Office prompts and trie); host-device synchronisations per
     decoding step (torch.cuda's sync debug mode); peak GPU memory of each. Without transformers or peft, their
     side is skipped with a note.
  4. One table at the end, and OUT/gpu_check.json (rewritten after every check: a cut-off run keeps what it had).

Without CUDA (or with --device cpu) the same code runs in a tiny mode in under a minute: the CPU where CUDA would
be, gloo instead of NCCL, tiny shapes instead of 1B. tests/test_gpu_check.py runs that mode.

THE COMMAND on a GPU machine with ../shared beside the repo:

    python bench/gpu_check.py --out gpu-check/

Through the device tool, which copies only the git working tree (tracked and untracked-not-ignored files, at most
64 MiB) and not ../shared: first, here, copy the 10 MiB the check reads into ./data (.gitignore ignores it),

    python bench/gpu_check.py --pack data
        data/Office/: id2name4Rec.json 211 KiB, train.csv 1157 KiB, valid.csv 141 KiB, test.csv 144 KiB
        data/llama3/: tokenizer.json 8.7 MiB

then run, with carry ["data/Office", "data/llama3"]:

    python bench/gpu_check.py --out $OUT --data-dir data --tokenizer data/llama3

Exit status: 0 when every check passes, 1 when one fails, 2 for a bad input (one `error:` line). Each check
records what it compares, its tolerance and what it measured; part 3's numbers are measurements, not checks.
"""
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # bench_beam's transformers contender uses tests/test_beam.py's processor

import beam  # noqa: E402  (the stages are flat files at the repo root)
import data  # noqa: E402
import lora  # noqa: E402
import model as llama  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
import train  # noqa: E402
from bench_beam import transformers_constrained_search  # noqa: E402  (bench/ is on sys.path as the script's folder)
from bench_model import BenchConfig, interleaved_medians, office_batch, training_step_flops  # noqa: E402
from cli import Distributed, build_parser, cli_main  # noqa: E402


@dataclass
class CheckConfig:
    out: str = field(default="", metadata={"help": "folder for gpu_check.json (required)"})
    data_dir: str = field(default=str(SHARED / "data" / "amazon"), metadata={"help": "data root holding Office/"})
    tokenizer: str = field(default=str(SHARED / "tokenizers" / "llama3"),
                           metadata={"help": "the Llama-3 tokenizer folder (its tokenizer.json)"})
    device: str = field(default="auto", metadata={"help": "auto: CUDA when there, else the CPU (the tiny mode)",
                                                   "choices": ("auto", "cuda", "cpu")})
    tiny: bool = field(default=False, metadata={"help": "the tiny sizes on CUDA too (a quick smoke run)"})
    keep: bool = field(default=False, metadata={"help": "keep the work folder (models, runs, logs)"})
    pack: str = field(default="", metadata={"help": "only copy the files the check reads (from --data-dir and "
                                                    "--tokenizer) into this folder, then exit"})


# ---------------------------------------------------------------------------------------------------------
# Shapes, sizes and tolerances
# ---------------------------------------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Llama-3.2-1B's config.json (the fields model.py and transformers read); vocab_size is set from the tokenizer.
LLAMA32_1B = dict(model_type="llama", hidden_act="silu", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072,
                  tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
# Part 1's model: GQA 4:2, head_dim 8 (so its 4 frequencies span all three bands of llama3 scaling), tied.
TINY_LLAMA = {**LLAMA32_1B, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
TINY_SPEED = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}


@dataclass(frozen=True)
class Sizes:
    beam_prompts: int      # part 1: Office test prompts searched on both devices
    eval_windows: int      # part 2: eval.py --limit
    speed_shape: dict      # part 3: the model's config.json fields
    train_windows: int     # part 3: Office windows in the timed training step (train.py's largest auto micro-batch: 8)
    search_users: int      # part 3: Office test users in each timed beam search
    search_batch: int      # part 3: users per pass, both implementations (eval.py's default: 16)
    sync_users: int        # part 3: users of the search whose synchronisations are counted
    repeats: int           # part 3: timed repeats per contender (the median is kept)
    matmul_n: int          # part 3: n of the bare bf16 (n, n) @ (n, n)


FULL = Sizes(beam_prompts=32, eval_windows=8, speed_shape=LLAMA32_1B, train_windows=8, search_users=32,
             search_batch=16, sync_users=4, repeats=5, matmul_n=8192)
TINY = Sizes(beam_prompts=8, eval_windows=4, speed_shape=TINY_SPEED, train_windows=1, search_users=2,
             search_batch=2, sync_users=1, repeats=1, matmul_n=256)

# fp32 on both devices differs only in summation order (no TF32: PyTorch leaves it off for matmuls by default).
LOGITS_TOL = 1e-4      # max |logit delta| <= LOGITS_TOL * max(1, max |logit|)
SCORE_TOL = 1e-4       # beam scores (summed log-probs of up to ~180 tokens), rank by rank; also what counts as a tie
# Per-step training losses: |delta| <= tol * max(1, |loss|) (BEAR's loss can sit near 0, where a relative bound
# means nothing); bf16 matmul and attention kernels round differently on each device.
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}
RESUME_TOL = 1e-5      # resumed vs uninterrupted (fp32, same device): losses as above, adapter entries absolute
BEAM_WIDTH = 10


# ---------------------------------------------------------------------------------------------------------
# Inputs: the packed files, the tiny model on disk
# ---------------------------------------------------------------------------------------------------------

OFFICE_FILES = ("id2name4Rec.json", "train.csv", "valid.csv", "test.csv")  # what data.load_dataset reads


def tokenizer_files(folder: Path) -> list:
    """The Llama-3 tokenizer's files the check uses: tokenizer.json, and tokenizer_config.json when there."""
    return ["tokenizer.json"] + (["tokenizer_config.json"] if (folder / "tokenizer_config.json").is_file() else [])


def check_inputs(config: CheckConfig) -> None:
    missing = [name for name in OFFICE_FILES if not (Path(config.data_dir) / "Office" / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--data-dir {config.data_dir}: Office/ lacks {', '.join(missing)} (give the data "
                                f"root holding Office/; `--pack DIR` copies what the check needs)")
    if not (Path(config.tokenizer) / tokenizer_files(Path(config.tokenizer))[0]).is_file():
        raise FileNotFoundError(f"--tokenizer {config.tokenizer}: no tokenizer.json there")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")


def pack(config: CheckConfig) -> None:
    """Copy the files the check reads into config.pack (Office's four files, the tokenizer's), for a machine
    without ../shared."""
    source = Path(config.tokenizer)
    copies = [(Path(config.data_dir) / "Office" / name, Path(config.pack) / "Office" / name) for name in OFFICE_FILES]
    copies += [(source / name, Path(config.pack) / "llama3" / name) for name in tokenizer_files(source)]
    total = 0
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not (dst.exists() and dst.samefile(src)):
            shutil.copyfile(src, dst)
        total += dst.stat().st_size
        print(f"  {dst}  {dst.stat().st_size / 1024:.0f} KiB")
    print(f"{total / 2**20:.1f} MiB in {config.pack}/; on the GPU machine (device tool: carry "
          f"[\"{config.pack}/Office\", \"{config.pack}/llama3\"]):\n"
          f"  python bench/gpu_check.py --out $OUT --data-dir {config.pack} --tokenizer {config.pack}/llama3")


def write_tiny_llama(folder: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    """Part 1's model as a Hugging Face folder, written without transformers (a GPU machine may lack it):
    config.json, model.safetensors of seeded random tensors under HF's names (no lm_head: tied), and the
    tokenizer's files, so train.py and eval.py take it as --model. Weights ~N(0, 0.2), not HF's 0.02: at hidden
    size 32 that spreads the logits (std ~1), so beam scores have no near-ties that rounding could swap."""
    folder.mkdir(parents=True)
    config = {**TINY_LLAMA, "vocab_size": vocab_size, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):  # the names and shapes model.py expects, without allocating anything
        expected = llama.LlamaForCausalLM(llama.LlamaConfig.from_dict(config)).state_dict()
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (1 + 0.1 * torch.randn(t.shape, generator=generator)) if name.endswith("norm.weight")
               else 0.2 * torch.randn(t.shape, generator=generator)
               for name, t in expected.items() if name != "lm_head.weight"}
    save_file(tensors, str(folder / "model.safetensors"))
    for name in tokenizer_files(tokenizer_dir):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


# ---------------------------------------------------------------------------------------------------------
# The report: every check's verdict, part 3's numbers; the JSON is rewritten after each check
# ---------------------------------------------------------------------------------------------------------

class Report:
    """The checks' verdicts, part 3's numbers and notes; OUT/gpu_check.json is rewritten after every check."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.start = path, header, time.time()
        self.checks, self.speed, self.notes = {}, {}, []

    def check(self, name: str, compares: str, tolerance: str, run) -> None:
        """Run one check; `run()` returns (passed, measured text, detail dict). An exception fails the check
        (its message is the measurement) and the script goes on to the next."""
        print(f"[{time.time() - self.start:5.0f} s] {name}: {compares}", flush=True)
        started = time.time()
        try:
            passed, measured, detail = run()
        except Exception as err:  # noqa: BLE001  (a crash is a failed check, the other checks still run)
            traceback.print_exc()
            passed, measured, detail = False, f"crashed: {type(err).__name__}: {err}", {}
        self.checks[name] = {"pass": bool(passed), "compares": compares, "tolerance": tolerance,
                             "measured": measured, "detail": detail, "seconds": round(time.time() - started, 1)}
        print(f"        {'PASS' if passed else 'FAIL'}  {measured}", flush=True)
        self.write()

    def write(self) -> None:
        record = {**self.header, "seconds": round(time.time() - self.start, 1), "passed": self.passed(),
                  "checks": self.checks, "speed": self.speed, "notes": self.notes}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def passed(self) -> bool:
        return bool(self.checks) and all(c["pass"] for c in self.checks.values())

    def print_table(self) -> None:
        print(f"\n{self.header['mode']} on {self.header['device']}, torch {self.header['torch']}, "
              f"{time.time() - self.start:.0f} s")
        print(f"{'check':18s} {'result':6s} {'measured':52s} tolerance")
        for name, c in self.checks.items():
            print(f"{name:18s} {'PASS' if c['pass'] else 'FAIL':6s} {c['measured']:52s} {c['tolerance']}")
        if self.speed:
            print(f"\nspeed ({self.speed.get('shape', '')}, {self.header['device']})")
            print(f"{'':44s} {'ours':>10s} {'transformers':>13s}  ours better by")
            for what, (ours, theirs, ratio) in self.speed.get("rows", {}).items():
                print(f"{what:44s} {ours:>10s} {theirs:>13s}  {ratio}")
        for note in self.notes:
            print(f"note: {note}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """fn() whose time includes the device's queued work (CUDA kernels run asynchronously)."""
    return lambda: (fn(), synchronize(device))[0]


# ---------------------------------------------------------------------------------------------------------
# Part 1: correctness, CUDA vs CPU
# ---------------------------------------------------------------------------------------------------------

def check_logits(models: dict, prompts: list, pad_id: int):
    """fp32 logits of 4 real prompts, left-padded (the padded-attention SDPA path with an additive mask) and read
    at the last 8 positions (logits_at); positions reach ~380, where llama3 scaling bends the low frequencies.
    The CPU tensors go to the CUDA model as they are: model.forward moves its inputs, as beam.py relies on."""
    input_ids, attention_mask = data.collate_prompts(prompts[:4], pad_id)          # (4, P)
    read_at = torch.zeros_like(input_ids, dtype=torch.bool)
    read_at[:, -8:] = True                                                          # every prompt is longer
    with torch.no_grad():
        expected = models["cpu"](input_ids, attention_mask=attention_mask, logits_at=read_at)        # (32, V)
        found = models["device"](input_ids, attention_mask=attention_mask, logits_at=read_at).cpu()
    gap, scale = (found - expected).abs().max().item(), expected.abs().max().item()
    return (gap <= LOGITS_TOL * max(1.0, scale), f"|delta| {gap:.1e} (max |logit| {scale:.1f})",
            {"max_abs_diff": gap, "max_abs_logit": scale, "shape": list(expected.shape)})


def same_up_to_ties(a: list, b: list, tol: float) -> bool:
    """Two ranked lists [(items, score)] that differ only where scores tie within `tol`: rank by rank the scores
    agree, and each item of either list is in the other with a score within tol, or is missing there because it
    tied with the other's last entry (cut off at B)."""
    if len(a) != len(b) or any(abs(sa - sb) > tol for (_, sa), (_, sb) in zip(a, b)):
        return False
    for x, y in ((a, b), (b, a)):
        scores = dict(y)
        for items, score in x:
            if abs(scores.get(items, y[-1][1]) - score) > tol:
                return False
    return True


def check_beam_search(models: dict, prompts: list, trie, tokenizer):
    config = beam.BeamConfig(beam_width=BEAM_WIDTH, batch_size=16)
    expected = beam.beam_search(models["cpu"], prompts, trie, tokenizer.eos_id, tokenizer.pad_id, config)
    found = beam.beam_search(models["device"], prompts, trie, tokenizer.eos_id, tokenizer.pad_id, config)
    identical, tied, differing, worst = 0, 0, [], 0.0
    for user, (e, f) in enumerate(zip(expected, found)):
        worst = max([worst] + [abs(se - sf) for (_, se), (_, sf) in zip(e, f)])
        if [items for items, _ in e] == [items for items, _ in f] and len(e) == len(f):
            identical += 1
        elif same_up_to_ties(e, f, SCORE_TOL):
            tied += 1
        else:
            differing.append(user)
    full = len(found) == len(prompts) and all(len(f) == BEAM_WIDTH for f in found)  # Office has 2,414 titles
    passed = full and not differing and worst <= SCORE_TOL
    return (passed, f"{identical}/{len(prompts)} identical, {tied} tie swaps; scores |delta| {worst:.1e}",
            {"identical": identical, "tie_swaps": tied, "differing_users": differing, "max_score_diff": worst,
             "returned": sum(map(len, found))})


def logged_losses(out: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def checkpoint_adapter(out: Path, which: str = "last") -> dict:
    manifest = json.loads((out / "checkpoint.json").read_text())
    return load_file(str(out / manifest[which] / "adapter_model.safetensors"))


def loss_gap(a: list, b: list) -> float:
    """Largest |a - b| / max(1, |b|) over the steps (b the reference)."""
    return max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))


def largest_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_flags(model_dir: Path, data_dir: str, out: Path, **flags) -> list:
    """train.py's flags for a few-second run on the tiny model; keyword arguments override (True = bare flag)."""
    defaults = dict(dataset="office", loss="bear", train_samples=12, epochs=1, global_batch=4, micro_batch=2,
                    lr=1e-3, warmup_steps=0, valid_limit=2, eval_batch=2, save_every=0)
    argv = ["--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out)]
    for name, value in {**defaults, **flags}.items():
        argv += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    return argv


def check_training(work: Path, model_dir: Path, data_dir: str, device: torch.device, dtype: str, loss: str):
    """train.train, the loop of `python train.py`, on the CPU and on the device: 12 Office windows in 3 optimizer
    steps of 4 (micro-batches of 2), then a validation search and a checkpoint. LoRA dropout is off: the two
    devices draw different masks from the same seed."""
    losses, adapters = {}, {}
    for side, where in (("cpu", torch.device("cpu")), ("device", device)):
        out = work / f"train-{dtype}-{loss}-{side}"
        config, given = train.parse_config(train_flags(model_dir, data_dir, out, dtype=dtype, loss=loss,
                                                       lora_dropout=0.0))
        with open(work / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log):
            train.train(config, given, Distributed(device=where))
        losses[side], adapters[side] = [value for _, value in logged_losses(out)], checkpoint_adapter(out)
    gap, adapter_gap = loss_gap(losses["device"], losses["cpu"]), largest_gap(adapters["device"], adapters["cpu"])
    passed = len(losses["cpu"]) == len(losses["device"]) == 3 and gap <= LOSS_TOL[dtype]
    return (passed, f"losses {', '.join(f'{v:.4f}' for v in losses['device'])}, |delta| {gap:.1e}",
            {"losses_cpu": losses["cpu"], "losses_device": losses["device"], "max_loss_diff": gap,
             "adapter_max_abs_diff": adapter_gap})


# ---------------------------------------------------------------------------------------------------------
# Part 2: the users' commands, through their command lines
# ---------------------------------------------------------------------------------------------------------

# Killed when the 6th optimizer step starts (train.reseed_dropout runs first in every step; steps count from 0):
# steps 1-5 are logged, the last checkpoint is step 4 (--save-every 2), as in tests/test_train.py.
KILL_LAUNCHER = '''"""train.py, SIGKILLed when optimizer step {step} (0-based) starts. Written by bench/gpu_check.py."""
import os, signal, sys
sys.path.insert(0, {repo!r})
import cli
import train
original = train.reseed_dropout
def reseed(seed, step, rank):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    original(seed, step, rank)
train.reseed_dropout = reseed
sys.exit(cli.cli_main(train.main))
'''
KILL_STEP = 5


class Command:
    """One of the users' command lines, started in the repo root in the background; its stdout and stderr go to
    a log file in the work folder. `finish()` waits for it: (exit code, its output)."""

    def __init__(self, args: list, log: Path, device: torch.device, torchrun: bool = False):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
            if torchrun else [sys.executable]  # the `torchrun` command runs this module
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if device.type == "cpu":  # --device cpu on a CUDA machine: train.py and eval.py must not find the GPU
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.log, self.args = log, launcher + [str(a) for a in args]
        with open(log, "w") as f:
            self.process = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def finish(self) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code, self.log.read_text()


def check_torchrun_train(command: Command, out: Path):
    code, output = command.finish()
    steps = [s for s, _ in logged_losses(out)] if (out / "log.jsonl").exists() else []
    return code == 0 and steps == [1, 2, 3, 4, 5, 6], f"exit {code}, steps logged {steps}", \
        {"exit": code, "output_tail": output[-1500:]}


def check_kill_and_resume(killed: Command, resume_args: list, out: Path, reference: Path, work: Path,
                          device: torch.device):
    code, output = killed.finish()
    steps_before = [s for s, _ in logged_losses(out)] if (out / "log.jsonl").exists() else []
    last_before = json.loads((out / "checkpoint.json").read_text())["last"] if steps_before else None
    if code == 0 or steps_before != [1, 2, 3, 4, 5] or last_before != "step-00000004":
        return False, f"the kill did not happen as planned: exit {code}, steps {steps_before}, last checkpoint " \
                      f"{last_before}", {"output_tail": output[-1500:]}
    resumed_code, resumed_output = Command(resume_args, work / "resume.log", device, torchrun=True).finish()
    if resumed_code != 0:
        return False, f"--resume exited {resumed_code}", {"output_tail": resumed_output[-1500:]}
    resumed, uninterrupted = logged_losses(out), logged_losses(reference)  # [(step, loss)]
    gap = loss_gap([v for _, v in resumed], [v for _, v in uninterrupted])
    adapter_gap = max(largest_gap(checkpoint_adapter(out, which), checkpoint_adapter(reference, which))
                      for which in ("last", "best"))
    bitwise = resumed == uninterrupted and adapter_gap == 0.0
    same_steps = [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    passed = same_steps and gap <= RESUME_TOL and adapter_gap <= RESUME_TOL
    return (passed, f"torchrun exit {code} at step {KILL_STEP + 1}; resumed: "
                    f"{'bit for bit' if bitwise else f'losses {gap:.0e}, adapter {adapter_gap:.0e}'}",
            {"bitwise": bitwise, "max_loss_diff": gap, "adapter_max_abs_diff": adapter_gap,
             "losses": [v for _, v in resumed], "killed_exit": code, "killed_output_tail": output[-600:]})


def newest_metrics(run: Path) -> dict:
    """eval.py's metrics file: metrics.json, or metrics-<split>-limit<N>.json for a --limit run."""
    return json.loads(max(run.glob("metrics*.json"), key=lambda p: p.stat().st_mtime_ns).read_text())


def check_eval(run: Path, limit: int, work: Path, device: torch.device):
    """eval.py on the resumed run's best checkpoint: the beam search, and with --pruning the exact top-K search
    and the teacher-forced violation test, on the device."""
    code, output = Command(["eval.py", "--ckpt", run, "--pruning", "--limit", limit], work / "eval.log",
                           device).finish()
    if code != 0:
        return False, f"exit {code}", {"output_tail": output[-1500:]}
    metrics = newest_metrics(run)
    keys = ["ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10", "violation_rate"]
    ok = all(0.0 <= metrics.get(k, -1) <= 1.0 for k in keys) and metrics.get("num_examples") == limit
    shown = ", ".join(f"{k} {metrics[k]:.2f}" if k in metrics else f"{k} missing" for k in keys[1::2])
    return ok, f"{limit} windows: {shown}", metrics


def check_process_group(device: torch.device, work: Path):
    """The collectives train.py and eval.py issue under several processes, in a one-process group of the backend
    init_distributed would pick (NCCL on CUDA, gloo on the CPU): the fp64 all-reduce of the flat LoRA gradients
    and loss, the broadcast of rank 0's LoRA init, the barrier around checkpoints, eval's all_gather_object."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
    torch_dist.init_process_group(backend, init_method=f"file://{work / 'process-group'}", rank=0, world_size=1,
                                  **extra)
    try:
        where = extra.get("device_id", device)
        flat = torch.arange(5, dtype=torch.float64, device=where)
        torch_dist.all_reduce(flat)
        param = torch.full((3,), 0.5, device=where)
        torch_dist.broadcast(param, src=0)
        torch_dist.barrier()
        gathered = [None]
        torch_dist.all_gather_object(gathered, [{"target": 7}])
        passed = flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and param.tolist() == [0.5] * 3 and \
            gathered == [[{"target": 7}]]
    finally:
        torch_dist.destroy_process_group()
    return passed, f"{backend}: all_reduce fp64, broadcast, barrier, all_gather_object", {"backend": backend}


# ---------------------------------------------------------------------------------------------------------
# Part 3: speed on the card (bf16, random weights made on the device)
# ---------------------------------------------------------------------------------------------------------

def random_model(shape: dict, device: torch.device):
    """Our model at `shape` with random weights made on the device (std 0.02, transformers' initializer_range),
    bf16. Built in fp32 then cast, so the RoPE frequencies stay fp32 as load_model keeps them."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = llama.LlamaForCausalLM(llama.LlamaConfig.from_dict(shape))
    with torch.no_grad():
        for param in ours.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.02)
    return ours.to(torch.bfloat16).eval()


def transformers_twin(shape: dict, ours, device: torch.device):
    """transformers' LlamaForCausalLM with our weights (the same module names: a strict load_state_dict)."""
    import transformers
    with torch.device(device):
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(shape))
    theirs.to(torch.bfloat16).eval().load_state_dict(ours.state_dict())
    return theirs


def bf16_matmul_rate(n: int, device: torch.device, repeats: int) -> float:
    """FLOP/s of a bare bf16 (n, n) @ (n, n) on the device, 10 per timed call: the step's physical limit, measured
    in this run (bench_model's version times the CPU and does not wait for the GPU)."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    seconds = interleaved_medians({"mm": timed(lambda: [a @ b for _ in range(10)], device)}, repeats * 2)["mm"]
    return 10 * 2 * n ** 3 / seconds


def run_measured(run, device: torch.device):
    """(run()'s result, its seconds with the device's queued work included, the GiB the device's allocator held at
    most during it above what was allocated before: the contender's working memory, weights excluded; None on
    the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    return result, seconds, (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None


def syncs_per_step(run, module, device: torch.device) -> dict | None:
    """Host-device synchronisations per model forward (one per decoding step; the prefill counts as one) during
    run(), counted from the warnings of torch.cuda's sync debug mode, which fires at every synchronising call
    (.item(), .cpu(), a copy from pageable host memory, nonzero, unique, ...)."""
    if device.type != "cuda":
        return None
    forwards = [0]
    hook = module.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            hook.remove()
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"syncs": syncs, "forwards": forwards[0], "per_step": syncs / max(forwards[0], 1)}


def measure_speed(report: Report, sizes: Sizes, device: torch.device, tokenizer, dataset, trie, data_dir: str):
    shape = {**sizes.speed_shape, "vocab_size": tokenizer.vocab_size}
    started = time.time()
    ours = random_model(shape, device)
    synchronize(device)
    report.speed.update(shape=f"bf16, {'Llama-3.2-1B' if sizes is FULL else 'tiny'} shape, "
                              f"{sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, random weights",
                        model_seconds=round(time.time() - started, 1))
    try:
        theirs = transformers_twin(shape, ours, device)
    except ImportError as err:
        theirs = None
        report.notes.append(f"transformers' side skipped ({err}): its column says n/a")
    report.speed["beam_search"] = speed_beam_search(report, sizes, device, ours, theirs, tokenizer, dataset, trie)
    report.speed["training_step"] = speed_training_step(report, sizes, device, ours, theirs, tokenizer, data_dir)
    report.speed["rows"] = speed_rows(report.speed)
    if device.type != "cuda":
        report.notes.append("no CUDA: peak GPU memory and synchronisations are n/a; the timings are the CPU's")


def speed_beam_search(report: Report, sizes: Sizes, device: torch.device, ours, theirs, tokenizer, dataset,
                      trie) -> dict:
    """Users/s of the constrained beam search (B = 10) on real Office test prompts with the bare models (no LoRA):
    beam.beam_search against transformers' generate driven by the trie processor (bench_beam.py), each timed once
    after a one-user warm-up; peak memory over the weights; synchronisations per decoding step."""
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in dataset.test[:sizes.search_users]]
    longest = max(len(tokens) for tokens in trie.item_tokens.values())
    searches = {"ours": (ours, lambda users: beam.beam_search(
        ours, users, trie, tokenizer.eos_id, tokenizer.pad_id,
        beam.BeamConfig(beam_width=BEAM_WIDTH, batch_size=sizes.search_batch)))}
    if theirs is not None:
        searches["transformers"] = (theirs, lambda users: transformers_constrained_search(
            theirs, users, trie, tokenizer, BEAM_WIDTH, sizes.search_batch, longest + 1))
    measured, found = {"users": len(prompts)}, {}
    for name, (module, search) in searches.items():
        try:
            search(prompts[:1])  # warm-up: kernels, cuBLAS handles, the allocator's pools
            found[name], seconds, memory = run_measured(lambda: search(prompts), device)
            syncs = syncs_per_step(lambda: search(prompts[:sizes.sync_users]), module, device)
        except Exception as err:  # noqa: BLE001  (their side only: e.g. pytest, which test_beam imports, missing)
            if name == "ours":
                raise
            report.notes.append(f"transformers' beam search skipped: {type(err).__name__}: {err}")
            continue
        measured[name] = {"users_per_s": len(prompts) / seconds, "seconds": seconds, "peak_gib": memory,
                          "syncs": syncs}
    if len(found) == 2:
        same = sum([i for i, _ in a] == [i for i, _ in b] for a, b in zip(found["ours"], found["transformers"]))
        measured["identical_item_lists"] = f"{same}/{len(prompts)} (bf16 rounds by batch shape: near-ties swap)"
        report.notes.append("transformers' beam-search memory includes the fp32 (beams, vocabulary) scores generate "
                            "keeps for every step in order to return sequence scores (output_scores=True)")
    return measured


def speed_training_step(report: Report, sizes: Sizes, device: torch.device, ours, theirs, tokenizer,
                        data_dir: str) -> dict:
    """One LoRA training step (forward + backward), ours against transformers + peft, on the same Office batch
    with the same adapter (B != 0, so the adapter path does real work), interleaved; the step's FLOP/s against
    the bare bf16 matmul rate of this device (bench_model.py's FLOP count)."""
    batch = office_batch(BenchConfig(data_dir=data_dir, batch_size=sizes.train_windows), tokenizer)
    batch = {k: v.to(device) for k, v in batch.items()}
    lora_config = lora.LoraConfig()
    lora.apply_lora(ours, lora_config)
    with torch.no_grad():
        for tensor in lora.lora_state_dict(ours).values():
            tensor.normal_(0, 0.02)
    losses = {"ours": (ours, lambda: F.cross_entropy(  # the lm_head only at the label positions, as train.py
        ours(batch["input_ids"], logits_at=batch["label_mask"]).float(), batch["labels"]))}
    if theirs is not None:
        try:
            import peft
        except ImportError as err:
            report.notes.append(f"transformers + peft training step skipped ({err}): its column says n/a")
        else:
            theirs = peft.get_peft_model(theirs, peft.LoraConfig(
                r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
                target_modules=list(lora_config.target_modules), task_type="CAUSAL_LM"))
            peft.set_peft_model_state_dict(theirs, {"base_model.model." + k: v
                                                    for k, v in lora.lora_state_dict(ours).items()})
            losses["transformers"] = (theirs, lambda: theirs(input_ids=batch["input_ids"],
                                                             labels=batch["hf_labels"]).loss)
    same_loss = {}
    with torch.no_grad():  # first the loss itself, dropout off: both sides compute the same thing
        for name, (module, loss) in losses.items():
            module.eval()
            same_loss[name] = loss().item()

    def step(module, loss_fn):
        module.zero_grad(set_to_none=True)
        loss_fn().backward()

    steps = {}
    for name, (module, loss) in losses.items():
        module.train()
        steps[name] = lambda module=module, loss=loss: step(module, loss)
    seconds = interleaved_medians({name: timed(fn, device) for name, fn in steps.items()}, sizes.repeats)
    batch_size, seq_len = batch["input_ids"].shape
    label_tokens = int(batch["label_mask"].sum())
    measured = {name: {"seconds": seconds[name], "tokens_per_s": batch_size * seq_len / seconds[name],
                       "label_tokens_per_s": label_tokens / seconds[name], "eval_loss": same_loss[name],
                       "peak_gib": run_measured(fn, device)[2] if device.type == "cuda" else None}
                for name, fn in steps.items()}
    flops = training_step_flops(ours.config, batch_size * seq_len, seq_len, batch_size, label_tokens, lora_config)
    rate = bf16_matmul_rate(sizes.matmul_n, device, sizes.repeats)
    return {**measured, "batch": [batch_size, seq_len], "label_tokens": label_tokens, "flops": flops,
            "bf16_matmul_flops_per_s": rate, "ours_fraction_of_bf16_matmul": flops / seconds["ours"] / rate}


def speed_rows(speed: dict) -> dict:
    """The table: what -> (ours, transformers, how much better ours is: a speed-up, or their memory / ours)."""
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    def row(group, key, spec, higher_is_better=True):
        ours, theirs = group["ours"][key], (group.get("transformers") or {}).get(key)
        ratio = None if not (ours and theirs) else ours / theirs if higher_is_better else theirs / ours
        return fmt(ours, spec), fmt(theirs, spec), "n/a" if ratio is None else f"{ratio:.2f}x"

    step, search = speed["training_step"], speed["beam_search"]
    syncs = [fmt(((search.get(name) or {}).get("syncs") or {}).get("per_step"), ".1f")
             for name in ("ours", "transformers")]
    return {
        f"LoRA step tokens/s ({step['batch'][0]} x {step['batch'][1]})": row(step, "tokens_per_s", ".0f"),
        "LoRA step label tokens/s": row(step, "label_tokens_per_s", ".0f"),
        "LoRA step FLOP/s / bare bf16 matmul": (f"{step['ours_fraction_of_bf16_matmul']:.0%}", "",
                                                f"(of {step['bf16_matmul_flops_per_s'] / 1e12:.2f} TF/s)"),
        "LoRA step peak memory, GiB": row(step, "peak_gib", ".2f", higher_is_better=False),
        f"beam search users/s ({search['users']} users, B = {BEAM_WIDTH})": row(search, "users_per_s", ".2f"),
        "beam search peak memory, GiB": row(search, "peak_gib", ".2f", higher_is_better=False),
        "beam search syncs per decoding step": (*syncs, ""),
    }


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = build_parser(CheckConfig, __doc__.split("\n\n")[0])
    config = CheckConfig(**vars(parser.parse_args(argv)))
    check_inputs(config)
    if config.pack:
        pack(config)
        return 0
    if not config.out:
        raise ValueError("--out is required (the folder for gpu_check.json)")
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    sizes = FULL if device.type == "cuda" and not config.tiny else TINY
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    versions = {}
    for name in ("transformers", "peft"):  # part 3's contenders (read without importing them: seconds)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    report = Report(out / "gpu_check.json", {
        "mode": ("CUDA vs CPU" if device.type == "cuda" else "tiny mode (CPU vs CPU)")
        + (", tiny sizes" if sizes is TINY and device.type == "cuda" else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, **versions, "work_dir": str(work)})

    tokenizer = load_tokenizer(Path(config.tokenizer) / tokenizer_files(Path(config.tokenizer))[0])
    dataset = data.load_dataset(data.DataConfig("office", data_dir=config.data_dir))
    trie = data.build_trie(dataset, tokenizer)
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in dataset.test[:sizes.beam_prompts]]
    tiny_dir = write_tiny_llama(work / "tiny-llama", Path(config.tokenizer), tokenizer.vocab_size)

    # Part 2's two training runs need nothing from part 1 and take most of the tiny mode's time, so they start
    # now, in the background: the reference run and the one SIGKILLed at step 6 (fp32 with LoRA dropout on, so
    # that resuming must restore dropout's random state too).
    reference, killed = work / "run-uninterrupted", work / "run-killed"
    flags = dict(dtype="fp32", lora_dropout=0.05, lr=1e-2, warmup_steps=1, epochs=2, micro_batch=3, save_every=2,
                 valid_limit=2, eval_batch=4)
    killer = work / "train_killed_at_step.py"
    killer.write_text(KILL_LAUNCHER.format(repo=str(REPO), step=KILL_STEP))
    reference_run = Command(["train.py", *train_flags(tiny_dir, config.data_dir, reference, **flags)],
                            work / "reference.log", device, torchrun=True)
    killed_run = Command([killer, *train_flags(tiny_dir, config.data_dir, killed, **flags)], work / "killed.log",
                         device, torchrun=True)

    # Part 1: correctness, CUDA vs CPU.
    models = {"cpu": llama.load_model(tiny_dir, dtype=torch.float32, device="cpu"),
              "device": llama.load_model(tiny_dir, dtype=torch.float32, device=device)}
    report.check("logits_fp32", "fp32 logits, 4 left-padded Office prompts x last 8 positions",
                 f"{LOGITS_TOL:g} x max(1, max |logit|)",
                 lambda: check_logits(models, prompts, tokenizer.pad_id))
    report.check("beam_search_fp32", f"beam.beam_search ranked lists, {len(prompts)} Office prompts, B = {BEAM_WIDTH}",
                 f"same lists (swaps only at ties), scores {SCORE_TOL:g}",
                 lambda: check_beam_search(models, prompts, trie, tokenizer))
    for dtype, loss in (("fp32", "obj31"), ("bf16", "bear")):
        report.check(f"train_{dtype}_{loss}", f"train.train, 3 steps, --loss {loss} --dtype {dtype}: losses",
                     f"{LOSS_TOL[dtype]:g} x max(1, |loss|) per step",
                     lambda dtype=dtype, loss=loss: check_training(work, tiny_dir, config.data_dir, device, dtype,
                                                                   loss))

    # Part 2: the users' commands.
    report.check("torchrun_train", "torchrun --nproc_per_node 1 train.py, 2 epochs x 3 steps", "exit 0, steps 1-6",
                 lambda: check_torchrun_train(reference_run, reference))
    report.check("sigkill_resume", "SIGKILL at step 6, torchrun train.py --resume vs the uninterrupted run",
                 f"{RESUME_TOL:g} (losses, adapters); CPU: bit for bit",
                 lambda: check_kill_and_resume(killed_run, [
                     "train.py", *train_flags(tiny_dir, config.data_dir, killed, **flags), "--resume"],
                     killed, reference, work, device))
    report.check("eval_ckpt_pruning", f"python eval.py --ckpt RUN --pruning --limit {sizes.eval_windows}",
                 "exit 0; NDCG, HR, PR@5/10, violation rate in [0, 1]",
                 lambda: check_eval(killed, sizes.eval_windows, work, device))
    report.check("process_group", "train.py/eval.py's collectives, 1-process group", "exact values",
                 lambda: check_process_group(device, work))
    report.notes.append("train.py with one process opens no process group (eval.init_distributed: WORLD_SIZE <= "
                        "1), so torchrun --nproc_per_node 1 runs without NCCL; process_group checks NCCL itself")

    # Part 3: speed, measured (not checked).
    print(f"[{time.time() - report.start:5.0f} s] speed: {sizes.speed_shape['hidden_size']} hidden, bf16", flush=True)
    try:
        measure_speed(report, sizes, device, tokenizer, dataset, trie, config.data_dir)
    except Exception as err:  # noqa: BLE001  (the checks above stand; the table says what broke)
        traceback.print_exc()
        report.notes.append(f"speed measurement crashed: {type(err).__name__}: {err}")
    report.write()
    report.print_table()
    print(f"wrote {report.path}")
    if config.keep or not report.passed():
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report.passed() else 1


if __name__ == "__main__":
    sys.exit(cli_main(main))

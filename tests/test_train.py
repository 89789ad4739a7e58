"""train.py: data-parallel exactness, exact resume after SIGKILL, crash-safe checkpoints, bad inputs.

Models are tiny random Llamas written by transformers (the SmolLM2 tokenizer, vocab 49152); data is a small
slice of ../shared/data/amazon/Office (one user's sliding windows, ~40 items) or the real Office files with
--limit. Oracles: the one-process run (for 2 gloo processes), the uninterrupted run (for kill + resume),
transformers' own learning-rate schedule.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402


# ------------------------------------------------------------------------------------------------ fixtures
def make_tiny_llama(folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 16, GQA 2:1, tied embeddings) in Hugging Face format, fp32, with
    SmolLM2's tokenizer files (so vocab 49152 and EOS <|im_end|> = 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=2048,
                         rope_theta=100000.0, rms_norm_eps=1e-5, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


def make_office_slice(data_root: Path, dest: Path) -> Path:
    """A small Office: the sliding windows of Office's most active training user (user 704, 70 windows):
    24 train, 4 valid, 6 test, and only the ~40 items they mention. Few items, so a B=10 beam often hits."""
    with open(data_root / "Office" / "train.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["user_id"] == "704"]
    splits = {"train.csv": rows[:24], "valid.csv": rows[24:28], "test.csv": rows[28:34]}
    titles = json.loads((data_root / "Office" / "id2name4Rec.json").read_text())
    used = {str(item) for part in splits.values() for row in part for item in json.loads(row["item_ids"])}
    folder = dest / "Office"
    folder.mkdir(parents=True)
    (folder / "id2name4Rec.json").write_text(json.dumps({k: v for k, v in titles.items() if k in used}))
    for name, part in splits.items():
        with open(folder / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["user_id", "item_ids", "timestamp"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(part)
    return dest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2_dir)


@pytest.fixture(scope="session")
def office_slice(tmp_path_factory, data_root) -> Path:
    return make_office_slice(data_root, tmp_path_factory.mktemp("data"))


def train_argv(model: Path, data_dir: Path, out: Path, **flags) -> list[str]:
    """Flags of a few-second run; keyword arguments override (True = a bare flag)."""
    defaults = dict(dataset="office", loss="bear", train_samples=12, epochs=2, global_batch=4, micro_batch=3,
                    lr=1e-2, warmup_steps=1, beam_width=4, valid_limit=1, eval_batch=4, save_every=2)
    argv = ["--model", str(model), "--data-dir", str(data_dir), "--out", str(out)]
    for name, value in {**defaults, **flags}.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run_script(args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """python <args> (or torchrun with `nproc` gloo processes) in the repo root, `env` added."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_killed(argv: list[str], patch: str) -> subprocess.CompletedProcess:
    """Run train.main(argv) in a child process with `patch` applied first; the patch SIGKILLs the child."""
    code = f"import os, signal, sys\nsys.path.insert(0, {str(REPO)!r})\nimport train\n{patch}\n" \
           f"sys.exit(train.main({argv!r}))\n"
    return run_script(["-c", code])


def kill_at_step(step: int) -> str:
    """A run_killed patch: SIGKILL when optimizer step `step` (0-based) starts (reseed_dropout opens every step)."""
    return ("original = train.reseed_dropout\n"
            "def reseed(seed, step, rank):\n"
            f"    if step == {step}:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    original(seed, step, rank)\n"
            "train.reseed_dropout = reseed")


def step_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def valid_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["valid"] for r in records if "valid" in r]


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "adapter_model.safetensors"))


def manifest(out: Path) -> dict:
    return json.loads((out / "checkpoint.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama, office_slice) -> Path:
    """The reference run for the kill tests: 2 epochs x 3 steps, bf16, LoRA dropout on (so the resumed
    dropout masks must match too), micro-batches of 3 in a global batch of 4."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train.main(train_argv(tiny_llama, office_slice, out)) == 0
    return out


# ------------------------------------------------------------------------------------------------ DDP
def test_two_gloo_processes_give_the_one_process_weights(tmp_path, tiny_llama, data_root):
    # Real Office windows (targets of different token lengths); 15 windows in global batches of 7 -> 7, 7, 1:
    # ranks get 4 + 3 windows (micro-batches 2+2 and 2+1), and in the last batch rank 1 gets none at all.
    flags = dict(train_samples=15, global_batch=7, micro_batch=2, epochs=1, dtype="fp32", lora_dropout=0.0,
                 save_every=0, valid_limit=3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(train_argv(tiny_llama, data_root, one, **flags)) == 0
    result = run_script(["train.py", *train_argv(tiny_llama, data_root, two, **flags)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]

    label_tokens = [json.loads(line)["label_tokens"] for line in (one / "log.jsonl").read_text().splitlines()
                    if "label_tokens" in json.loads(line)]
    assert len(label_tokens) == 3 and label_tokens[2] < label_tokens[0] != label_tokens[1]  # lengths differ
    assert [s for s, _ in step_losses(two)] == [1, 2, 3]
    for (_, a), (_, b) in zip(step_losses(one), step_losses(two)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    weights_one, weights_two = adapter(one / manifest(one)["last"]), adapter(two / manifest(two)["last"])
    assert weights_one.keys() == weights_two.keys()
    moved = 0.0
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-6)
        if ".lora_B." in name:
            moved = max(moved, weights_one[name].abs().max().item())
    assert moved > 1e-3  # B started at zero: the comparison is not between two untouched adapters
    assert valid_records(one) == valid_records(two)  # sharded, all-reduced validation = one process


def authors_normalize_by_hand(model_dir: Path, data_dir: Path, world: int, flags: dict,
                              steps: int = 2, seed: int = 42) -> tuple[dict, list[dict]]:
    """--loss bear --normalize authors written from its definition, on the untouched initial model
    (the first update has lr 0, and B starts at 0). Each step's global batch is split over `world`
    ranks with shard_bounds and each share into micro-batches, as train.py splits it; over the G
    micro-batches m of ALL ranks, with W_m = sum of w_t over m's positions with > 1 valid token:
    the authors' objective 1/G sum_m sum_t w_t CE_t / (W_m + 1e-8) (w_t detached) gives the
    gradient, and train.py logs 1/G sum_m sum_t bear_t / (W_m + 1e-8): BEAR's eq. 3.5 value, whose
    gradient is the same (grad bear_t = w_t grad CE_t, tests/test_loss.py). Returns the initial
    adapter and per step the logged value, the gradient and the micro-batch sizes."""
    import loss
    from lora import LoraConfig, apply_lora
    from model import load_model
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    dataset = data.load_dataset(data.DataConfig(dataset="office", data_dir=str(data_dir),
                                                train_samples=flags["train_samples"], seed=seed))
    trie = data.build_trie(dataset, tokenizer)
    windows = data.encode_examples(dataset.train, dataset, tokenizer, trie)
    model = load_model(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(dropout=0.0))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    initial = {name: p.detach().clone() for name, p in params.items()}
    hyper = dict(beam_width=flags["beam_width"], surrogate=flags.get("surrogate", "paper"))
    order, size = train.epoch_order(len(windows), seed, 0), flags["global_batch"]
    results = []
    for step in range(steps):
        batch = [windows[i] for i in order[step * size:(step + 1) * size]]
        micro_batches = []
        for rank in range(world):
            start, stop = cli.shard_bounds(len(batch), rank, world)
            share = batch[start:stop]
            micro_batches += [share[i:i + flags["micro_batch"]]
                              for i in range(0, len(share), flags["micro_batch"])]
        logged = 0.0
        for micro in micro_batches:
            b = data.collate_train(micro, tokenizer.pad_id)
            logits = model(b["input_ids"], logits_at=b["label_mask"])  # (N, V)
            labels, (rows, tokens) = b["labels"], trie.valid_next(b["label_nodes"])
            weights = loss.bear_token_weights(logits, labels, rows, tokens, **hyper)  # detached
            several_valid = torch.bincount(rows, minlength=len(labels)) > 1
            divisor = float(weights[several_valid].sum()) + 1e-8  # the authors' 1e-8
            ce = loss.msl(logits, labels, rows, tokens)
            ((weights * ce).sum() / divisor / len(micro_batches)).backward()
            bear = loss.bear(logits.detach(), labels, rows, tokens, **hyper)
            logged += float(bear.sum()) / divisor / len(micro_batches)
        results.append({"logged": logged, "micro_batches": [len(m) for m in micro_batches],
                        "grads": {name: p.grad.clone() for name, p in params.items()}})
        model.zero_grad(set_to_none=False)
    return initial, results


def adamw_by_hand(initial: dict, grads: list[dict], lrs: list[float], max_grad_norm=1.0) -> dict:
    """The adapter after train.py's AdamW steps (no weight decay, clipped) on these gradients."""
    params = {name: t.clone().requires_grad_(True) for name, t in initial.items()}
    optimizer = torch.optim.AdamW(list(params.values()), weight_decay=0.0)
    for step_grads, lr in zip(grads, lrs):
        for name, param in params.items():
            param.grad = step_grads[name].clone()
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
    return {"base_model.model." + name: p.detach() for name, p in params.items()}  # PEFT's keys


def test_normalize_authors_is_the_per_micro_batch_mean_on_1_and_2_processes(tmp_path, tiny_llama,
                                                                            office_slice):
    """--normalize authors: each micro-batch's sum_t w_t CE_t / (sum of w_t + 1e-8), averaged over
    the micro-batches of ALL ranks (see authors_normalize_by_hand). 6 windows in global batches of
    4 -> 4, 2, in micro-batches of 2. Step 1: one process runs [2, 2], two run [2] | [2]: the same
    micro-batches, so the same loss. Step 2: one process runs [2], two run [1] | [1]: the authors'
    per-micro-batch mean genuinely differs, so each run is checked against ITS formula (and they
    differ), and so are the adapters. Both steps see the initial model (the first update has lr 0),
    so the logged losses and gradient norms are the formula's on the untouched model; the adapter
    is AdamW's on the formula's gradients. A third run: --surrogate violators, 1 process."""
    flags = dict(train_samples=6, global_batch=4, micro_batch=2, epochs=1, dtype="fp32",
                 lora_dropout=0.0, save_every=0, valid_limit=1, normalize="authors")
    runs = [(1, tmp_path / "one", {}), (2, tmp_path / "two", {}),
            (1, tmp_path / "violators", {"surrogate": "violators"})]
    for world, out, extra in runs:
        argv = train_argv(tiny_llama, office_slice, out, **flags, **extra)
        if world == 1:
            assert train.main(argv) == 0
        else:
            result = run_script(["train.py", *argv], nproc=world)
            assert result.returncode == 0, result.stderr[-3000:]
    lrs = [train.learning_rate(k, 2, train.TrainConfig(lr=1e-2, warmup_steps=1)) for k in (0, 1)]
    assert lrs == [0.0, 1e-2]  # train_argv's lr and warm-up: step 1 leaves the adapter untouched
    logged, formulas = [], []
    for world, out, extra in runs:
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        records = [r for r in records if "loss" in r]
        initial, expected = authors_normalize_by_hand(tiny_llama, office_slice, world,
                                                      dict(flags, beam_width=4, **extra))
        assert [r["step"] for r in records] == [1, 2]
        for record, formula in zip(records, expected):
            assert record["loss"] == pytest.approx(formula["logged"], rel=1e-5, abs=1e-6)
            norm = torch.cat([g.flatten() for g in formula["grads"].values()]).norm()
            assert record["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
        weights = adapter(out / manifest(out)["last"])
        expected_adapter = adamw_by_hand(initial, [f["grads"] for f in expected], lrs)
        assert weights.keys() == expected_adapter.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], expected_adapter[name], rtol=1e-4, atol=1e-6)
        assert max(weights[n].abs().max().item() for n in weights if ".lora_B." in n) > 1e-3
        logged.append([r["loss"] for r in records])
        formulas.append(expected)
    assert [f["micro_batches"] for f in formulas[0]] == [[2, 2], [2]]
    assert [f["micro_batches"] for f in formulas[1]] == [[2, 2], [1, 1]]
    # Step 1, the same micro-batches: the same loss on 1 and 2 processes (the DDP test's tolerance).
    assert logged[0][0] == pytest.approx(logged[1][0], rel=1e-5, abs=1e-6)
    # Step 2: the formula says 1 and 2 processes differ, by 10x the tolerance, and so do the runs.
    gap = abs(formulas[0][1]["logged"] - formulas[1][1]["logged"])
    assert gap > 1e-4 * abs(formulas[0][1]["logged"])
    assert abs(logged[0][1] - logged[1][1]) > 0.5 * gap
    # The violators surrogate is a different loss, not the paper's under another name.
    assert abs(logged[2][0] - logged[0][0]) > 1e-2


def test_learning_rate_matches_transformers_linear_schedule():
    from transformers import get_linear_schedule_with_warmup
    config = train.TrainConfig(lr=1e-4, warmup_steps=20)
    total = 95
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, total)
    for step in range(total):
        assert train.learning_rate(step, total, config) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("count,world", [(7, 2), (1, 3), (128, 8), (10, 3), (0, 2)])
def test_shards_cover_the_batch_once_in_order(count, world):
    shards = [cli.shard_bounds(count, rank, world) for rank in range(world)]
    assert [i for start, stop in shards for i in range(start, stop)] == list(range(count))
    sizes = [stop - start for start, stop in shards]
    assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------------------------------------ resume
def assert_same_run(out: Path, reference: Path) -> None:
    assert step_losses(out) == step_losses(reference)
    assert valid_records(out) == valid_records(reference)
    assert manifest(out)["last"] == manifest(reference)["last"] and manifest(out)["best"] == manifest(reference)["best"]
    for kind in ("last", "best"):
        mine, theirs = adapter(out / manifest(out)[kind]), adapter(reference / manifest(reference)[kind])
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (kind, name)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_llama, office_slice,
                                                                    uninterrupted):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama, office_slice, out)
    # Killed when step 6 starts: step 5 (mid-epoch 2) is already logged, the last checkpoint is step 4.
    killed = run_killed(argv, kill_at_step(5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [s for s, _ in step_losses(out)] == [1, 2, 3, 4, 5]
    assert manifest(out)["last"] == "step-00000004"

    assert train.main(argv + ["--resume"]) == 0
    assert_same_run(out, uninterrupted)  # step 5's log line was dropped and recomputed identically


KILL_PATCHES = {
    # the 2nd state file (epoch 1's checkpoint at step 3): half-written, then SIGKILL
    "state": ("import torch\ncalls = []\noriginal = torch.save\n"
              "def save(obj, path, *args, **kwargs):\n"
              "    calls.append(path)\n"
              "    if len(calls) == 2:\n"
              "        open(path, 'wb').write(b'partial')\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return original(obj, path, *args, **kwargs)\n"
              "torch.save = save", "step-00000002"),
    # the 3rd manifest (step 4): its temp file half-written, then SIGKILL; step-00000004/ is complete
    "manifest": ("import cli\ncalls = []\noriginal = cli.write_json_atomic\n"
                 "def write(path, obj):\n"
                 "    if str(path).endswith('checkpoint.json'):\n"
                 "        calls.append(path)\n"
                 "        if len(calls) == 3:\n"
                 "            open(str(path) + '.tmp', 'w').write('{\"last\": \"step-0')\n"
                 "            os.kill(os.getpid(), signal.SIGKILL)\n"
                 "    return original(path, obj)\n"
                 "cli.write_json_atomic = write", "step-00000003"),
}


@pytest.mark.parametrize("where", sorted(KILL_PATCHES))
def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, tiny_llama, office_slice,
                                                                      uninterrupted, where):
    from lora import load_adapter
    from model import load_model
    out = tmp_path / "run"
    argv = train_argv(tiny_llama, office_slice, out)
    patch, expected_last = KILL_PATCHES[where]
    killed = run_killed(argv, patch)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # What a reader (eval.py, --resume) finds is the previous checkpoint, complete and loadable.
    fields = manifest(out)
    assert fields["last"] == expected_last
    checkpoint = cli.resolve_checkpoint(out)
    assert checkpoint.parent == out and checkpoint.name == fields.get("best", fields["last"])
    state = torch.load(out / fields["last"] / train.STATE_FILE, weights_only=False)
    assert state["step"] == int(expected_last.split("-")[1])
    model = load_model(tiny_llama, dtype=torch.float32)
    load_adapter(model, out / fields["last"])  # strict: raises on a partial file

    assert train.main(argv + ["--resume"]) == 0
    assert_same_run(out, uninterrupted)
    assert not list(out.glob("step-*.tmp")) and sorted(p.name for p in out.glob("step-*")) == \
        sorted({manifest(out)["last"], manifest(out)["best"]})


# ------------------------------------------------------------------------------------------------ bad inputs
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama, office_slice,
                                                                         monkeypatch, capsys):
    current = {}
    real_reseed, real_bear = train.reseed_dropout, train.losses.bear
    monkeypatch.setattr(train, "reseed_dropout", lambda seed, step, rank: (current.update(step=step),
                                                                           real_reseed(seed, step, rank)))
    monkeypatch.setattr(train.losses, "bear", lambda *args, **kwargs: real_bear(*args, **kwargs)
                        * (float("nan") if current["step"] == 3 else 1.0))
    out = tmp_path / "run"
    code = cli.cli_main(train.main, train_argv(tiny_llama, office_slice, out, save_every=1))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: loss is nan at step 4;") and "step-00000003" in err[0]
    assert manifest(out)["last"] == "step-00000003"
    assert [s for s, _ in step_losses(out)] == [1, 2, 3]
    assert torch.isfinite(torch.cat([t.flatten() for t in adapter(out / "step-00000003").values()])).all()


@pytest.mark.parametrize("case", ["unknown loss", "unknown dataset", "no model", "missing model folder",
                                  "zero batch", "resume and overwrite", "other run in out",
                                  "resume with other flags"])
def test_bad_inputs_give_one_error_line_and_write_nothing(case, tmp_path, tiny_llama, office_slice,
                                                          uninterrupted, capsys):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama, office_slice, out)
    expected = {
        "unknown loss": "error: argument --loss: invalid choice: 'dpo'",
        "unknown dataset": "error: unknown dataset 'movies'",
        "no model": "error: --model must name a Hugging Face Llama folder or a hub id",
        "missing model folder": f"error: --model {tmp_path / 'nowhere'}: no such folder, and not a hub id",
        "zero batch": "error: --micro-batch must be >= 1, got 0",
        "resume and overwrite": "error: --resume and --overwrite exclude each other",
        "other run in out": "already holds a run",
        "resume with other flags": "error: --resume: --lr 0.5 differs from the saved run's 0.01",
    }[case]
    if case == "unknown loss":
        argv += ["--loss", "dpo"]
    elif case == "unknown dataset":
        argv += ["--dataset", "movies"]
    elif case == "no model":
        argv += ["--model", ""]
    elif case == "missing model folder":
        argv += ["--model", str(tmp_path / "nowhere")]
    elif case == "zero batch":
        argv += ["--micro-batch", "0"]
    elif case == "resume and overwrite":
        argv += ["--resume", "--overwrite"]
    elif case in ("other run in out", "resume with other flags"):
        out = uninterrupted
        argv = train_argv(tiny_llama, office_slice, out, loss="msl") if case == "other run in out" else \
            train_argv(tiny_llama, office_slice, out, lr=0.5, resume=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None

    try:
        code = cli.cli_main(train.main, argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert expected in err[-1] and "Traceback" not in "\n".join(err)
    assert len(err) == 1 and err[0].startswith("error: ")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None
    assert after == before  # nothing created, nothing changed


def assert_error_in_torchrun_summary(result, line: str) -> None:
    """torchrun exits 1 (its ChildFailedError) whatever its children return. Its Root Cause box shows the
    rank that ended first (every rank writes the error file) with the child's `error:` line: exit 2, or
    SIGTERM if the group was stopped meanwhile. The line itself is printed by rank 0 alone, at most once
    (not at all if the group stopped rank 0 before it printed)."""
    assert result.returncode == 1, result.stderr[-3000:]
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert re.search(r"rank      : [01] \(local_rank: [01]\)\n  exitcode  : (2|-15) \(pid: ", summary), summary
    assert f"traceback : {line}" in summary, summary
    assert "exitcode  : 2 (pid: " in result.stderr, result.stderr[-3000:]  # the rank that ended first
    assert len(re.findall("^" + re.escape(line), result.stderr, re.M)) <= 1, result.stderr[-3000:]


def test_more_processes_than_training_windows_is_refused(tmp_path, tiny_llama, office_slice):
    out = tmp_path / "run"
    result = run_script(["train.py", *train_argv(tiny_llama, office_slice, out, train_samples=1)], nproc=2)
    assert_error_in_torchrun_summary(
        result, "error: 2 processes but only 1 training windows: use at most 1 processes (or a larger --limit)")
    assert not out.exists()


def test_overwrite_replaces_a_run(tmp_path, tiny_llama, office_slice, uninterrupted):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama, office_slice, out, epochs=1, save_every=0, valid_limit=1)
    assert train.main(argv) == 0
    (out / "notes.txt").write_text("mine")  # not ours: --overwrite must leave it alone
    assert train.main(argv + ["--loss", "sft", "--overwrite"]) == 0
    assert json.loads((out / "train_config.json").read_text())["loss"] == "sft"
    assert (out / "notes.txt").read_text() == "mine"
    assert [s for s, _ in step_losses(out)] == [1, 2, 3]

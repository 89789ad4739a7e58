"""bench/study.py end to end on a tiny random Llama and a handful of Office windows, in seconds.

Oracles: eval.py's own evaluation of the same adapter (the full exact top-K search on every example, where the
study searches only where the target could be in it), an uninterrupted train.py run (for the study's resume of
a killed training unit), and metrics counted by hand from the raw per-example files.
"""
import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import beam  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import study  # noqa: E402
from lora import load_adapter  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from test_train import (adapter, kill_at_step, make_office_slice, make_tiny_llama, run_killed, run_script,  # noqa: E402
                        step_losses)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory, smollm2_dir, data_root) -> study.Preset:
    model = make_tiny_llama(tmp_path_factory.mktemp("study_llama"), smollm2_dir)
    slice_root = make_office_slice(data_root, tmp_path_factory.mktemp("study_data"))
    return dataclasses.replace(study.PRESETS["cpu"], model=str(model), data_dir=str(slice_root), train_samples=12,
                               epochs=2, global_batch=4, micro_batch=3, warmup_steps=1, lr_grid=(1e-2, 3e-2),
                               bear_grid=((0.25, 2.75), (1.0, 1.0)), valid_limit=2, test_limit=6, beam_width=4,
                               eval_batch=4, save_every=1, dtype="fp32", bootstrap=200, chunk=4)


def run_study_cli(preset: study.Preset, results: Path, work: Path) -> subprocess.CompletedProcess:
    """The study as a user runs it, with the tiny preset passed in through a small driver."""
    code = (f"import sys, dataclasses; sys.path.insert(0, {str(REPO / 'bench')!r}); import study\n"
            f"preset = study.Preset(**{dataclasses.asdict(preset)!r})\n"
            f"study.run_study(preset, study.Path({str(results)!r}), study.Path({str(work)!r}))\n"
            f"print(study.report(study.Path({str(results)!r})))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def tree_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_study_end_to_end_resumes_skips_and_reports_from_raw_files(tmp_path, tiny_preset):
    results, work = tmp_path / "results", tmp_path / "work"
    preset = tiny_preset
    first = f"msl-lr{preset.lr_grid[0]:g}"

    # A training unit killed mid-run (SIGKILL when step 5 starts; step 4 was checkpointed) ...
    argv = study.train_argv(preset, work / "runs" / first, loss="msl", lr=preset.lr_grid[0])
    killed = run_killed(argv, kill_at_step(4))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # ... and the reference it must equal once the study has resumed it.
    reference = tmp_path / "reference"
    ran = run_script(["train.py", *study.train_argv(preset, reference, loss="msl", lr=preset.lr_grid[0])])
    assert ran.returncode == 0, ran.stderr[-2000:]  # one thread, as the study's runs: the same float sums

    done = run_study_cli(preset, results, work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"unit runs/{first}: resuming" in done.stdout
    assert step_losses(results / "runs" / first) == step_losses(reference)
    best = json.loads((reference / "checkpoint.json").read_text())["best"]
    resumed, uninterrupted = adapter(results / "runs" / first / "adapter"), adapter(reference / best)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    # Every unit ran and the report covers every arm.
    for arm in study.ARMS:
        assert (results / "test" / arm / "examples.jsonl").exists(), arm
    assert (results / "valid" / "popularity" / "examples.jsonl").exists()
    assert "| popularity (floor) |" in (results / "report.md").read_text()
    assert len(list((results / "runs").iterdir())) == len(preset.lr_grid) + len(preset.bear_grid) + 4
    assert (results / "report.md").read_text() in done.stdout

    # A second invocation does nothing: every unit is skipped, no file changes.
    before = tree_state(results)
    again = run_study_cli(preset, results, work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("unit ")], again.stdout[:2000]
    assert sum(line.startswith("skip ") for line in again.stdout.splitlines()) == \
        len(study.ARMS) + 1 + len(preset.lr_grid) + len(preset.bear_grid) + 4  # + popularity on validation
    assert tree_state(results) == before

    # The report mode (a new process, no model) reproduces the same text from the raw files.
    report = subprocess.run([sys.executable, "bench/study.py", "--report", "--results", str(results)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (results / "report.md").read_text() in report.stdout
    with open(results / "figure.png", "rb") as f:  # matplotlib is in requirements-test.txt: the figure is drawn
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def hand_counted(records: list[dict], beam_width: int) -> dict:
    """Metrics straight from their definitions (SPEC §5), one example at a time."""
    n = len(records)
    out = {f"hr@{k}": sum(r["beam_rank"] is not None and r["beam_rank"] < k for r in records) / n for k in (5, 10)}
    out.update({f"ndcg@{k}": sum(1 / math.log2(r["beam_rank"] + 2) for r in records
                                 if r["beam_rank"] is not None and r["beam_rank"] < k) / n for k in (5, 10)})
    for k in (5, 10):
        eligible = [r for r in records if r["exact_rank"] is not None and r["exact_rank"] < k]
        pruned = [r for r in eligible if r["beam_rank"] is None]
        out[f"pr@{k}"] = len(pruned) / len(eligible) if eligible else 0.0
    out["nc_rate"] = sum(all(t < beam_width for t in r["token_ranks"]) for r in records) / n
    return out


def test_study_metrics_equal_eval_py_and_hand_counts(tmp_path, tiny_preset):
    """One test unit against eval.py's evaluate (full exact top-K on every example) and the definitions."""
    preset = dataclasses.replace(tiny_preset, test_limit=6)
    results, work = tmp_path / "results", tmp_path / "work"
    run = study.train_unit(preset, results, work, "bear", loss="bear", lr=3e-2)
    study.evaluate_unit(preset, results, work, "bear", run)
    records = study.read_records(results / "test" / "bear")
    columns = study.per_example(records, preset.beam_width)
    ours = {name: float(value[0]) for name, value in study.metrics_from(columns).items()}
    for name, value in hand_counted(records, preset.beam_width).items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    # The report's counts (quoted by the README), one example at a time.
    hit = [r["beam_rank"] is not None and r["beam_rank"] < 10 for r in records]
    eligible = [r["exact_rank"] is not None and r["exact_rank"] < 10 for r in records]
    violating = [max(r["token_ranks"]) >= preset.beam_width for r in records]
    pruned = [e and r["beam_rank"] is None for e, r in zip(eligible, records)]
    assert study.counts(columns) == {
        "hits": sum(hit), "eligible": sum(eligible), "pruned": sum(pruned),
        "pruned_violating": sum(p and v for p, v in zip(pruned, violating)), "violating": sum(violating),
        "violating_eligible": sum(v and e for v, e in zip(violating, eligible))}

    tokenizer = load_tokenizer(preset.model)
    dataset = data.load_dataset(data.DataConfig(dataset="office", data_dir=preset.data_dir,
                                                train_samples=preset.train_samples))
    trie = data.build_trie(dataset, tokenizer)
    model = load_model(preset.model, dtype=torch.float32)
    load_adapter(model, results / "runs" / "bear" / "adapter")
    model.eval()
    config = beam.BeamConfig(beam_width=preset.beam_width, batch_size=preset.eval_batch)
    reference, _ = evaluation.evaluate(model, dataset, tokenizer, trie, dataset.test[:6], config,
                                       cli.Distributed(), pruning=True)
    for name in ("ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10"):
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name
    violated = [beam.violates_necessary_condition(model, data.prompt_tokens(dataset.prompt(e), tokenizer),
                                                  e.target, trie, config) for e in dataset.test[:6]]
    assert [max(r["token_ranks"]) >= preset.beam_width for r in records] == violated
    # The beam's returned lists are the plain beam search's.
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in dataset.test[:6]]
    plain = beam.beam_search(model, prompts, trie, tokenizer.eos_id, tokenizer.pad_id, config)
    assert [[items for items, _ in r["beam"]] for r in records] == \
        [[sorted(items) for items, _ in result] for result in plain]

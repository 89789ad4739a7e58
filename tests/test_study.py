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
from types import SimpleNamespace

import numpy as np
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
                               lr_extensions=0,
                               bear_grid=((0.25, 2.75), (1.0, 1.0)), valid_limit=2, test_limit=6, beam_width=4,
                               eval_batch=4, save_every=1, dtype="fp32", bootstrap=200, chunk=4,
                               sweep_topk_weights=(0.5,), sweep_xis=(1.0,), scale_samples=24, sdpo_lr_grid=(1e-2,))


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

    # Every unit ran and the report covers every arm: the sensitivity sweep's points around BEAR's chosen
    # (lambda', xi), the chosen one not run twice, and the scale point's MSL and BEAR.
    selection = json.loads((results / "selection.json").read_text())
    points = study.sweep_points(preset, selection["topk_weight"], selection["xi"])
    assert len(points) in (1, 2) and (selection["topk_weight"], selection["xi"]) not in points
    sweep = [f"bear-tw{tw:g}-xi{xi:g}" for tw, xi in points]
    evaluation_only = ["msl-lp1", "bear-lp1", "sft-mask-after"]  # the authors' search settings, same runs
    evaluation_only += ["sdpo-mask-after", "sdpo-bear-mask-after"]  # ... as SFT, for S-DPO's full softmax
    for arm in [*study.ARMS, *sweep, "msl-n24", "bear-n24", *evaluation_only, "sdpo", "sdpo-bear"]:
        assert (results / "test" / arm / "examples.jsonl").exists(), arm
    assert (results / "valid" / "popularity" / "examples.jsonl").exists()
    text = (results / "report.md").read_text()
    assert "| popularity (floor) |" in text
    assert all(f"| {arm} |" in text for arm in sweep) and "| 0 (MSL) | - | msl |" in text
    assert "| 24 | bear-n24 − msl-n24 |" in text and "| 24 | msl-n24 − msl |" in text
    assert all(f"| {a} − {b} |" in text for a, b in zip(evaluation_only, ["msl", "bear", "sft", "sdpo", "sdpo-bear"]))
    assert "| sdpo-bear-mask-after − sdpo-mask-after |" in text and "| sdpo-mask-after − sft-mask-after |" in text
    assert "| bear-lp1 − msl-lp1 |" in text and "| bear-lp1 − sft-mask-after |" in text
    row = next(line for line in text.splitlines() if line.startswith("| bear-lp1 − sft-mask-after |"))
    assert row.split(" | ")[3] == "n/a"  # PR@10: no exact search with the mask after the softmax
    assert all(f"| {a} − {b} |" in text for a, b in (("sdpo-bear", "sdpo"), ("sdpo", "sft"), ("sdpo-bear", "sft")))
    sdpo_bear = json.loads((results / "runs" / f"sdpobear-lr0.01-tw{selection['topk_weight']:g}-xi"
                                                f"{selection['xi']:g}" / "train_config.json").read_text())
    assert sdpo_bear["init_adapter"] == str(results / "runs" / f"sft-lr{selection['lr']:g}" / "adapter")
    assert sdpo_bear["micro_batch"] == max(1, preset.micro_batch // 4)  # 4 sequences per prompt
    assert json.loads((results / "test" / "bear-lp1" / "unit.json").read_text())["settings"] == \
        {"length_penalty": 1.0}
    scaled = results / "runs" / f"msl-lr{selection['lr']:g}-n24" / "train_config.json"
    assert json.loads(scaled.read_text())["train_samples"] == 24
    units = len(preset.lr_grid) + len(preset.bear_grid) + 4 + len(points) + 2 + 2  # ... + S-DPO, S-DPO + BEAR
    assert len(list((results / "runs").iterdir())) == units
    assert (results / "report.md").read_text() in done.stdout
    assert not list((work / "test").iterdir())  # each test unit's partial records and wall time, once committed
    assert all(json.loads((unit / "unit.json").read_text())["wall_s"] > 0 for unit in (results / "test").iterdir())

    # A second invocation does nothing: every unit is skipped, no file changes.
    before = tree_state(results)
    again = run_study_cli(preset, results, work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("unit ")], again.stdout[:2000]
    assert sum(line.startswith("skip ") for line in again.stdout.splitlines()) == \
        len(study.ARMS) + 1 + units + len(points) + 2 + 5 + 2  # + valid popularity, sweep, scale, evaluation, S-DPO
    assert tree_state(results) == before

    # The report mode (a new process, no model) reproduces the same text from the raw files.
    report = subprocess.run([sys.executable, "bench/study.py", "--report", "--results", str(results)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (results / "report.md").read_text() in report.stdout
    for name in ("figure.png", "figure-sensitivity.png"):  # matplotlib is in requirements-test.txt
        with open(results / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def hand_counted(records: list[dict], beam_width: int) -> dict:
    """Metrics straight from their definitions (SPEC §5), one example at a time."""
    n = len(records)
    out = {f"hr@{k}": sum(r["beam_rank"] is not None and r["beam_rank"] < k for r in records) / n for k in (5, 10)}
    out.update({f"ndcg@{k}": sum(1 / math.log2(r["beam_rank"] + 2) for r in records
                                 if r["beam_rank"] is not None and r["beam_rank"] < k) / n for k in (5, 10)})
    for k in (5, 10) if "exact_rank" in records[0] else ():  # no exact search with the mask after the softmax
        eligible = [r for r in records if r["exact_rank"] is not None and r["exact_rank"] < k]
        pruned = [r for r in eligible if r["beam_rank"] is None]
        out[f"pr@{k}"] = len(pruned) / len(eligible) if eligible else 0.0
    out["nc_rate"] = sum(all(t < beam_width for t in r["token_ranks"]) for r in records) / n
    return out


def teacher_forced_ranks(model, prompt: list[int], tokens, trie) -> list[int]:
    """rank_t of each target token: the trie-valid tokens whose logit beats it (one plain forward)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(tokens)]))[0, len(prompt) - 1:-1].float()
    ranks = []
    for logit, node, token in zip(logits, trie.path(tokens), tokens):
        _, valid = trie.valid_next(torch.tensor([node]))
        ranks.append(sum(float(logit[v]) > float(logit[token]) for v in valid.tolist()))
    return ranks


def test_a_test_split_larger_than_the_limit_is_a_seeded_sample():
    """test_limit windows drawn without replacement, in the split's order, the same on every call (every arm
    and every resumed unit sees the same windows); a split no larger than the limit is taken whole."""
    split = SimpleNamespace(test=[f"window {i}" for i in range(100)])
    preset = dataclasses.replace(study.PRESETS["cpu"], test_limit=30)
    sample = study.test_windows(split, preset)
    assert len(set(sample)) == 30 and set(sample) <= set(split.test)
    assert sample == sorted(sample, key=split.test.index) and sample == study.test_windows(split, preset)
    assert sample != split.test[:30]  # a sample of the whole split, not its head
    assert study.test_windows(split, dataclasses.replace(preset, seed=7)) != sample
    assert study.test_windows(split, dataclasses.replace(preset, test_limit=100)) == split.test
    assert study.test_windows(split, dataclasses.replace(preset, test_limit=0)) == split.test


@pytest.mark.parametrize("settings", [{}, {"length_penalty": 1.0}, {"mask_before_softmax": False}])
def test_study_metrics_equal_eval_py_and_hand_counts(tmp_path, tiny_preset, settings):
    """One test unit against eval.py's evaluate (full exact top-K on every example) and the definitions, under
    our search settings and the authors' (the evaluation-only arms), on a seeded sample of the test split. With
    the mask after the softmax the study runs no exact search: no PR@K, no exact-top-10 counts."""
    preset = dataclasses.replace(tiny_preset, test_limit=4)  # 4 of the slice's 6 test windows
    results, work = tmp_path / "results", tmp_path / "work"
    run = study.train_unit(preset, results, work, "bear", loss="bear", lr=3e-2)
    study.evaluate_unit(preset, results, work, "bear", run, **settings)
    records = study.read_records(results / "test" / "bear")
    columns = study.per_example(records, preset.beam_width)
    ours = {name: float(value[0]) for name, value in study.metrics_from(columns).items()}
    exact = settings.get("mask_before_softmax", True)
    assert sorted(ours) == sorted(hand_counted(records, preset.beam_width)) + (["violation_share"] if exact else [])
    for name, value in hand_counted(records, preset.beam_width).items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    # The report's counts (quoted by the README), one example at a time.
    hit = [r["beam_rank"] is not None and r["beam_rank"] < 10 for r in records]
    violating = [max(r["token_ranks"]) >= preset.beam_width for r in records]
    if exact:
        eligible = [r["exact_rank"] is not None and r["exact_rank"] < 10 for r in records]
        pruned = [e and r["beam_rank"] is None for e, r in zip(eligible, records)]
        assert study.counts(columns) == {
            "hits": sum(hit), "eligible": sum(eligible), "pruned": sum(pruned),
            "pruned_violating": sum(p and v for p, v in zip(pruned, violating)), "violating": sum(violating),
            "violating_eligible": sum(v and e for v, e in zip(violating, eligible))}
    else:
        assert not any("exact_rank" in r or "exact_searched" in r for r in records)
        assert study.counts(columns) == {"hits": sum(hit), "eligible": None, "pruned": None,
                                         "pruned_violating": None, "violating": sum(violating),
                                         "violating_eligible": None}

    tokenizer = load_tokenizer(preset.model)
    dataset = data.load_dataset(data.DataConfig(dataset="office", data_dir=preset.data_dir,
                                                train_samples=preset.train_samples))
    trie = data.build_trie(dataset, tokenizer)
    model = load_model(preset.model, dtype=torch.float32)
    load_adapter(model, results / "runs" / "bear" / "adapter")
    model.eval()
    windows = study.test_windows(dataset, preset)
    assert [(r["user_id"], r["target"]) for r in records] == [(e.user_id, e.target) for e in windows]
    config = beam.BeamConfig(beam_width=preset.beam_width, batch_size=preset.eval_batch, **settings)
    reference, _ = evaluation.evaluate(model, dataset, tokenizer, trie, windows, config,
                                       cli.Distributed(), pruning=True)
    for name in ("ndcg@5", "ndcg@10", "hr@5", "hr@10") + (("pr@5", "pr@10") if exact else ()):
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name
    # Each target's token ranks from one unpadded forward, compared by Python, and the study's.
    violated = [max(teacher_forced_ranks(model, data.prompt_tokens(dataset.prompt(e), tokenizer),
                                         trie.item_tokens[e.target], trie)) >= preset.beam_width
                for e in windows]
    assert [max(r["token_ranks"]) >= preset.beam_width for r in records] == violated
    # The beam's returned lists are the plain beam search's.
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in windows]
    plain = beam.beam_search(model, prompts, trie, tokenizer.eos_id, tokenizer.pad_id, config)
    assert [[items for items, _ in r["beam"]] for r in records] == \
        [[sorted(items) for items, _ in result] for result in plain]


def test_the_exact_search_is_skipped_only_by_total_log_probs_under_a_length_penalty():
    """evaluate_chunk skips the exact top-K search where B returned items beat the target's total log-prob. Under
    length penalty 1 a returned score is total / gen_len: the totals must be recovered. By hand: the target (10,
    EOS) has P = .2, the best item by total probability; eleven items (11, 22 + k, 33 + k, EOS) have P = .8 / 11
    each, yet outscore it per token (log(.8 / 11) / 4 > log .2 / 2), so the B = 10 finished are theirs."""
    from test_beam import FixedProbabilities
    eos, prompt, target = 2, 40, 1
    catalogue = {target: (10, eos)} | {2 + k: (11, 22 + k, 33 + k, eos) for k in range(11)}
    table = torch.full((48, 48), -30.0)
    table[prompt, 10], table[prompt, 11], table[10, eos], table[11, 22:33] = math.log(0.2), math.log(0.8), 0, 0
    for k in range(11):
        table[22 + k, 33 + k] = table[33 + k, eos] = 0.0
    fixed, trie = FixedProbabilities(table), data.ItemTrie.build(catalogue, eos)
    dataset = SimpleNamespace(prompt=lambda example: "x")
    tokenizer = SimpleNamespace(add_bos=False, encode=lambda text: [prompt], eos_id=eos, pad_id=0)
    window = data.Example(user_id=1, history=(3,), target=target, timestamp=0)
    config = beam.BeamConfig(beam_width=10, length_penalty=1.0)
    record, = study.evaluate_chunk(fixed, dataset, tokenizer, trie, [window], 0, config, lambda done: None)
    assert record["beam_rank"] is None and len(record["beam"]) == 10 and record["exact_searched"]
    assert record["exact_rank"] == 0  # in the exact top-10, pruned by the search: PR@10 counts it


@pytest.mark.parametrize("curve,expected", [
    ({5e-4: 1, 1e-3: 2, 2e-3: 3, 4e-3: 4, 8e-3: 5}, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),  # rising: 2 more, then stop
    ({5e-4: 1, 1e-3: 2, 2e-3: 3, 4e-3: 2}, [5e-4, 1e-3, 2e-3, 4e-3]),                 # falls past the edge
    ({2.5e-4: 3, 5e-4: 4, 1e-3: 2, 2e-3: 1}, [5e-4, 1e-3, 2e-3, 2.5e-4]),             # the low edge wins
    ({5e-4: 1, 1e-3: 3, 2e-3: 2}, [5e-4, 1e-3, 2e-3]),                                 # interior: as it is
])
def test_the_learning_rate_grid_grows_past_a_winning_edge(monkeypatch, curve, expected):
    """msl_grid on a made-up validation curve (NDCG@10 by learning rate): the units it asks for, in order."""
    asked = []

    def train_unit(preset, results, work, name, loss, lr):
        asked.append(lr)
        return {"name": name, "config": {"lr": lr}, "best_valid": {"ndcg@10": curve[lr], "hr@10": 0.0}}
    monkeypatch.setattr(study, "train_unit", train_unit)
    preset = dataclasses.replace(study.PRESETS["cpu"], lr_grid=(5e-4, 1e-3, 2e-3), lr_extensions=2)
    runs = study.msl_grid(preset, Path("results"), Path("work"))
    assert asked == expected and [run["config"]["lr"] for run in runs] == expected


# ------------------------------------------------------------------ the report against a hand-made folder

def write_unit(path: Path, records: list[dict], run: str | None) -> None:
    path.mkdir(parents=True)
    (path / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "unit.json").write_text(json.dumps({"arm": path.name, "run": run, "wall_s": 60.0}))


def write_run(path: Path, loss: str, seconds_per_step: list[float]) -> None:
    """A finished training unit with the given step times (label_tokens / tokens_per_s) and one validation."""
    path.mkdir(parents=True)
    log = [{"step": s + 1, "loss": 1.0, "label_tokens": 100, "tokens_per_s": 100 / t}
           for s, t in enumerate(seconds_per_step)]
    log.append({"epoch": 1, "step": len(log), "valid": {"ndcg@10": 0.1, "hr@10": 0.2}})
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (path / "checkpoint.json").write_text(json.dumps({"last": f"step-{len(seconds_per_step):08d}",
                                                      "best": f"step-{len(seconds_per_step):08d}"}))
    (path / "train_config.json").write_text(json.dumps({"loss": loss, "lr": 1e-3, "lam": 0.6875, "xi": 2.75}))
    (path / "unit.json").write_text(json.dumps({"wall_s": 100.0}))


def record(i: int, beam_rank, exact_rank, token_ranks) -> dict:
    return {"i": i, "user_id": i, "target": i, "beam_rank": beam_rank, "exact_rank": exact_rank,
            "token_ranks": token_ranks}


def by_definition(records: list[dict], name: str, width: int = 10) -> float:
    """One metric of SPEC §5 / Fig. 4 / Fig. 6, straight from its definition, one example at a time."""
    k = int(name.split("@")[1]) if "@" in name else 10
    if name.startswith("hr"):
        return sum(r["beam_rank"] is not None and r["beam_rank"] < k for r in records) / len(records)
    if name.startswith("ndcg"):
        return sum(1 / math.log2(r["beam_rank"] + 2) for r in records
                   if r["beam_rank"] is not None and r["beam_rank"] < k) / len(records)
    if name.startswith("pr"):
        eligible = [r for r in records if r["exact_rank"] is not None and r["exact_rank"] < k]
        return sum(r["beam_rank"] is None for r in eligible) / len(eligible) if eligible else 0.0
    assert name == "nc_rate"
    return sum(max(r["token_ranks"]) < width for r in records) / len(records)


def test_report_numbers_from_a_hand_made_results_folder(tmp_path):
    """The report's metrics, gained/lost counts, bootstrap CIs and cost ratios on 12 made-up test windows,
    each computed here from its definition; targets rank between 5 and 10 too, so K = 5 and K = 10 differ."""
    results = tmp_path / "results"
    results.mkdir()
    preset = {**dataclasses.asdict(study.PRESETS["cpu"]), "bootstrap": 300, "seed": 7}
    (results / "preset.json").write_text(json.dumps(preset))
    ok, bad = [0, 0, 3], [0, 12, 1]             # token ranks: the necessary condition met / violated (B = 10)
    msl = [record(0, 0, 0, ok), record(1, 6, 4, ok), record(2, None, 2, bad), record(3, None, 8, ok),
           record(4, 3, 3, ok), record(5, None, None, bad), record(6, 9, None, ok), record(7, None, None, bad),
           record(8, 1, 1, ok), record(9, None, 6, bad), record(10, 7, 7, ok), record(11, None, None, bad)]
    bear = [record(0, 0, 0, ok), record(1, 2, 1, ok), record(2, 5, 3, ok), record(3, None, 9, bad),
            record(4, None, 2, ok), record(5, None, None, ok), record(6, 8, 6, ok), record(7, None, None, bad),
            record(8, 0, 0, ok), record(9, None, 4, ok), record(10, None, None, bad), record(11, None, 8, ok)]
    sft = [record(i, None, None, bad if i % 3 else ok) for i in range(12)]
    for arm, records, run, seconds in (("msl", msl, "msl-run", [2.0, 4.0, 3.0]),
                                       ("bear", bear, "bear-run", [3.0, 3.3, 6.0]),
                                       ("sft", sft, "sft-run", [2.0, 2.0, 5.0])):
        write_unit(results / "test" / arm, records, run)
        write_run(results / "runs" / run, arm, seconds)
    # BEAR's run searched again under the authors' settings: an evaluation arm, no training cost of its own.
    write_unit(results / "test" / "bear-lp1", bear, "bear-run")
    unit = results / "test" / "bear-lp1" / "unit.json"
    unit.write_text(json.dumps({**json.loads(unit.read_text()), "settings": {"length_penalty": 1.0}}))
    text = study.report(results)

    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    names = ["ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10", "violation_share", "nc_rate"]
    for label, records in (("MSL", msl), ("BEAR", bear), ("SFT", sft)):
        cells = rows[label].strip("| ").split(" | ")[2:2 + len(names)]
        for name, cell in zip(names, cells):
            if name == "violation_share":   # pruned top-10 targets that violate, among the pruned
                pruned = [r for r in records if r["exact_rank"] is not None and r["beam_rank"] is None]
                expected = sum(max(r["token_ranks"]) >= 10 for r in pruned) / len(pruned) if pruned else 0.0
            else:
                expected = by_definition(records, name)
            assert cell == f"{expected:.4f}", (label, name)
    assert by_definition(msl, "hr@5") != by_definition(msl, "hr@10")      # the cutoffs differ here
    assert by_definition(bear, "pr@5") != by_definition(bear, "pr@10")

    # Gained / lost: targets meeting the necessary condition under one arm only.
    meets = {arm: [max(r["token_ranks"]) < 10 for r in records] for arm, records in (("msl", msl), ("bear", bear))}
    gained = sum(b and not m for b, m in zip(meets["bear"], meets["msl"]))
    lost = sum(m and not b for b, m in zip(meets["bear"], meets["msl"]))
    assert (gained, lost) == (4, 2)          # counted by hand: windows 2, 5, 9, 11 and 3, 10
    assert f"- bear against msl: {gained} targets meet the necessary condition only under bear" in text
    assert f"{lost} only under msl" in text

    # The paired bootstrap, re-implemented: the same resampling counts (one multinomial draw of n per resample,
    # from the preset's seed), each resample's metric recomputed from its definition on the expanded sample.
    rng = np.random.default_rng(preset["seed"])
    counts_per_resample = rng.multinomial(12, np.full(12, 1 / 12), size=preset["bootstrap"])
    cells = rows["bear − msl"].strip("| ").split(" | ")[1:]
    for name, cell in zip(study.CI_METRICS, cells):
        deltas = []
        for counts in counts_per_resample:
            sample = [i for i in range(12) for _ in range(counts[i])]
            deltas.append(by_definition([bear[i] for i in sample], name) - by_definition([msl[i] for i in sample],
                                                                                         name))
        low, high = np.percentile(deltas, [2.5, 97.5])
        point = by_definition(bear, name) - by_definition(msl, name)
        assert cell == f"{point:+.4f} [{low:+.4f}, {high:+.4f}]", name

    # Cost per step: the median of each run's step times, relative to SFT's (2.0 s).
    assert "same machine): msl/sft 1.50x, bear/sft 1.65x.\n" in text

    # The test windows: the whole split, or a sample of it where the units record a larger split.
    assert "test on 12 test windows, B = 10" in text
    unit = results / "test" / "msl" / "unit.json"
    unit.write_text(json.dumps({**json.loads(unit.read_text()), "test_split": 40}))
    assert "test on 12 test windows (a seeded sample of the split's 40), B = 10" in study.report(results)


# ------------------------------------------------------------ the exact-search shortcut against brute force

def brute_force_scores(model, prompt: list[int], trie) -> dict[int, float]:
    """log P(title | prompt) of every leaf (distinct title), mask before the softmax, from one full forward per
    title and a trie of Python dicts: no KV cache, no CSR arrays, no search."""
    children: dict[tuple, set] = {}
    for tokens in trie.item_tokens.values():
        for t in range(len(tokens)):
            children.setdefault(tuple(tokens[:t]), set()).add(tokens[t])
    scores = {}
    for item, tokens in sorted(trie.item_tokens.items()):
        leaf = next(node for node, items in trie.leaf_items.items() if item in items)
        if leaf in scores:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(tokens)]))[0, len(prompt) - 1:-1].double()  # (L, V)
        scores[leaf] = sum(float(logits[t, token] - torch.logsumexp(logits[t, sorted(children[tuple(tokens[:t])])],
                                                                     0))
                           for t, token in enumerate(tokens))
    return scores


def test_exact_search_shortcut_against_brute_force(tiny_preset):
    """evaluate_chunk skips the exact top-K search where B returned items already outscore the target. With
    B = K = 10 and every item of a 40-item catalogue as a target of the same prompts, most targets lie outside
    the exact top-10 (the shortcut fires) and exactly 10 per prompt inside it: every record's exact rank must
    equal the rank among ALL titles scored one by one."""
    tokenizer = load_tokenizer(tiny_preset.model)
    dataset = data.load_dataset(data.DataConfig(dataset="office", data_dir=tiny_preset.data_dir,
                                                train_samples=tiny_preset.train_samples))
    trie = data.build_trie(dataset, tokenizer)
    model = load_model(tiny_preset.model, dtype=torch.float32)
    config = beam.BeamConfig(beam_width=10, batch_size=16)
    chunk = [dataclasses.replace(window, target=item) for window in dataset.test[:2] for item in sorted(trie.item_tokens)]
    records = study.evaluate_chunk(model, dataset, tokenizer, trie, chunk, 0, config, lambda done: None)

    oracle = {}
    for window in dataset.test[:2]:
        scores = brute_force_scores(model, data.prompt_tokens(dataset.prompt(window), tokenizer), trie)
        oracle[window.user_id, window.timestamp] = sorted(scores, key=scores.get, reverse=True), scores
    for example, r in zip(chunk, records):
        ranking, scores = oracle[example.user_id, example.timestamp]
        leaf = next(node for node, items in trie.leaf_items.items() if example.target in items)
        assert r["target_log_prob"] == pytest.approx(scores[leaf], abs=1e-4)
        assert r["exact_rank"] == (ranking.index(leaf) if ranking.index(leaf) < 10 else None), example
    skipped = [r for r in records if not r["exact_searched"]]
    eligible = [r for r in records if r["exact_rank"] is not None]
    pruned = [r for r in eligible if r["beam_rank"] is None]
    assert len(skipped) > len(records) / 2 and len(eligible) == 2 * min(10, len(oracle[next(iter(oracle))][0]))
    assert pruned, "no eligible target was pruned: the case does not exercise PR@K"


def test_paper_preset_code_path_with_a_hub_id_two_processes_one_test_unit_and_the_report(tmp_path, tiny_preset):
    """The paper preset's own path at toy sizes: --model a hub id served offline from a cache built here, the
    training unit under torchrun with 2 gloo processes, a test unit that loads the weights the run recorded
    (the hub id at its commit: a folder-only loader fails here), then the report."""
    import shutil
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_preset.model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sizes = {name: getattr(tiny_preset, name) for name in (
        "data_dir", "train_samples", "epochs", "global_batch", "micro_batch", "warmup_steps", "valid_limit",
        "test_limit", "beam_width", "eval_batch", "save_every", "dtype", "bootstrap", "chunk")}
    preset = dataclasses.replace(study.PRESETS["paper"], model="tiny-org/tiny-llama", nproc=2, **sizes)
    results, work = tmp_path / "results", tmp_path / "work"
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import study\n"
            f"from pathlib import Path\n"
            f"preset = study.Preset(**{dataclasses.asdict(preset)!r})\n"
            f"results, work = Path({str(results)!r}), Path({str(work)!r})\n"
            f"study.write_json(results / 'preset.json', study.dataclasses.asdict(preset))\n"
            f"run = study.train_unit(preset, results, work, 'msl-lr0.0001', loss='msl', lr=1e-4)\n"
            f"study.evaluate_unit(preset, results, work, 'msl', run)\n"
            f"print(study.report(results))\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = json.loads((results / "runs" / "msl-lr0.0001" / "train_config.json").read_text())
    assert config["model"] == "tiny-org/tiny-llama" and config["model_revision"] == commit
    log = [json.loads(line) for line in (results / "runs" / "msl-lr0.0001" / "log.jsonl").read_text().splitlines()]
    assert len(log[0]["peak_memory_gb"]) == 2  # one entry per training process
    records = study.read_records(results / "test" / "msl")
    assert len(records) == preset.test_limit
    assert "| msl |" in (results / "report.md").read_text()


# ------------------------------------------------------------ a committed adapter re-evaluated on a fresh clone

def test_a_committed_study_adapter_reproduces_its_ranked_lists_from_the_hub_cache(tmp_path, shared_dir):
    """eval.py --ckpt on a committed Office run, its model the hub id its config records, served offline from the
    hub cache that `smollm2-hf --hf-cache` builds: the committed ranked lists come back, with no weights warning."""
    import os
    import shutil
    results = REPO / "results" / "cpu-office"
    checkpoint = tmp_path / "adapter"  # a copy: eval.py writes its metrics beside the checkpoint
    shutil.copytree(results / "runs" / "bear-lr0.002-tw0.25-xi2.75-w269d1636" / "adapter", checkpoint)
    assert json.loads((checkpoint / "train_config.json").read_text())["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "BEAR_DATA": str(shared_dir / "data" / "amazon")}
    subprocess.run([sys.executable, str(shared_dir / "tools" / "smollm2-hf"), "--hf-cache"], env=env, check=True,
                   capture_output=True, timeout=300)
    # Whole batches of the study's 16 (eval.py's default): a prompt's left padding, so its bf16 bits, depend on
    # the longest prompt of its batch.
    dump, limit = tmp_path / "ranked.jsonl", 16
    done = subprocess.run([sys.executable, "eval.py", "--ckpt", str(checkpoint), "--limit", str(limit), "--dump",
                           str(dump)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr[-3000:]
    ours = [json.loads(line)["beams"] for line in dump.read_text().splitlines()]
    committed = [r["beam"] for r in study.read_records(results / "test" / "bear-tw0.25-xi2.75")[:limit]]
    assert [[b["items"] for b in beams] for beams in ours] == [[items for items, _ in beams] for beams in committed]
    assert [[b["score"] for b in beams] for beams in ours] == \
        [pytest.approx([score for _, score in beams], abs=1e-5) for beams in committed]  # stored to 5 decimals


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    (["--dataset", "book"], "missing dataset folder {root}/Book, and fetching it failed"),
])
def test_study_inputs_give_one_error_line_and_leave_nothing(tmp_path, args, message):
    """--dataset and the data root as train.py has them: a paper dataset missing from --data-dir is fetched (here
    from a closed port: one error line, exit 2, no folder left behind); an unknown name is refused."""
    import os
    import socket
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    root = tmp_path / "data"
    done = subprocess.run([sys.executable, "bench/study.py", *args, "--data-dir", str(root), "--results",
                           str(tmp_path / "results"), "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BEAR_DATA_URL": f"http://127.0.0.1:{port}"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert message.format(root=root) in lines[0]
    assert not root.exists() and not (tmp_path / "results").exists() and not (tmp_path / "work").exists()

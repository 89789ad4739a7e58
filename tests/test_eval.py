"""train.py then eval.py end to end through the command lines, on a tiny random Llama and a small Office slice.

Oracles: transformers + peft (the adapter train.py writes must give their logits), metrics recomputed by hand
from the dumped predictions, and eval.py itself run twice and on two gloo processes (identical results). PR@K and
the violation rate: every title scored by one full forward (the exact top-K) and the necessary condition checked
token by token in plain Python, with every catalogue item a target so that ranks span 0..9 at B = 10.
"""
import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
from test_train import office_slice, run_script, tiny_llama, train_argv  # noqa: E402,F401  (fixtures)

METRIC_KEYS = {"ndcg@5", "ndcg@10", "hr@5", "hr@10"}
PRUNING_KEYS = {"pr@5", "pr@10", "violation_rate"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, office_slice) -> Path:
    """train.py through its command line: 1 epoch of 3 steps (12 windows, global batch 4), BEAR loss. fp32, so
    that sharded and unsharded evaluation (different padding) agree to float rounding."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    result = run_script(["train.py", *train_argv(tiny_llama, office_slice, out, epochs=1, save_every=0,
                                                 dtype="fp32")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3/3" in result.stdout and "left" in result.stdout and "valid NDCG@10" in result.stdout
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_cli_metrics_dump_and_repeatability(trained, tmp_path):
    dump = tmp_path / "preds.jsonl"
    result = run_script(["eval.py", "--ckpt", str(trained), "--pruning", "--dump", str(dump)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NDCG@10" in result.stdout and "HR@5" in result.stdout and "PR@10" in result.stdout
    metrics = json.loads((trained / "metrics.json").read_text())
    assert METRIC_KEYS | PRUNING_KEYS <= set(metrics)
    assert metrics["num_examples"] == 6 and metrics["split"] == "test"
    assert metrics["checkpoint"] == json.loads((trained / "checkpoint.json").read_text())["best"]

    # The dump: one line per test window, B = 4 beams best first; the metrics follow from it by SPEC §5.
    records = read_jsonl(dump)
    assert len(records) == 6
    ranks = []
    for record in records:
        scores = [beam["score"] for beam in record["beams"]]
        assert 1 <= len(scores) <= 4 and scores == sorted(scores, reverse=True)
        ranks.append(next((r for r, beam in enumerate(record["beams"]) if record["target"] in beam["items"]),
                          None))
    for k in (5, 10):
        assert metrics[f"hr@{k}"] == pytest.approx(sum(r is not None and r < k for r in ranks) / 6)
        assert metrics[f"ndcg@{k}"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks
                                                         if r is not None and r < k) / 6)
    assert any(r is not None for r in ranks)  # the slice is small enough for some hits: not a vacuous check

    # Twice, in this process: identical metrics and predictions.
    dump_again = tmp_path / "again.jsonl"
    assert evaluation.main(["--ckpt", str(trained), "--pruning", "--dump", str(dump_again)]) == 0
    assert json.loads((trained / "metrics.json").read_text()) == metrics
    for mine, theirs in zip(read_jsonl(dump_again), records, strict=True):  # (threads differ: float rounding)
        assert mine["target"] == theirs["target"]
        assert [b["items"] for b in mine["beams"]] == [b["items"] for b in theirs["beams"]]
        assert [b["score"] for b in mine["beams"]] == pytest.approx([b["score"] for b in theirs["beams"]],
                                                                    abs=1e-5)

    # Sharded over two gloo processes (3 + 3 windows), all-reduced and gathered: the same numbers.
    dump_two = tmp_path / "two.jsonl"
    result = run_script(["eval.py", "--ckpt", str(trained), "--dump", str(dump_two)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((trained / "metrics.json").read_text())
    assert not PRUNING_KEYS & set(sharded)
    for key in METRIC_KEYS:
        assert sharded[key] == pytest.approx(metrics[key], abs=1e-12)
    assert [r["target"] for r in read_jsonl(dump_two)] == [r["target"] for r in records]
    for mine, theirs in zip(read_jsonl(dump_two), records):
        assert [b["items"] for b in mine["beams"]] == [b["items"] for b in theirs["beams"]]
        assert [b["score"] for b in mine["beams"]] == pytest.approx([b["score"] for b in theirs["beams"]],
                                                                    abs=1e-5)
    assert not list(trained.glob("*.tmp")) and not list(tmp_path.glob("*.tmp"))


def test_trained_adapter_gives_transformers_peft_logits(trained, tiny_llama):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lora import load_adapter
    from model import load_model
    checkpoint = trained / json.loads((trained / "checkpoint.json").read_text())["best"]
    ours = load_model(tiny_llama, dtype=torch.float32)
    load_adapter(ours, checkpoint)
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                          checkpoint).eval()
    b_max = max(p.abs().max().item() for n, p in reference.named_parameters() if "lora_B" in n)
    assert b_max > 1e-3  # trained: B moved away from its zero init
    input_ids = torch.tensor([[1, 504, 3125, 28, 9, 14, 2], [77, 88, 99, 1000, 20000, 30000, 40000]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits  # (2, 7, V)
        got = ours(input_ids).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["missing folder", "not a run", "negative limit", "unknown split"])
def test_eval_bad_inputs_give_one_error_line_and_write_nothing(case, trained, tmp_path, capsys):
    argv = {"missing folder": ["--ckpt", str(tmp_path / "nowhere")],
            "not a run": ["--ckpt", str(tmp_path)],
            "negative limit": ["--ckpt", str(trained), "--limit", "-1"],
            "unknown split": ["--ckpt", str(trained), "--split", "train"]}[case]
    before = {p: p.read_bytes() for p in [*trained.rglob("*"), *tmp_path.rglob("*")] if p.is_file()}
    try:
        code = cli.cli_main(evaluation.main, argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    after = {p: p.read_bytes() for p in [*trained.rglob("*"), *tmp_path.rglob("*")] if p.is_file()}
    assert after == before


# ------------------------------------------------------------- PR@K and the violation rate against brute force
WIDTH = 10  # B = 10: beam ranks reach 5..9, so every metric's @5 and @10 can differ


@pytest.fixture(scope="module")
def every_item_targets(tmp_path_factory, office_slice) -> Path:
    """A data root whose Office test split is the slice's 6 test windows, each repeated with every item of the
    catalogue (44) as its target, window by window (two gloo ranks: windows 0-2 and 3-5). Exactly 10 titles per
    window are in the exact top-10 and the beam returns 10, so targets rank anywhere from 0 to the last."""
    root = tmp_path_factory.mktemp("every_item")
    folder = root / "Office"
    shutil.copytree(office_slice / "Office", folder)
    with open(folder / "test.csv", newline="") as f:
        windows = list(csv.DictReader(f))
    assert len(windows) == 6
    items = sorted(int(item) for item in json.loads((folder / "id2name4Rec.json").read_text()))
    with open(folder / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["user_id", "item_ids", "timestamp"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**window, "item_ids": json.dumps(json.loads(window["item_ids"])[:-1] + [item])}
                         for window in windows for item in items)
    return root


def brute_force(model, prompt: list[int], titles: list[tuple[int, ...]], width: int) -> dict[tuple, tuple]:
    """title tokens -> (log P(title | prompt), whether it breaks the necessary condition), from one full forward
    per title and a trie of Python dicts: no KV cache, no CSR trie, no search. Mask before the softmax; the
    condition at step t is p_t >= beta_t, beta_t the B-th largest probability among the valid next tokens (the
    smallest if fewer), computed over plain Python lists."""
    children: dict[tuple, set] = {}
    for tokens in titles:
        for t in range(len(tokens)):
            children.setdefault(tokens[:t], set()).add(tokens[t])
    result = {}
    for tokens in titles:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(tokens)]),
                           logits_to_keep=len(tokens) + 1).logits[0, :-1]  # (L, V): after prompt + tokens[:t]
        log_p, violates = 0.0, False
        for t, token in enumerate(tokens):
            valid = sorted(children[tokens[:t]])
            values = logits[t, valid].double().tolist()
            top = max(values)
            total = sum(math.exp(v - top) for v in values)
            p = {v: math.exp(value - top) / total for v, value in zip(valid, values)}
            beta = sorted(p.values(), reverse=True)[min(width, len(valid)) - 1]
            log_p += math.log(p[token])
            violates = violates or p[token] < beta
        result[tokens] = (log_p, violates)
    return result


@pytest.fixture(scope="module")
def pruning_case(trained, tiny_llama, every_item_targets):
    """(metrics of eval.evaluate(pruning=True) in this process on the trained adapter with B = 10, the oracle's):
    the oracle takes the beam's ranks from evaluate's records (the search has its own oracles in test_beam.py)
    and everything else from brute force, with transformers + peft as the model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from beam import BeamConfig
    from lora import load_adapter
    from model import load_model
    from tokenizer import load_tokenizer
    checkpoint = trained / json.loads((trained / "checkpoint.json").read_text())["best"]
    tokenizer = load_tokenizer(tiny_llama)
    dataset = data.load_dataset(data.DataConfig(dataset="office", data_dir=str(every_item_targets),
                                                train_samples=12))
    trie = data.build_trie(dataset, tokenizer)
    model = load_model(tiny_llama, dtype=torch.float32).eval()
    load_adapter(model, checkpoint)
    metrics, records = evaluation.evaluate(model, dataset, tokenizer, trie, dataset.test,
                                           BeamConfig(beam_width=WIDTH), cli.Distributed(), pruning=True,
                                           keep_results=True)

    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                          checkpoint).eval()
    titles = sorted(set(trie.item_tokens.values()))
    assert len(titles) > WIDTH + 1
    oracle = {}
    for example in dataset.test:
        prompt = data.prompt_tokens(dataset.prompt(example), tokenizer)
        if tuple(prompt) not in oracle:
            scored = brute_force(reference, prompt, titles, WIDTH)
            ranking = sorted(titles, key=lambda title: scored[title][0], reverse=True)
            for k in (5, 10):  # no near-tie at the cut: the exact top-K is well defined at float rounding
                assert scored[ranking[k - 1]][0] - scored[ranking[k]][0] > 1e-4
            oracle[tuple(prompt)] = ranking, scored

    beam_ranks, exact_ranks, violates = [], [], []
    for example, record in zip(dataset.test, records, strict=True):
        ranking, scored = oracle[tuple(data.prompt_tokens(dataset.prompt(example), tokenizer))]
        title = trie.item_tokens[example.target]
        assert record["target"] == example.target and len(record["beams"]) == WIDTH
        for found in record["beams"]:  # the beam's scores are total log-probs (length penalty 0)
            assert found["score"] == pytest.approx(scored[trie.item_tokens[found["items"][0]]][0], abs=1e-4)
        beam_ranks.append(next((r for r, found in enumerate(record["beams"]) if example.target in found["items"]),
                               None))
        exact_ranks.append(ranking.index(title))
        violates.append(scored[title][1])
    expected = {"num_examples": len(records)}
    for k in (5, 10):  # SPEC §5
        hits = [r for r in beam_ranks if r is not None and r < k]
        expected[f"hr@{k}"] = len(hits) / len(records)
        expected[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in hits) / len(records)
        eligible = [i for i, r in enumerate(exact_ranks) if r < k]
        pruned = [i for i in eligible if beam_ranks[i] is None]
        assert eligible
        expected[f"pr@{k}"] = len(pruned) / len(eligible)
    # The violation rate: the share of the pruned top-10 positives that break the necessary condition. Both
    # halves of the windows (the two ranks below) hold some, so every count must be all-reduced.
    violating = [i for i in pruned if violates[i]]
    half = len(records) // 2
    assert any(i < half for i in violating) and any(i >= half for i in violating), (pruned, violating)
    expected["violation_rate"] = len(violating) / len(pruned)
    return metrics, expected


def test_pruning_rate_and_violation_rate_against_brute_force(pruning_case):
    metrics, expected = pruning_case
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert expected["hr@5"] != expected["hr@10"] and expected["ndcg@5"] != expected["ndcg@10"]
    assert expected["pr@5"] != expected["pr@10"] and 0 < expected["violation_rate"] < 1


def test_pruning_metrics_all_reduced_over_two_processes(pruning_case, trained, every_item_targets, tmp_path):
    """eval.py --pruning on two gloo processes, one half of the windows each (both halves hold pruned and
    violating targets): the all-reduced counts give the one-process metrics and the oracle's."""
    metrics, expected = pruning_case
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = run / json.loads((run / "checkpoint.json").read_text())["best"] / "train_config.json"
    # eval.py searches with the run's recorded B (4 for `trained`): a copy of the run that says B = 10
    config.write_text(json.dumps({**json.loads(config.read_text()), "beam_width": WIDTH}))
    result = run_script(["eval.py", "--ckpt", str(run), "--pruning", "--data-dir", str(every_item_targets)],
                        nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((run / "metrics.json").read_text())
    assert sharded["beam_width"] == WIDTH
    for key, value in expected.items():
        assert sharded[key] == pytest.approx(value, abs=1e-12) and sharded[key] == pytest.approx(metrics[key],
                                                                                               abs=1e-12), key


def test_a_run_moved_to_another_machine_evaluates_with_model_and_warns_on_other_weights(
        trained, tiny_llama, office_slice, tmp_path):
    """A run whose recorded model and data root this machine lacks (as a committed run on a fresh clone):
    `--model` points at the weights and $BEAR_DATA at the data, with the same ranked lists as at home; weights
    whose hash is not the recorded one give one warning line."""
    home = tmp_path / "home.jsonl"
    assert run_script(["eval.py", "--ckpt", str(trained), "--dump", str(home)]).returncode == 0
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    for config_path in moved.rglob("train_config.json"):
        config = json.loads(config_path.read_text())
        assert config["weights_sha256"] and config["model"] == str(tiny_llama)
        config.update(model=str(tmp_path / "elsewhere" / "model"), model_folder=None,
                      data_dir=str(tmp_path / "elsewhere" / "data"))
        config_path.write_text(json.dumps(config))
    env = {"BEAR_DATA": str(office_slice)}
    gone = run_script(["eval.py", "--ckpt", str(moved)], env=env)
    assert gone.returncode == 2 and "no such folder" in gone.stderr.strip().splitlines()[-1]

    dump = tmp_path / "moved.jsonl"
    same = run_script(["eval.py", "--ckpt", str(moved), "--model", str(tiny_llama), "--dump", str(dump)], env=env)
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr[-3000:]
    assert read_jsonl(dump) == read_jsonl(home)

    other = tmp_path / "other_weights"
    shutil.copytree(tiny_llama, other)
    weights = bytearray((other / "model.safetensors").read_bytes())
    weights[-1] ^= 1                                         # one bit of the last weight
    (other / "model.safetensors").write_bytes(bytes(weights))
    warned = run_script(["eval.py", "--ckpt", str(moved), "--model", str(other)], env=env)
    warnings = [line for line in warned.stderr.splitlines() if line.startswith("warning:")]
    assert warned.returncode == 0 and len(warnings) == 1, warned.stderr[-3000:]
    assert str(other) in warnings[0] and "not hold the weights this adapter was trained on" in warnings[0]

"""train.py then eval.py end to end through the command lines, on a tiny random Llama and a small Office slice.

Oracles: transformers + peft (the adapter train.py writes must give their logits), metrics recomputed by hand
from the dumped predictions, and eval.py itself run twice and on two gloo processes (identical results).
"""
import json
import math
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

"""bench/gpu_check.py in its CPU mode, the one CI can run: every check present and passing, in the JSON it writes,
from exactly the files `--pack` copies for a GPU machine (so the recipe in its docstring carries enough), and one
`error:` line with exit 2 for a bad input. The CPU mode runs the GPU mode's code paths with CPU for CUDA, gloo for
NCCL and tiny shapes: about 40 s on 2 busy cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = {"logits_fp32", "beam_search_fp32", "train_fp32_obj31", "train_bf16_bear", "torchrun_train",
          "sigkill_resume", "eval_ckpt_pruning", "process_group"}
PACKED = ["Office/id2name4Rec.json", "Office/test.csv", "Office/train.csv", "Office/valid.csv",
          "llama3/tokenizer.json"]


def gpu_check(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, data_root, llama3_tokenizer_dir):
    """--pack into a fresh folder, then the CPU mode reading only that folder."""
    folder = tmp_path_factory.mktemp("gpu_check")
    packed = gpu_check("--pack", folder / "payload", "--data-dir", data_root, "--tokenizer", llama3_tokenizer_dir)
    assert packed.returncode == 0, packed.stderr[-3000:]
    result = gpu_check("--out", folder / "out", "--device", "cpu", "--data-dir", folder / "payload",
                       "--tokenizer", folder / "payload" / "llama3")
    return folder, result


def test_cpu_mode_runs_every_check_and_all_pass(cpu_run):
    folder, result = cpu_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((folder / "out" / "gpu_check.json").read_text())
    assert report["mode"].startswith("tiny mode") and report["device"] == "CPU" and report["passed"]
    assert set(report["checks"]) == CHECKS
    for name, check in report["checks"].items():
        assert check["pass"], (name, check)
        assert check["compares"] and check["tolerance"] and check["measured"], name
        assert f"{name} " in result.stdout  # the table printed at the end names every check
    # CPU against CPU runs the same kernels: the comparisons must come out exact, and resuming bit for bit.
    assert report["checks"]["logits_fp32"]["detail"]["max_abs_diff"] == 0.0
    assert report["checks"]["beam_search_fp32"]["detail"]["identical"] == 8
    assert report["checks"]["sigkill_resume"]["detail"]["bitwise"]
    assert len(report["checks"]["train_bf16_bear"]["detail"]["losses_device"]) == 3


def test_cpu_mode_measures_both_contenders(cpu_run):
    folder, result = cpu_run
    speed = json.loads((folder / "out" / "gpu_check.json").read_text())["speed"]
    for contender in ("ours", "transformers"):  # transformers + peft are test requirements: both sides ran
        assert speed["training_step"][contender]["tokens_per_s"] > 0
        assert speed["beam_search"][contender]["users_per_s"] > 0
    assert 0 < speed["training_step"]["ours_fraction_of_bf16_matmul"] < 10
    assert speed["beam_search"]["ours"]["syncs"] is None  # counted on CUDA only
    assert "beam search users/s" in result.stdout and "LoRA step tokens/s" in result.stdout


def test_pack_copies_only_what_the_check_reads(cpu_run):
    folder, _ = cpu_run
    files = sorted(p.relative_to(folder / "payload") for p in (folder / "payload").rglob("*") if p.is_file())
    assert [str(p) for p in files] == PACKED
    assert sum((folder / "payload" / p).stat().st_size for p in files) < 16 * 2**20  # the device tool carries 64 MiB


@pytest.mark.parametrize("args,message", [
    (["--out", "x", "--data-dir", "/nonexistent"], "error: --data-dir /nonexistent: Office/ lacks id2name4Rec.json"),
    (["--device", "cpu"], "error: --out is required"),
])
def test_bad_input_gives_one_error_line_and_exit_2(args, message, data_root, llama3_tokenizer_dir):
    result = gpu_check(*args, *(["--data-dir", data_root] if "--data-dir" not in args else []),
                       "--tokenizer", llama3_tokenizer_dir, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]

"""train.py's --micro-batch auto and the peak memory it logs (issue 23), on the tiny random Llama.

Oracles: the run with the chosen micro-batch given by hand (the choice must change no number, bit for
bit), an uninterrupted run (a resume reuses the recorded choice), and a limit nothing fits under (one
error line, nothing written).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
import train  # noqa: E402
from test_train import (adapter, kill_at_step, office_slice, run_killed, run_script,  # noqa: E402,F401
                        tiny_llama, train_argv)

# 16 windows in global batches of 8: 2 steps; a rank's share is 4 windows on 2 processes.
FLAGS = dict(train_samples=16, global_batch=8, epochs=1, save_every=0, valid_limit=1)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def last_adapter(out: Path) -> dict[str, torch.Tensor]:
    return adapter(out / json.loads((out / "checkpoint.json").read_text())["last"])


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, tiny_llama, office_slice):
    out = tmp_path_factory.mktemp("auto") / "run"
    result = run_script(["train.py", *train_argv(tiny_llama, office_slice, out, micro_batch="auto",
                                                 **FLAGS)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_auto_gives_the_adapter_of_the_chosen_micro_batch_given_by_hand(auto_run, tmp_path, tiny_llama,
                                                                        office_slice):
    out, stdout = auto_run
    saved = json.loads((out / "train_config.json").read_text())
    chosen = saved["micro_batch_chosen"]
    assert saved["micro_batch"] == "auto" and 1 <= chosen <= 4 and saved["micro_batch_reason"].endswith("cap 4")
    assert f"micro-batch: auto -> {chosen} ({saved['micro_batch_reason']})" in stdout

    by_hand = tmp_path / "by_hand"
    result = run_script(["train.py", *train_argv(tiny_llama, office_slice, by_hand, micro_batch=chosen,
                                                 **FLAGS)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "micro_batch_chosen" not in json.loads((by_hand / "train_config.json").read_text())
    steps = [[r["loss"], r["grad_norm"]] for r in records(out) if "loss" in r]
    assert len(steps) == 2 and steps == [[r["loss"], r["grad_norm"]] for r in records(by_hand) if "loss" in r]
    mine, theirs = last_adapter(out), last_adapter(by_hand)
    assert mine.keys() == theirs.keys()
    for name in mine:  # the trials left no gradient, optimizer state or random state behind
        assert torch.equal(mine[name], theirs[name]), name


def test_every_step_logs_each_processes_peak_memory(auto_run):
    out, stdout = auto_run
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert len(record["peak_memory_gb"]) == 2 and all(0 < gb < 100 for gb in record["peak_memory_gb"])
    first = next(line for line in stdout.splitlines() if line.startswith("step 1/2 |"))
    assert first.endswith(f"| peak {max(steps[0]['peak_memory_gb']):.2f} GB/process (max of 2)")
    assert "peak" not in next(line for line in stdout.splitlines() if line.startswith("step 2/2 |"))


def test_a_resume_reuses_the_recorded_choice(tmp_path, tiny_llama, office_slice):
    """Every run in a child process of one thread, as the kill tests of test_train.py: the same float sums."""
    flags = dict(FLAGS, micro_batch="auto", global_batch=4, save_every=2)  # 4 steps, a checkpoint at 2
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_script(["train.py", *train_argv(tiny_llama, office_slice, whole, **flags)]).returncode == 0
    argv = train_argv(tiny_llama, office_slice, killed, **flags)
    assert run_killed(argv, kill_at_step(3)).returncode < 0  # SIGKILLed at step 4, step 2's checkpoint kept
    no_trial = "def no_trial(*args):\n    raise AssertionError('a resume must not measure again')\n" \
               "train.choose_micro_batch = no_trial"
    resumed = run_killed(argv + ["--resume"], no_trial)  # the patch forbids a new trial
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    chosen = [json.loads((out / "train_config.json").read_text())["micro_batch_chosen"] for out in (whole, killed)]
    assert chosen[0] == chosen[1]
    assert [r.get("loss") for r in records(killed)] == [r.get("loss") for r in records(whole)]
    mine, theirs = last_adapter(killed), last_adapter(whole)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("limit", ["--max-memory", "the machine"])
def test_nothing_fits_is_one_error_line_with_the_numbers_and_nothing_written(limit, tmp_path, tiny_llama,
                                                                             office_slice, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = dict(FLAGS, micro_batch="auto")
    if limit == "--max-memory":
        flags["max_memory"] = 0.0001  # 100 kB: less than the loaded model
    else:
        monkeypatch.setattr(cli.Memory, "available", lambda self, processes: 0)
    code = cli.cli_main(train.main, train_argv(tiny_llama, office_slice, out, **flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: not even one window per micro-batch fits in memory: a process needs ")
    assert " GB with a 20% margin and has " in err[0] and "a window adds ~" in err[0]
    assert ("use a larger --max-memory" if limit == "--max-memory" else "use fewer processes") in err[0]
    assert not out.exists()


@pytest.mark.parametrize("flags, expected", [
    (dict(micro_batch="auto", normalize="authors"), "error: --normalize authors divides by each micro-batch's"),
    (dict(micro_batch=2, max_memory=4), "error: --max-memory applies to --micro-batch auto only"),
    (dict(micro_batch="auto", max_memory=-1), "error: --max-memory must be >= 0, got -1.0"),
    (dict(micro_batch="some"), "error: argument --micro-batch: invalid auto_or_int value: 'some'"),
])
def test_bad_memory_flags_are_refused_before_anything_is_written(flags, expected, tmp_path, tiny_llama,
                                                                 office_slice, capsys):
    out = tmp_path / "run"
    try:
        code = cli.cli_main(train.main, train_argv(tiny_llama, office_slice, out, **flags))
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(expected), err
    assert not out.exists()

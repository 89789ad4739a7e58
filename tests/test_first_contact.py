"""What a newcomer meets first: models by hub id (offline, from a Hugging Face cache the test builds), progress
lines, and every bad input answered in one `error:` line with exit code 2 and nothing written or changed.

Oracles: the hub cache layout huggingface_hub itself reads (models--org--name/refs/main -> snapshots/<commit>),
with HF_HUB_OFFLINE=1 so that a network access would fail instead of passing silently; the files of a run
compared byte for byte before and after each refused command.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train import (assert_error_in_torchrun_summary, office_slice,  # noqa: E402,F401
                        tiny_llama, train_argv)  # (fixtures)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "tiny-org/tiny-llama"


def run(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def files(folder: Path) -> dict:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_llama) -> Path:
    """A Hugging Face hub cache holding the tiny Llama as `tiny-org/tiny-llama` at COMMIT (refs/main -> COMMIT),
    laid out as huggingface_hub's own downloads leave it."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def offline(cache: Path) -> dict:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_hub_id_trains_and_evaluates_from_the_cache_and_the_checkpoint_pins_its_commit(tmp_path, hub_cache,
                                                                                        office_slice):
    out = tmp_path / "run"
    trained = run(["train.py", *train_argv(HUB_ID, office_slice, out, epochs=1, save_every=0)],
                  env=offline(hub_cache))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"model: {HUB_ID} (revision {COMMIT}" in trained.stdout
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["model"] == HUB_ID and saved["model_revision"] == COMMIT
    assert saved["model_folder"] == str(hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT)
    best = json.loads((out / "checkpoint.json").read_text())["best"]
    assert json.loads((out / best / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID

    # main moves on to a newer commit whose weights are broken: eval.py and --resume must keep the recorded one.
    newer = hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / ("f" * 40)
    newer.mkdir()
    (newer / "config.json").write_text("{ broken")
    (hub_cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("f" * 40)
    try:
        evaluated = run(["eval.py", "--ckpt", str(out), "--limit", "2"], env=offline(hub_cache))
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads((out / "metrics-test-limit2.json").read_text())["num_examples"] == 2
        resumed = run(["train.py", *train_argv(HUB_ID, office_slice, out, epochs=1, save_every=0), "--resume"],
                      env=offline(hub_cache))
        assert resumed.returncode == 0 and "nothing to do" in resumed.stdout, resumed.stderr[-2000:]
    finally:
        (hub_cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(COMMIT)
        shutil.rmtree(newer)


MISSING_HUB = "import sys; sys.modules['huggingface_hub'] = None; sys.path.insert(0, '.'); import cli, train; " \
              "sys.exit(cli.cli_main(train.main, sys.argv[1:]))"


@pytest.mark.parametrize("case", ["uncached offline", "malformed", "no huggingface_hub", "missing folder"])
def test_model_errors_are_one_line_and_write_nothing(case, tmp_path, hub_cache, office_slice):
    out = tmp_path / "run"
    model, expected, launcher = {
        "uncached offline": ("tiny-org/absent", "error: --model tiny-org/absent: not in the local Hugging Face "
                             "cache and the hub cannot be reached ($HF_HUB_OFFLINE is set)", ["train.py"]),
        "malformed": ("org/name/extra", "error: --model org/name/extra: no such folder, and not a hub id",
                      ["train.py"]),
        "no huggingface_hub": (HUB_ID, f"error: --model {HUB_ID} is not a local folder but a hub id: pip install "
                                       "huggingface_hub", ["-c", MISSING_HUB]),
        "missing folder": (str(tmp_path / "nowhere"), f"error: --model {tmp_path / 'nowhere'}: no such folder",
                           ["train.py"]),
    }[case]
    result = run([*launcher, *train_argv(model, office_slice, out)], env=offline(hub_cache))
    one_error_line(result, expected)
    assert not out.exists()


@pytest.mark.parametrize("launcher", [["train.py"], ["-c", MISSING_HUB]], ids=["offline", "no hub"])
def test_an_unknown_dataset_is_refused_before_the_model_is_looked_for(launcher, tmp_path):
    """The cheap check first (issue 19): with no model to be had at all (an empty hub cache offline,
    or no huggingface_hub), an unknown --dataset still gets the data stage's own line."""
    out, empty = tmp_path / "run", tmp_path / "hf_home"
    empty.mkdir()
    no_model = {"HF_HOME": str(empty), "HF_HUB_CACHE": str(empty / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run([*launcher, *train_argv("nosuch/model", tmp_path / "data", out, dataset="nosuch")],
                 env=no_model)
    one_error_line(result, "unknown dataset 'nosuch'; valid datasets: office, book, toy, clothing, "
                           "or the path of a dataset folder")
    assert not out.exists() and not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama, office_slice) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run(["train.py", *train_argv(tiny_llama, office_slice, out, epochs=1)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("flag, value, expected", [
    ("lam", "nan", "error: --lam must be a finite number, got nan"),
    ("lr", "inf", "error: --lr must be a finite number, got inf"),
    ("tau", "inf", "error: --tau must be a finite number, got inf"),
    ("xi", "inf", "error: --xi must be a finite number, got inf"),
    ("lam", "-1", "error: --lam must be >= 0 (0 = the base loss alone), got -1.0"),
    ("lora-dropout", "nan", "error: --lora-dropout must be a finite number, got nan")])
def test_non_finite_or_negative_hyperparameters_are_refused_before_anything_is_written(
        flag, value, expected, tmp_path, tiny_llama, office_slice):
    out = tmp_path / "run"
    one_error_line(run(["train.py", *train_argv(tiny_llama, office_slice, out), f"--{flag}", value]), expected)
    assert not out.exists()


def damage(run_dir: Path, what: str) -> Path:
    last = run_dir / json.loads((run_dir / "checkpoint.json").read_text())["last"]
    path = {"state": last / "trainer_state.pt", "manifest": run_dir / "checkpoint.json",
            "config": last / "train_config.json"}[what]
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return path


@pytest.mark.parametrize("what, command", [("state", "resume"), ("manifest", "resume"), ("manifest", "eval"),
                                           ("config", "eval")])
def test_a_damaged_run_file_is_named_in_one_line(what, command, tmp_path, finished, tiny_llama, office_slice):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    path = damage(run_dir, what)
    before = files(run_dir)
    argv = ["train.py", *train_argv(tiny_llama, office_slice, run_dir, epochs=1), "--resume"] \
        if command == "resume" else ["eval.py", "--ckpt", str(run_dir)]
    one_error_line(run(argv), str(path))
    assert files(run_dir) == before


def test_a_quick_look_leaves_the_test_result_alone_and_the_data_root_is_recorded(tmp_path, tiny_llama,
                                                                                 office_slice):
    """A run trained with $BEAR_DATA evaluates in a shell without it; `--limit` writes beside metrics.json."""
    out = tmp_path / "run"
    env = {"BEAR_DATA": str(office_slice)}
    argv = train_argv(tiny_llama, office_slice, out, epochs=1, save_every=0)
    argv = argv[:argv.index("--data-dir")] + argv[argv.index("--data-dir") + 2:]
    assert run(["train.py", *argv], env=env).returncode == 0
    assert json.loads((out / "train_config.json").read_text())["data_dir"] == str(office_slice)
    without = {k: v for k, v in os.environ.items() if k != "BEAR_DATA"}
    full = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out)], cwd=REPO, env=without,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    result = (out / "metrics.json").read_bytes()
    quick = run(["eval.py", "--ckpt", str(out), "--limit", "1"])
    assert quick.returncode == 0 and (out / "metrics.json").read_bytes() == result
    assert json.loads((out / "metrics-test-limit1.json").read_text())["num_examples"] == 1


def test_ctrl_c_in_eval_is_one_line_and_writes_nothing(finished):
    """SIGINT arrives in the middle of the test search (sent by the process to itself when the search starts)."""
    before = files(finished)
    code = ("import os, signal, sys\nsys.path.insert(0, '.')\nimport beam, cli, eval\noriginal = beam.beam_search\n"
            "def interrupted(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return original(*args, **kwargs)\n"
            "beam.beam_search = interrupted\n"
            # as at a terminal: a shell's background job (nohup ... &) starts with SIGINT ignored
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"sys.exit(cli.cli_main(eval.main, ['--ckpt', {str(finished)!r}]))\n")
    result = run(["-c", code])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 130 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0] == "error: interrupted (Ctrl-C); completed checkpoints and result files are intact"
    assert files(finished) == before


def test_a_missing_paper_dataset_is_fetched_or_explained_in_one_line(tmp_path, tiny_llama):
    """Offline (a closed port as the release URL): one line saying how to point at the data; no folder left."""
    import socket
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    root, out = tmp_path / "data", tmp_path / "run"
    result = run(["train.py", *train_argv(tiny_llama, root, out, dataset="toy")],
                 env={"BEAR_DATA_URL": f"http://127.0.0.1:{port}"})
    one_error_line(result, f"missing dataset folder {root / 'Toy'}, and fetching it failed")
    assert "point --data-dir or $BEAR_DATA at the folder that holds Toy/" in result.stderr
    assert not root.exists() and not out.exists()


def test_under_torchrun_the_error_line_is_in_the_launchers_summary(tmp_path, tiny_llama, office_slice):
    """torchrun ends with its own ~50 lines; the child's one `error:` line is repeated in its Root Cause box."""
    out = tmp_path / "run"
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                  *train_argv(tiny_llama, office_slice, out), "--lam", "-1"])
    assert_error_in_torchrun_summary(result, "error: --lam must be >= 0 (0 = the base loss alone), got -1.0")
    assert not out.exists()

"""The plumbing every command line of the stages shares, written once: files written whole or not at all,
JSON read with a one-line error, the process group of torchrun, progress lines, argparse from a config
dataclass and one-line errors, the resolution of a hub id to a local folder, and the checkpoint manifest.

Nothing here is the method; the stages import it so that each holds its method and little else.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

def read_json(path: Path):
    """A JSON file's content; a missing or corrupt file is one error line that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None



def write_atomically(path, write) -> None:
    """Write `path` whole or not at all: `write(tmp)` fills `<path>.tmp`, which is then renamed over `path` (a
    rename is atomic), so a kill at any moment leaves the old file or the new one, never a half-written one."""
    tmp = Path(str(path) + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path, obj) -> None:
    """NaN/inf are refused (ValueError): they are not JSON."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@dataclass
class Distributed:
    """This process's place among torchrun's (one process: rank 0 of 1). Collectives are no-ops on one process."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            torch_dist.broadcast(tensor, src=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        everything = [None] * self.world
        torch_dist.all_gather_object(everything, items)
        return [item for part in everything for item in part]

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed() -> Distributed:
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs, gloo on CPU); otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch_dist.init_process_group("gloo")
    return Distributed(rank=torch_dist.get_rank(), world=torch_dist.get_world_size(), device=device)


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `count` items: the first count % world ranks get one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class Progress:
    """A progress line for a long pass: `what: done/total unit | rate | ~time left`, printed only once the pass
    has run a few seconds (short passes stay silent). On a terminal it is redrawn in place every second; into a
    log file (stdout not a terminal) it is one line every `every` seconds, so the log stays readable. Rank 0
    only. Call it with the number done so far."""

    def __init__(self, what: str, total: int, unit: str = "windows", every: float = 30.0, rank: int = 0):
        self.what, self.total, self.unit, self.rank = what, total, unit, rank
        self.tty = sys.stdout.isatty()
        self.every = 1.0 if self.tty else every
        self.start = self.last = time.time()
        self.shown = False

    def __call__(self, done: int) -> None:
        now = time.time()
        finished = done >= self.total
        if self.rank != 0 or (now - self.last < self.every and not (finished and self.shown)):
            return
        self.last, self.shown = now, True
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.what}: {done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | ~{format_seconds(left)} left"
        if self.tty:
            print("\r" + line + ("\n" if finished else ""), end="", flush=True)
        else:
            print(line, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (`error: ...`) instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(config_class, description: str) -> argparse.ArgumentParser:
    """argparse from a config dataclass: one --flag per field, help and choices from the field metadata."""
    parser = OneLineErrorParser(description=description)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {int: int, float: float, "int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + " (default: %(default)s)")
    return parser


def cli_main(main, argv=None, stopped_errors=()) -> int:
    """Run `main(argv)`; a bad input (ValueError / FileNotFoundError) or a stopped run prints one line
    `error: ...` (on rank 0 only: every rank meets the same bad input) and exits 2 (1 for a stopped run); Ctrl-C
    prints one line and exits 130, the shell's code for SIGINT (files are only ever replaced whole, so nothing
    half-written is left). Under torchrun the line also goes into the launcher's own failure summary."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, *stopped_errors) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        record_for_torchrun(f"error: {err}")
        return 1 if isinstance(err, stopped_errors) else 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("error: interrupted (Ctrl-C); completed checkpoints and result files are intact", file=sys.stderr,
                  flush=True)
        return 130


def record_for_torchrun(message: str) -> None:
    """torchrun prints each failed child's error file (TORCHELASTIC_ERROR_FILE) in its final summary, where a
    reader looks first; without it the summary says only `error_file: <N/A>` below ~50 lines of launcher
    traceback. The format is torch.distributed.elastic's (what its @record decorator writes)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and int(os.environ.get("RANK", "0")) == 0:
        error = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                "timestamp": str(int(time.time()))}}}
        Path(path).write_text(json.dumps(error))



# -------------------------------------------------------------------------------------------------
# Hub ids

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]   # no .bin/.pth/.gguf


@dataclass(frozen=True)
class ModelSource:
    """Where --model's weights are: `folder` always; `hub_id` and `revision` (the commit) when named by hub id."""
    folder: str
    hub_id: str | None = None
    revision: str | None = None


def resolve_model(name: str, revision: str | None = None) -> ModelSource:
    """--model: a local Hugging Face folder, or a hub id `org/name` (optionally `org/name@revision`).

    A hub id resolves through huggingface_hub (an optional dependency, imported only here): the local cache first,
    touching no network when the files are there, else a download (gated models use the user's HF token as
    usual). `revision` (a run's recorded commit) pins the weights a resumed run or eval.py must use."""
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()))
    repo_id, _, pinned = name.partition("@")
    revision = revision or pinned or None
    if not _HUB_ID.fullmatch(repo_id) or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"--model {name}: no such folder, and not a hub id (org/name or org/name@revision)")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"--model {name} is not a local folder but a hub id: pip install huggingface_hub to fetch "
                         f"it, or give --model DIR (a Hugging Face folder)") from None
    try:   # the cache alone: no request is made when the snapshot is there
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES,
                                                   local_files_only=True)
    except (errors.LocalEntryNotFoundError, errors.HFValidationError, OSError):
        try:
            folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES)
        except errors.GatedRepoError:
            raise ValueError(f"--model {repo_id} is gated: accept its licence on huggingface.co, then "
                             f"`huggingface-cli login` (or set $HF_TOKEN); or give --model DIR") from None
        except errors.RepositoryNotFoundError:
            raise ValueError(f"--model {repo_id}: no such model on the hub (a private one needs "
                             f"`huggingface-cli login`); or give --model DIR") from None
        except errors.RevisionNotFoundError:
            raise ValueError(f"--model {name}: the hub has no revision {revision!r} of {repo_id}") from None
        except (errors.LocalEntryNotFoundError, errors.HFValidationError, errors.HfHubHTTPError, OSError) as err:
            reason = "$HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else type(err).__name__
            raise ValueError(f"--model {name}: not in the local Hugging Face cache and the hub cannot be reached "
                             f"({reason}); run `huggingface-cli download {repo_id}` where online, or give "
                             f"--model DIR") from None
    return ModelSource(str(folder), repo_id, Path(folder).name)   # snapshots/<commit>




# -------------------------------------------------------------------------------------------------
# The checkpoint manifest: train.py writes it last, eval.py and --resume read it

MANIFEST_FILE = "checkpoint.json"   # names the complete checkpoint folders: "last" and "best"


def read_manifest(out: Path) -> dict | None:
    """A run folder's manifest, or None when it has none yet."""
    path = out / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not (out / str(manifest.get("last"))).is_dir():
        raise ValueError(f"{path}: names no checkpoint folder of {out}; the file is damaged")
    return manifest


def resolve_checkpoint(path: Path) -> Path:
    """A run folder -> its best checkpoint; a checkpoint folder -> itself."""
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {path}: no such folder")
    manifest = read_manifest(path)
    if manifest:
        return path / manifest.get("best", manifest["last"])
    if (path / "adapter_config.json").exists() and (path / "train_config.json").exists():
        return path
    raise FileNotFoundError(f"--ckpt {path}: neither a training run (no checkpoint.json) nor a checkpoint "
                            f"folder (adapter_config.json + train_config.json)")

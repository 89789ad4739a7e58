"""Plumbing the stages share, so each holds its method: files, processes, flags, errors, hub ids."""
import argparse
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import sys
import time
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
    """`write(tmp)` fills `<path>.tmp`, renamed over `path`: a kill leaves the old or new file."""
    tmp = Path(str(path) + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path, obj) -> None:  # NaN and inf are not JSON: ValueError
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# --------------------------------- Processes: torchrun's group, or one whose collectives are no-ops
@dataclasses.dataclass
class Distributed:
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

    def print(self, text: str) -> None:  # on rank 0 only: every rank has the same thing to say
        if self.rank == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed() -> Distributed:
    """Under torchrun (WORLD_SIZE > 1) join its group (NCCL on GPUs, gloo on CPU)."""
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
    """[start, stop) of rank's contiguous share; the first count % world ranks get one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# ----------------------------- Memory: what a process may take, and its peak (--micro-batch auto)
GB = 1e9  # memory in logs, messages and --max-memory


class Memory:
    """This process's memory in bytes (the current GPU's allocator, else the resident set):
    `resident()` now, `peak()` since creation or `reset()` (if the kernel cannot reset VmHWM, the
    lifetime peak ru_maxrss: `exact` False, an over-estimate); `available()`: the GPU's free
    memory, or the host's MemAvailable (a cgroup v2 limit's headroom if less) per process."""
    def __init__(self, device: torch.device):
        self.gpu, self.exact = device.type == "cuda", True
        self.reset()

    def reset(self) -> None:
        try:
            if self.gpu:
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
        except OSError:
            self.exact = False

    def resident(self) -> int:
        return torch.cuda.memory_allocated() if self.gpu else _proc("self/status")["VmRSS"]

    def peak(self) -> int:
        if self.gpu:
            return torch.cuda.max_memory_allocated()
        if self.exact:
            return _proc("self/status")["VmHWM"]
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, else KiB

    def available(self, processes: int) -> int:
        if self.gpu:
            return torch.cuda.mem_get_info()[0]
        free, limit = _proc("meminfo")["MemAvailable"], Path("/sys/fs/cgroup/memory.max")
        if limit.is_file() and limit.read_text() != "max\n":
            used = int((limit.parent / "memory.current").read_text())
            free = min(free, int(limit.read_text()) - used)
        return free // processes


def fit_in_memory(trial, cap: int, max_memory: float, dist: Distributed) -> tuple[int, str]:
    """--micro-batch auto: the largest count up to `cap` whose trial(count) (a forward and backward
    on the longest windows) fits in this process's memory, the same on every rank; and why. A trial
    on one window prices a window; a trial at the pick checks it, halved until it fits."""
    memory, processes = Memory(dist.device), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dist.barrier()  # every rank's model is loaded: the memory left is what they share
    baseline, free = memory.resident(), memory.available(processes)
    share = min(baseline + free, max_memory * GB or math.inf)  # this process's, in bytes

    def growth(count: int) -> int:  # the peak memory of a trial over the baseline
        memory.reset()
        trial(count)
        return memory.peak() - baseline

    cost = growth(1)
    fit = int((share - baseline) / (1.2 * max(cost, 1)))  # windows that fit, with a 20% margin
    count = min(dist.gather([min(cap, fit)]))  # the same on every rank
    while count > 0 and not all(dist.gather([baseline + 1.2 * growth(count) <= share])):
        count //= 2
    capped = share < baseline + free
    room = (f"--max-memory {max_memory:g} GB" if capped else
            f"{free / GB:.1f} GB free on the GPU" if memory.gpu else
            f"{free / GB:.2f} GB available per process ({processes} on this host)")
    why = (f"a window adds ~{cost / GB:.2f} GB at its longest{' (coarse)' * (not memory.exact)} to "
           f"{baseline / GB:.2f} GB loaded, {room}")
    if count < 1:
        fix = "a larger --max-memory" if capped else "fewer processes"
        raise ValueError(f"not even one window per micro-batch fits in memory: a process needs "
                         f"{(baseline + 1.2 * cost) / GB:.2f} GB with a 20% margin and has "
                         f"{share / GB:.3g} GB ({why}); use {fix} or a smaller --model")
    return count, f"{why}; cap {cap}"


def _proc(name: str) -> dict[str, int]:
    """/proc/<name>'s `key: N kB` lines, in bytes."""
    if not Path("/proc", name).is_file():
        raise ValueError("--micro-batch auto reads /proc (Linux) or CUDA: give --micro-batch N")
    lines = [line.split() for line in Path("/proc", name).read_text().splitlines()]
    return {line[0][:-1]: int(line[1]) * 1024 for line in lines if line[-1:] == ["kB"]}


class Progress:
    """`what: done/total unit | rate | ~time left` once a pass has run a few seconds, on rank 0:
    redrawn every second on a terminal, a line every `every` seconds into a log file."""
    def __init__(self, what: str, total: int, unit="windows", every=30.0, rank=0):
        self.what, self.total, self.unit, self.rank, self.shown = what, total, unit, rank, False
        self.tty = sys.stdout.isatty()
        self.every = 1.0 if self.tty else every
        self.start = self.last = time.time()

    def __call__(self, done: int) -> None:
        now, finished = time.time(), done >= self.total
        if self.rank != 0 or (now - self.last < self.every and not (finished and self.shown)):
            return
        self.last, self.shown = now, True
        rate = done / max(now - self.start, 1e-9)
        line = f"{self.what}: {done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | " \
               f"~{format_seconds((self.total - done) / rate if rate > 0 else 0.0)} left"
        print("\r" * self.tty + line, end="\n" if finished or not self.tty else "", flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# ------------------------------ The command line: argparse from a config dataclass, one-line errors
def option(default, help: str, **metadata):
    """A config field that build_parser turns into a --flag (metadata: choices, type)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def build_parser(config_class, description: str) -> argparse.ArgumentParser:
    """One --flag per field of the config dataclass, help and choices from the field metadata."""
    parser = argparse.ArgumentParser(description=description)
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {int: int, float: float, "int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=f.metadata.get("type", kind), default=f.default,
                                help=f.metadata["help"] + " (default: %(default)s)",
                                choices=f.metadata.get("choices"))
    return parser


class RunStopped(RuntimeError):
    """A run that cannot go on (a NaN loss): exit 1, the last good checkpoint kept."""


def cli_main(main, argv=None) -> int:
    """Run `main(argv)`. A bad input (ValueError / FileNotFoundError) is one line `error: ...` on
    rank 0 and exit 2, a stopped run exit 1, Ctrl-C exit 130 (the shell's code for SIGINT)."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, RunStopped) as err:
        line, path = f"error: {err}", os.environ.get("TORCHELASTIC_ERROR_FILE")
        if rank0:
            print(line, file=sys.stderr, flush=True)
        if path:  # torchrun's summary shows the first rank to end, any rank (else `error_file: <N/A>`)
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}  # @record's format
            Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
        return 1 if isinstance(err, RunStopped) else 2
    except KeyboardInterrupt:
        if rank0:
            print("error: interrupted (Ctrl-C); completed checkpoints and result files are intact",
                  file=sys.stderr, flush=True)
        return 130


# ---------------------------------------------------------------------------------------- Hub ids
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]  # no .bin


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where --model's weights are: `folder`; `hub_id` and `revision` (the commit) for a hub id."""
    folder: str
    hub_id: str | None = None
    revision: str | None = None


def resolve_model(name: str, revision: str | None = None) -> ModelSource:
    """--model: a Hugging Face folder, or a hub id `org/name[@revision]` from huggingface_hub's
    cache (else downloaded); `revision` (a run's commit) pins the weights of a resume or eval.py."""
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()))
    repo_id, _, pinned = name.partition("@")
    revision = revision or pinned or None
    if not _HUB_ID.fullmatch(repo_id) or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"--model {name}: no such folder, and not a hub id (org/name or "
                                f"org/name@revision)")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"--model {name} is not a local folder but a hub id: pip install "
                         f"huggingface_hub to fetch it, or give --model DIR") from None
    try:  # the cache alone: no request is made when the snapshot is there
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                   allow_patterns=_HUB_FILES, local_files_only=True)
    except (errors.LocalEntryNotFoundError, errors.HFValidationError, OSError):
        try:
            folder = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                       allow_patterns=_HUB_FILES)
        except errors.GatedRepoError:
            raise ValueError(f"--model {repo_id} is gated: accept its licence on the hub, then "
                             f"`huggingface-cli login` or $HF_TOKEN; or give --model DIR") from None
        except errors.RepositoryNotFoundError:
            raise ValueError(f"--model {repo_id}: no such model on the hub (a private one needs "
                             f"`huggingface-cli login`); or give --model DIR") from None
        except errors.RevisionNotFoundError:
            raise ValueError(f"--model {name}: the hub has no revision {revision!r} of {repo_id}") \
                from None
        except (errors.HFValidationError, OSError) as err:  # HTTP and cache errors are OSErrors
            offline = huggingface_hub.constants.HF_HUB_OFFLINE
            reason = "$HF_HUB_OFFLINE is set" if offline else type(err).__name__
            raise ValueError(f"--model {name}: not in the local Hugging Face cache and the hub "
                             f"cannot be reached ({reason}); run `huggingface-cli download "
                             f"{repo_id}` where online, or give --model DIR") from None
    return ModelSource(str(folder), repo_id, Path(folder).name)  # snapshots/<commit>


# ------------------- The checkpoint manifest: train.py writes it last; eval.py and --resume read it
MANIFEST_FILE = "checkpoint.json"  # names the complete checkpoint folders: "last" and "best"


def read_manifest(out: Path) -> dict | None:
    """A run folder's manifest, or None when it has none yet."""
    path = out / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not (out / str(manifest.get("last"))).is_dir():
        raise ValueError(f"{path}: names no checkpoint folder of {out}; the file is damaged")
    return manifest


def write_checkpoint(out: Path, step: int, fill, manifest: dict, best: bool, best_metric) -> dict:
    """`fill(folder)` writes checkpoint step-<step> into a temporary folder renamed into place, then
    the manifest is replaced: a kill at any moment leaves it naming complete folders only. Returns
    the new manifest ("last"; "best" too when `best`); other checkpoints are deleted."""
    name = f"step-{step:08d}"
    tmp, final = out / (name + ".tmp"), out / name
    for stale in (tmp, final):  # leftovers of a killed attempt at this step (never in the manifest)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    os.rename(tmp, final)
    manifest = {**manifest, "last": name, "step": step, **({"best": name} if best else {}),
                "best_metric": best_metric}
    write_json_atomic(out / MANIFEST_FILE, manifest)
    delete_unreferenced_checkpoints(out, manifest)
    return manifest


def delete_unreferenced_checkpoints(out: Path, manifest: dict) -> None:
    for path in out.glob("step-*"):  # and the step-*.tmp of a killed checkpoint write
        if path.name not in (manifest.get("last"), manifest.get("best")):
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: Path) -> Path:
    """A run folder -> its best checkpoint; a checkpoint folder -> itself."""
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {path}: no such folder")
    manifest = read_manifest(path)
    if manifest:
        return path / manifest.get("best", manifest["last"])
    if (path / "adapter_config.json").exists() and (path / "train_config.json").exists():
        return path
    raise FileNotFoundError(f"--ckpt {path}: neither a training run (no checkpoint.json) nor a "
                            f"checkpoint folder (adapter_config.json + train_config.json)")

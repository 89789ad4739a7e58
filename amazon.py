"""Making a dataset folder: the raw Amazon review and meta dumps -> id2name4Rec.json, train / valid /
test.csv and prompt.json (SPEC §6), or the authors' processed release, downloaded. data.py reads such a
folder; `python data.py --raw-reviews ... / --download` run these. The oracle in tests/test_data.py is a
plain re-implementation of the pipeline on a synthetic dump, and a local HTTP server for the download.
"""
import ast
import gzip
import json
import os
import shutil
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

from cli import write_atomically, write_text_atomic
from data import (DATASETS, PROMPT_FILE, DataConfig, dataset_info, default_prompt, escape_quotes,
                  resolve_data_root)

# The authors' release: <url>/<Folder>/<file>. train_10000.csv is their training sample; there is
# no valid.csv, and test_5000.csv (unused) is test.csv or its first 5000 rows.
DEFAULT_DOWNLOAD_URL = "https://raw.githubusercontent.com/Tiny-Snow/BEAR-SIGIR-2026/main/data"
RELEASE_FILES = ("id2name4Rec.json", "train.csv", "train_10000.csv", "test.csv")


# -------------------------------------------------------------------- raw pipeline (SPEC §6)
def read_records(path: Path):
    """Dicts from a JSON-lines file, gzipped or not; 2014 meta lines are Python literals."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"missing file {path}")
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise ValueError(f"{path}:{line_number}: neither JSON nor a Python "
                                     f"literal") from None
            yield record


def clean_title(title) -> str | None:
    """Stripped of whitespace and a trailing " VHS" (2014) / " [VHS]" (2018), quotes escaped;
    None unless longer than 1 character."""
    if not isinstance(title, str):
        return None
    title = title.strip()
    for suffix in (" VHS", " [VHS]"):
        if title.endswith(suffix):
            title = title[:-len(suffix)].strip()
    return escape_quotes(title) if len(title) > 1 else None


def category_of(reviews_path) -> str:
    """reviews_Video_Games_5.json (2014), Video_Games_5.json.gz (2018) -> "video games" ("items"
    if the name has none)."""
    stem = Path(reviews_path).name.split(".")[0].removeprefix("reviews_").removesuffix("_5")
    return " ".join(stem.replace("_", " ").lower().split()) or "items"


def build_from_raw(reviews_path, meta_path, out_dir, k_core: int = 5,
                   max_history: int = 10) -> dict:
    """Amazon 2014 (reviews_<Cat>_5.json, meta_<Cat>.json of Python literals) or 2018
    (<Cat>_5.json.gz, meta_<Cat>.json.gz) dumps -> a dataset folder; returns its statistics.
    prompt.json gets default_prompt(category_of(reviews_path)) unless the folder has one."""
    titles_by_asin = {meta["asin"]: title for meta in read_records(meta_path)
                      if (title := clean_title(meta.get("title"))) is not None and "asin" in meta}
    reviews = [(r["reviewerID"], r["asin"], int(r["unixReviewTime"]))       # (user, asin, time)
               for r in read_records(reviews_path) if r.get("asin") in titles_by_asin and
               r.get("reviewerID") is not None and r.get("unixReviewTime") is not None]
    while True:                                                    # the k-core, users and items
        users, items = Counter(r[0] for r in reviews), Counter(r[1] for r in reviews)
        kept = [r for r in reviews if users[r[0]] >= k_core and items[r[1]] >= k_core]
        if len(kept) == len(reviews):
            break
        reviews = kept
    user_id, item_id, sequences = {}, {}, defaultdict(list)       # ids 1-based, by first appearance
    for user, asin, when in reviews:
        u = user_id.setdefault(user, len(user_id) + 1)
        sequences[u].append((when, item_id.setdefault(asin, len(item_id) + 1)))
    windows = []                                                   # (user, items, target time)
    for user in sorted(sequences):
        events = sorted(sequences[user], key=lambda e: e[0])       # stable: ties keep file order
        ids = [i for _, i in events]
        for i in range(min(max_history, len(ids) - 1), len(ids)):
            windows.append((user, ids[max(i - max_history, 0):i + 1], events[i][0]))
    windows.sort(key=lambda w: w[2])                               # stable, by target time
    cut_valid, cut_test = int(len(windows) * 0.8), int(len(windows) * 0.9)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", windows[:cut_valid]), ("valid", windows[cut_valid:cut_test]),
                       ("test", windows[cut_test:])):
        lines = ["user_id,item_ids,timestamp"] + [f'{u},"{items}",{t}' for u, items, t in part]
        write_text_atomic(out_dir / f"{name}.csv", "\n".join(lines) + "\n")
    id2name = {str(i): titles_by_asin[asin] for asin, i in item_id.items()}
    write_text_atomic(out_dir / "id2name4Rec.json", json.dumps(id2name, ensure_ascii=False,
                                                               indent=4))
    if not (out_dir / PROMPT_FILE).exists():
        prompt = json.dumps(default_prompt(category_of(reviews_path)), ensure_ascii=False, indent=4)
        write_text_atomic(out_dir / PROMPT_FILE, prompt + "\n")
    return {"users": len(user_id), "items": len(item_id), "interactions": len(reviews),
            "windows": len(windows)}


# ------------------------------------------------------------ download of the authors' files
def download_dataset(config: DataConfig, base_url: str | None = None,
                     timeout: float = 30.0) -> list[str]:
    """Fetch the paper dataset's missing RELEASE_FILES, <base_url>/<Folder>/<file>, into
    <data root>/<Folder>, each whole or not at all; files absent from the release are reported."""
    import http.client
    info = dataset_info(config.dataset)
    folder = resolve_data_root(config.data_dir) / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    base_url = (base_url or os.environ.get("BEAR_DATA_URL") or DEFAULT_DOWNLOAD_URL).rstrip("/")

    def fetch(url: str, tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            expected, size = response.headers.get("Content-Length"), 0
            while chunk := response.read(1 << 16):
                size += out.write(chunk)
        if expected is not None and size != int(expected):
            raise ConnectionError(f"connection cut after {size} of {expected} bytes of {url}")

    log = []
    for name in RELEASE_FILES:
        dest, url = folder / name, f"{base_url}/{info.folder}/{name}"
        if dest.is_file():
            log.append(f"{dest}: already present")
            continue
        try:
            write_atomically(dest, lambda tmp: fetch(url, tmp))
            log.append(f"{dest}: {dest.stat().st_size} bytes from {url}")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise ConnectionError(f"download of {url} failed: HTTP {e.code} "
                                      f"{e.reason}") from None
            log.append(f"{dest}: not in the release ({url} answers 404)")
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise ConnectionError(f"cannot download {url} ({reason}); offline? copy the authors' "
                                  f"files into {folder} by hand") from None
    return log


def fetch_if_missing(dataset: str, data_dir: str, dist) -> None:
    """A paper dataset missing from the data root: rank 0 fetches the authors' release, or says in
    one line how to point at the data, leaving no folder; the others wait."""
    info = DATASETS.get(dataset.lower())
    folder = info and Path(data_dir) / info.folder
    if dist.rank == 0 and folder and not folder.exists():
        created = [path for path in (folder.parent, folder) if not path.exists()]
        dist.print(f"{folder} is missing: fetching the authors' release "
                   f"(python data.py --download)")
        try:
            dist.print("\n".join(download_dataset(DataConfig(dataset=dataset,  # a line per file
                                                               data_dir=data_dir))))
        except ConnectionError as err:
            for path in reversed(created):
                shutil.rmtree(path, ignore_errors=True)
            raise ValueError(f"missing dataset folder {folder}, and fetching it failed ({err}); "
                             f"point --data-dir or $BEAR_DATA at the folder that holds "
                             f"{folder.name}/") from None
    dist.barrier()

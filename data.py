"""Data stage: the paper's four Amazon datasets (or one of your own), from review files to the tensors the losses
and the beam search use.

Read top to bottom: datasets and the prompt (SPEC §1), reading the processed CSV files and the splits, dataset
statistics, the item trie (SPEC §2), tokenising examples, batching, the raw Amazon pipeline (SPEC §6), the
download of the authors' processed files, the plumbing every stage's command line shares (atomic files, the
torchrun process group, progress lines, one-line errors), and the CLI. The oracles in tests/test_data.py: the
authors' own train_10000.csv row for row, a brute-force trie over Python lists, HF `tokenizers`, and a plain
re-implementation of the raw pipeline.

Shapes: I items, L a title's target tokens (sum L over all items), E trie edges, N trie nodes queried (one per
label position), M valid (node, token) pairs, b windows in a batch, T the padded sequence length.

The CLI:

    python data.py --dataset office --stats [--tokenizer MODEL_DIR]      # Table 1 numbers, splits, trie, checks
    python data.py --dataset toy --download                             # fetch the authors' processed files
    python data.py --raw-reviews reviews_Video_Games_5.json --raw-meta meta_Video_Games.json --out DIR
    python data.py --dataset DIR --stats                                # a dataset of your own: any folder
"""
import ast
import csv
import dataclasses
import gzip
import json
import os
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cli import build_parser, read_json, write_atomically, write_text_atomic

# ----------------------------------------------------------------------------------------------------------------
# Datasets and the prompt (SPEC §1)


@dataclass(frozen=True)
class DatasetInfo:
    folder: str            # sub-folder of the data root; for a dataset of your own, the folder's absolute path
    instruction: str
    prefix: str


DATASETS: dict[str, DatasetInfo] = {
    "office": DatasetInfo(
        "Office",
        "Given a list of office products the user has used before, please recommend a new office product that "
        "the user likes to the user.",
        "The user has used the following office products before:"),
    "book": DatasetInfo(
        "Book",
        "Given a list of books the user has read before, please recommend a new book that the user likes to the user.",
        "The user has read the following books before:"),
    "toy": DatasetInfo(
        "Toy",
        "Given a list of toys the user has played before, please recommend a new toy that the user likes to the user.",
        "The user has played the following toys before:"),
    "clothing": DatasetInfo(
        "Clothing",
        "Given a list of clothing the user has worn before, please recommend a new clothing that the user likes to "
        "the user.",
        "The user has worn the following clothing before:"),
}

# One template for training and inference. The authors' code has stray whitespace that differs between the two
# (a trailing space after "request." in training, two at inference, "\n " after the titles); we use the clean form.
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n"
          "### Input:\n{prefix} {titles}\n\n"
          "### Response:\n")

# A dataset of your own carries its wording beside its data: {"instruction": ..., "prefix": ...}.
PROMPT_FILE = "prompt.json"

# Paper Table 1 (users, items, interactions), printed beside our reconstruction by --stats.
TABLE1 = {"office": (4895, 2414, 53149), "book": (16559, 6344, 151928),
          "toy": (19124, 11758, 165247), "clothing": (39230, 22948, 277534)}

# The BEAR authors' release: <url>/<Folder>/<file> for the four folders above. train_10000.csv is their training
# sample; there is no valid.csv, and test_5000.csv (unused) is test.csv or its first 5000 rows.
DEFAULT_DOWNLOAD_URL = "https://raw.githubusercontent.com/Tiny-Snow/BEAR-SIGIR-2026/main/data"
RELEASE_FILES = ("id2name4Rec.json", "train.csv", "train_10000.csv", "test.csv")


def dataset_info(name: str) -> DatasetInfo:
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[key]


def default_prompt(category: str) -> dict[str, str]:
    """The paper's wording for a category of your own: "video games" -> "Given a list of video games the user has
    used before, please recommend a new video game that the user likes to the user." The singular drops a plural
    ending (-ies -> -y, -s -> nothing) from the last word of each "and" part ("toys and games" -> "toy and
    game"); where that reads badly, edit the prompt.json it goes into."""
    def singular(phrase: str) -> str:
        head, _, last = phrase.rpartition(" ")
        if last.endswith("ies"):
            last = last[:-3] + "y"
        elif last.endswith("s") and not last.endswith("ss"):
            last = last[:-1]
        return f"{head} {last}".strip()

    plural = " ".join(category.lower().split())
    one = " and ".join(singular(part) for part in plural.split(" and "))
    return {"instruction": f"Given a list of {plural} the user has used before, please recommend a new {one} that "
                           f"the user likes to the user.",
            "prefix": f"The user has used the following {plural} before:"}


def target_text(title: str) -> str:
    return '"' + title + '"'


def build_prompt(info: DatasetInfo, history_titles: Sequence[str]) -> str:
    titles = ", ".join(target_text(t) for t in history_titles)
    return PROMPT.format(instruction=info.instruction, prefix=info.prefix, titles=titles)


# ----------------------------------------------------------------------------------------------------------------
# Processed files and splits


@dataclass
class DataConfig:
    dataset: str = field(default="", metadata={"help": "office | book | toy | clothing, or the path of a dataset "
                                                       "folder of your own"})
    data_dir: str | None = field(default=None, metadata={"help": "data root; None: $BEAR_DATA, else ./data"})
    train_samples: int = field(default=10000, metadata={"help": "the paper trains on sample(n=10000, "
                                                                "random_state=42) of train; <= 0: all of train"})
    seed: int = field(default=42, metadata={"help": "seed of the training sample"})
    max_history: int = field(default=10, metadata={"help": "history titles per prompt"})


@dataclass(frozen=True)
class Example:
    user_id: int
    history: tuple[int, ...]
    target: int
    timestamp: int                # time of the target interaction


@dataclass
class Dataset:
    info: DatasetInfo
    titles: dict[int, str]
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    notes: list[str]              # how the splits were made where the folder lacks a file (print these)

    def prompt(self, example: Example) -> str:
        return build_prompt(self.info, [self.titles[i] for i in example.history])


def resolve_data_root(data_dir: str | None) -> Path:
    """--data-dir, else $BEAR_DATA, else ./data (it need not exist yet: --download creates it)."""
    return Path(data_dir or os.environ.get("BEAR_DATA") or "./data").expanduser()


def locate_dataset(name: str, data_dir: str | None) -> tuple[DatasetInfo, Path]:
    """A paper dataset by name (any case) is <data root>/<Folder> with the wording of SPEC §1. Any other name is
    the path of a dataset folder of your own, worded by its prompt.json (so a folder named like a paper dataset is
    still found by name under the data root; write ./office for a folder of your own called office)."""
    if name.lower() in DATASETS:
        info = DATASETS[name.lower()]
        folder = resolve_data_root(data_dir) / info.folder
        if not folder.is_dir():
            fetch = f"python data.py --dataset {name.lower()} --download"
            if data_dir:
                fetch += f" --data-dir {data_dir}"
            raise FileNotFoundError(f"missing dataset folder {folder}: point --data-dir or $BEAR_DATA at the folder "
                                    f"that holds {info.folder}/, or fetch it: {fetch}")
        return info, folder
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}, or the path of a dataset "
                         f"folder (id2name4Rec.json, train.csv, test.csv, {PROMPT_FILE})")
    path = folder / PROMPT_FILE
    if not path.is_file():
        hint = ""
        if folder.name.lower() in DATASETS:   # probably the paper's dataset, given by its path
            hint = f"; for the paper's {folder.name}, give --dataset {folder.name.lower()} --data-dir " \
                   f"{folder.resolve().parent}"
        raise FileNotFoundError(f'missing file {path}: a dataset folder of your own needs its prompt wording, '
                                f'{{"instruction": "...", "prefix": "..."}} (the raw pipeline writes one){hint}')
    prompt = read_json(path)
    if not (isinstance(prompt, dict) and sorted(prompt) == ["instruction", "prefix"] and
            all(isinstance(text, str) and text.strip() for text in prompt.values())):
        raise ValueError(f'{path}: want {{"instruction": "...", "prefix": "..."}}, two non-empty strings, '
                         f'got {json.dumps(prompt)[:200]}')
    return DatasetInfo(str(folder.resolve()), prompt["instruction"], prompt["prefix"]), folder


def read_titles(path: Path) -> dict[int, str]:
    """id2name4Rec.json: {"<item id>": "<title>", ...}."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: want a JSON object {{"<item id>": "<title>", ...}}, got a {type(raw).__name__}')
    titles = {}
    for key, title in raw.items():
        # Plain decimal ids only: "01" or " 1" would silently alias item 1.
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):
            raise ValueError(f"{path}: key {key!r} is not an item id (a decimal integer)")
        if not isinstance(title, str):
            raise ValueError(f"{path}: title of item {key} is not a string: {json.dumps(title)[:100]}")
        # A '"' inside a title would close the quoted target early, so the prompt could not be parsed back.
        if '"' in title:
            raise ValueError(f"{path}: title of item {key} contains a literal '\"': {title!r}")
        titles[int(key)] = title
    return titles


def read_windows(path: Path, titles: dict[int, str], max_history: int = 10) -> list[Example]:
    """One Example per CSV row: user_id, item_ids (a Python-list string, last = target), timestamp; extra columns
    are ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = [c for c in ("user_id", "item_ids", "timestamp") if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}")
        col_user, col_items, col_time = (header.index(c) for c in ("user_id", "item_ids", "timestamp"))
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                try:
                    items = json.loads(row[col_items])   # "[1, 2, 3]" is valid JSON and 10x faster than literal_eval
                    user, timestamp = int(row[col_user]), int(row[col_time])
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{where}: malformed row ({e.__class__.__name__}: {e})") from None
                if len(row) != len(header) or not isinstance(items, list) or \
                        not all(type(i) is int for i in items):
                    raise ValueError(f"{where}: malformed row (want {len(header)} fields and a list of item ids)")
                if len(items) < 2:
                    raise ValueError(f"{where}: empty history (item_ids needs a history item before the target)")
                unknown = [i for i in items if i not in titles]
                if unknown:
                    raise ValueError(f"{where}: item id {unknown[0]} is not in id2name4Rec.json")
                examples.append(Example(user, tuple(items[:-1][-max_history:]), items[-1], timestamp))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed row ({e})") from None
    return examples


def sample_indices(num_rows: int, n: int, seed: int) -> np.ndarray:
    """Row indices of pandas' DataFrame.sample(n, random_state=seed): pandas draws
    RandomState(seed).choice(num_rows, n, replace=False), which is permutation(num_rows)[:n]. So sample(m) is the
    first m rows of sample(n) for m <= n."""
    if n > num_rows:
        raise ValueError(f"--train-samples {n} exceeds the {num_rows} training windows")
    return np.random.RandomState(seed).permutation(num_rows)[:n]


def chronological_holdout(rows: list[Example], parts: int = 9) -> set[int]:
    """Positions of the chronologically last len(rows) // parts rows (a stable sort, so ties keep file order)."""
    by_time = sorted(range(len(rows)), key=lambda i: rows[i].timestamp)
    return set(by_time[len(rows) - len(rows) // parts:])


def sample_files(folder: Path) -> list[Path]:
    """The authors' training samples train_<N>.csv in the folder, smallest N first."""
    found = [p for p in folder.glob("train_*.csv") if p.stem[len("train_"):].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[len("train_"):]))


def load_dataset(config: DataConfig) -> Dataset:
    """The splits of a dataset folder. The training pool is the first of these that the folder has:
      1. train.csv, the full training split, sampled with --seed (with seed 42 this is the authors'
         train_10000.csv row for row, tested on Office, Book and Clothing); the authors' release has it for all
         four datasets;
      2. train_<N>.csv, an authors' seed-42 sample, used as is: the smallest N that covers --train-samples, else
         the largest (../shared's Toy has only train_5000.csv).
    Validation is valid.csv, else the chronologically last 1/9 of the training pool, which is then never trained
    on. test.csv is used in full. `notes` says which of these choices were made."""
    if config.max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {config.max_history}")
    info, folder = locate_dataset(config.dataset, config.data_dir)
    titles = read_titles(folder / "id2name4Rec.json")
    read = lambda name: read_windows(folder / name, titles, config.max_history)  # noqa: E731
    notes = []

    if (folder / "train.csv").is_file():
        full_train = read("train.csv")
        source = "train.csv"
    else:
        # The sample files are pandas samples of the full train, so their first m rows are exactly sample(m) (see
        # sample_indices).
        ready = sample_files(folder)
        if not ready:
            raise FileNotFoundError(f"missing file {folder / 'train.csv'} (and no train_<N>.csv)")
        fits = [p for p in ready if int(p.stem[len("train_"):]) >= config.train_samples > 0]
        path = fits[0] if fits else ready[-1]
        full_train, source = read(path.name), path.name
        notes.append(f"{folder.name}: no train.csv; using {path.name} as is (the first rows of the authors' seed-42 "
                     f"sample of the full train, i.e. exactly sample(m) for m <= its rows)")

    if (folder / "valid.csv").is_file():
        valid, held_out = read("valid.csv"), set()
    else:
        # The authors' release has no valid split. Hold out the chronologically last 1/9 of train so that
        # train : valid : test stays about 8 : 1 : 1 and model selection never looks at the test set.
        held_out = chronological_holdout(full_train)
        valid = [row for i, row in enumerate(full_train) if i in held_out]
        notes.append(f"{folder.name}: no valid.csv; valid = the chronologically last 1/9 of {source} "
                     f"({len(valid)} windows), removed from the training pool")

    if config.train_samples <= 0:
        order = range(len(full_train))
    elif source == "train.csv":
        order = sample_indices(len(full_train), config.train_samples, config.seed)
    else:
        order = range(min(config.train_samples, len(full_train)))
        if config.seed != 42:
            raise ValueError(f"{source} is a seed-42 sample; it cannot give a sample with seed {config.seed}")
        if config.train_samples > len(full_train):
            notes.append(f"{folder.name}: asked for {config.train_samples} training windows, {source} has only "
                         f"{len(full_train)}; using all of them")
    # The sample is drawn from the FULL train (so it is the authors' train_10000.csv row for row) and the held-out
    # rows are then dropped from it, which leaves about 8/9 of n windows but never trains on a validation window.
    train = [full_train[i] for i in order if i not in held_out]
    if held_out and config.train_samples > 0:
        notes.append(f"{folder.name}: the training sample is the sample of {source} minus its held-out rows: "
                     f"{len(train)} of {len(order)} windows")
    test = read("test.csv")
    return Dataset(info, titles, train, valid, test, notes)


# ----------------------------------------------------------------------------------------------------------------
# Statistics (paper Table 1)


def dataset_statistics(config: DataConfig) -> dict:
    """Users, items and interactions reconstructed from every released window. A user's windows are
    items[max(i-10,0):i+1] for i from min(10, n-1) to n-1, so the user has n = (longest window - 1) + #windows
    interactions (exact when all the user's windows are released)."""
    _, folder = locate_dataset(config.dataset, config.data_dir)
    titles = read_titles(folder / "id2name4Rec.json")
    files = [p for p in sorted(folder.glob("*.csv")) if p.stem in ("train", "valid", "test")]
    if not (folder / "train.csv").is_file():
        files += sample_files(folder)[-1:]
    rows = {p.name: read_windows(p, titles, max_history=10) for p in files}
    windows_per_user, longest = Counter(), Counter()
    for examples in rows.values():
        for e in examples:
            windows_per_user[e.user_id] += 1
            longest[e.user_id] = max(longest[e.user_id], len(e.history) + 1)
    interactions = sum(longest[u] - 1 + windows_per_user[u] for u in windows_per_user)
    return {"name": folder.name, "users": len(windows_per_user), "items": len(titles),
            "unique_titles": len(set(titles.values())), "interactions": interactions,
            "file_rows": {name: len(r) for name, r in rows.items()},
            "complete": all((folder / f"{s}.csv").is_file() for s in ("train", "valid", "test"))}


# ----------------------------------------------------------------------------------------------------------------
# The item trie (SPEC §2)


class ItemTrie:
    """Prefix tree over every item's target tokens encode('"' + title + '"') + [eos], stored as CSR tensors so
    that the valid next tokens of N prefixes come out of a few vectorised torch ops (no per-position Python)."""

    root = 0

    def __init__(self, child_ptr, child_token, child_node, leaf_items, item_tokens, item_path_ptr, item_path_nodes,
                 item_row):
        self.child_ptr, self.child_token, self.child_node = child_ptr, child_token, child_node
        self.num_nodes = len(child_ptr) - 1
        self.leaf_items: dict[int, frozenset[int]] = leaf_items
        self.item_tokens: dict[int, tuple[int, ...]] = item_tokens
        self._item_path_ptr, self._item_path_nodes, self._item_row = item_path_ptr, item_path_nodes, item_row
        # Edges are sorted by (parent, token), so parent * key_base + token is a sorted key for searchsorted.
        self._key_base = int(child_token.max()) + 1 if len(child_token) else 1
        parent = torch.repeat_interleave(torch.arange(self.num_nodes), child_ptr.diff())  # (E,)
        self._edge_key = parent * self._key_base + child_token                              # (E,) ascending
        # Strictly ascending: step()'s searchsorted needs the order, and the masked losses (loss.py) would count a
        # repeated (row, token) pair of valid_next twice. Checked once here rather than on every loss call.
        if not bool((self._edge_key[1:] > self._edge_key[:-1]).all()):
            raise ValueError("trie edges must be sorted by (parent, token) and contain no duplicates")

    @classmethod
    def build(cls, item_tokens: dict[int, Sequence[int]], eos_id: int) -> "ItemTrie":
        items = sorted(item_tokens)
        seqs = [tuple(int(t) for t in item_tokens[i]) for i in items]
        for item, seq in zip(items, seqs):
            if not seq or seq[-1] != eos_id or eos_id in seq[:-1]:
                raise ValueError(f"item {item}: target tokens must end with eos {eos_id} and contain it only there")
        if not seqs:
            raise ValueError("cannot build an item trie without items")
        lengths = np.array([len(s) for s in seqs])                                  # (I,)
        path_ptr = np.zeros(len(items) + 1, np.int64)
        path_ptr[1:] = np.cumsum(lengths)
        rows = np.arange(len(seqs)).repeat(lengths)                                 # (sum L,)
        columns = np.arange(path_ptr[-1]) - path_ptr[:-1].repeat(lengths)           # (sum L,)
        tokens = np.full((len(seqs), lengths.max()), -1, np.int64)                  # (I, L) padded with -1
        tokens[rows, columns] = np.concatenate(seqs)
        key_base = int(tokens.max()) + 1
        # Level by level: the depth-(d+1) nodes are the distinct (parent, token) pairs at depth d, numbered in sorted
        # order, so node ids run breadth first and every node's children are contiguous and sorted by token.
        node_before = np.zeros((len(seqs), tokens.shape[1] + 1), np.int64)        # (I, L+1) node after d tokens
        parents, child_tokens, next_id = [], [], 1
        for d in range(tokens.shape[1]):
            alive = np.nonzero(lengths > d)[0]
            pairs, inverse = np.unique(node_before[alive, d] * key_base + tokens[alive, d], return_inverse=True)
            node_before[alive, d + 1] = next_id + inverse
            parents.append(pairs // key_base)
            child_tokens.append(pairs % key_base)
            next_id += len(pairs)
        parent = np.concatenate(parents)
        child_ptr = np.zeros(next_id + 1, np.int64)
        child_ptr[1:] = np.cumsum(np.bincount(parent, minlength=next_id))
        leaf_items = defaultdict(set)
        for row, item in enumerate(items):
            leaf_items[int(node_before[row, lengths[row]])].add(item)
        path_nodes = node_before[rows, columns]                                    # (sum L,) node before each token
        return cls(torch.from_numpy(child_ptr), torch.from_numpy(np.concatenate(child_tokens)),
                   torch.arange(1, next_id), {n: frozenset(s) for n, s in leaf_items.items()},
                   dict(zip(items, seqs)), path_ptr, torch.from_numpy(path_nodes), {i: r for r, i in enumerate(items)})

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node along each token, or -1 (also for node -1 or a token outside the trie)."""
        nodes, tokens = nodes.long(), tokens.long()
        query = nodes * self._key_base + tokens                                   # (N,)
        index = torch.searchsorted(self._edge_key, query).clamp(max=len(self._edge_key) - 1)   # (N,)
        found = (self._edge_key[index] == query) & (nodes >= 0) & (tokens >= 0) & (tokens < self._key_base)
        return torch.where(found, self.child_node[index], torch.full_like(nodes, -1))

    def valid_next(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """COO pairs (row, token): row i lists every valid next token after nodes[i] (a leaf has none)."""
        nodes = nodes.long()
        if len(nodes) and (nodes.min() < 0 or nodes.max() >= self.num_nodes):
            raise ValueError(f"trie node out of range [0, {self.num_nodes}): {nodes.min().item()}..{nodes.max().item()}")
        start = self.child_ptr[nodes]                                             # (N,)
        count = self.child_ptr[nodes + 1] - start                                 # (N,)
        row = torch.repeat_interleave(torch.arange(len(nodes)), count)            # (M,)
        # Pair j of row i is edge start[i] + (j - first pair of row i); the shift is constant within a row.
        shift = start - (count.cumsum(0) - count)                                 # (N,)
        edge = torch.arange(len(row)) + shift[row]                                # (M,)
        return row, self.child_token[edge]

    def path(self, tokens: Sequence[int]) -> list[int]:
        """Node BEFORE each token (len = len(tokens)); raises if the tokens leave the trie."""
        nodes, node = [], self.root
        for position, token in enumerate(tokens):
            nodes.append(node)
            node = int(self.step(torch.tensor([node]), torch.tensor([int(token)]))[0])
            if node < 0:
                raise ValueError(f"token {token} at position {position} is not a valid continuation in the trie")
        return nodes

    def item_path(self, item: int) -> torch.Tensor:
        """Nodes before each of the item's target tokens, (len(item_tokens[item]),), precomputed at build."""
        row = self._item_row[item]
        return self._item_path_nodes[self._item_path_ptr[row]:self._item_path_ptr[row + 1]]


# ----------------------------------------------------------------------------------------------------------------
# Tokenising examples


def item_target_tokens(titles: dict[int, str], tokenizer) -> dict[int, tuple[int, ...]]:
    """encode('"' + title + '"') + [eos] per item id: what the model generates after the prompt (SPEC §2)."""
    by_title = {}
    for title in set(titles.values()):
        by_title[title] = tuple(tokenizer.encode(target_text(title))) + (tokenizer.eos_id,)
    return {item: by_title[title] for item, title in titles.items()}


def build_trie(dataset: Dataset, tokenizer) -> ItemTrie:
    return ItemTrie.build(item_target_tokens(dataset.titles, tokenizer), tokenizer.eos_id)


def prompt_tokens(prompt: str, tokenizer) -> list[int]:
    if tokenizer.add_bos and tokenizer.bos_id is None:
        raise ValueError("the tokenizer asks for a BOS token but has no bos_id")
    return ([tokenizer.bos_id] if tokenizer.add_bos else []) + list(tokenizer.encode(prompt))


@dataclass(frozen=True)
class EncodedExample:
    input_ids: torch.Tensor       # (L,) int32: [BOS] + encode(prompt) + target tokens (title in quotes + eos)
    prompt_length: int            # tokens before the first target token (BOS included)
    target_nodes: torch.Tensor    # (L - prompt_length,) trie node before each target token
    target: int


def encode_examples(examples: Sequence[Example], dataset: Dataset, tokenizer, trie: ItemTrie) -> list[EncodedExample]:
    """The prompt and the target are tokenised separately, exactly as the beam search sees them at inference
    (encode(prompt), then trie tokens); tokenization_mismatches() checks this equals tokenising them jointly."""
    encoded = []
    for e in examples:
        prompt = prompt_tokens(dataset.prompt(e), tokenizer)
        target = trie.item_tokens[e.target]
        ids = torch.tensor(prompt + list(target), dtype=torch.int32)             # int32 halves the memory
        encoded.append(EncodedExample(ids, len(prompt), trie.item_path(e.target), e.target))
    return encoded


def tokenization_mismatches(examples: Sequence[Example], dataset: Dataset, tokenizer) -> list[Example]:
    """Examples where encode(prompt + target) != encode(prompt) + encode(target): there training on the split
    tokens would not match what the tokenizer produces for the joined text (SPEC §2: assert, do not assume)."""
    bad = []
    for e in examples:
        prompt, target = dataset.prompt(e), target_text(dataset.titles[e.target])
        if list(tokenizer.encode(prompt + target)) != list(tokenizer.encode(prompt)) + list(tokenizer.encode(target)):
            bad.append(e)
    return bad


# ----------------------------------------------------------------------------------------------------------------
# Batches


def collate_train(encoded_examples: Sequence[EncodedExample], pad_id: int) -> dict:
    """Right padding: under causal attention a real token never sees the padding after it, so no mask is needed.
    The logits that predict the token at position p sit at p - 1, so label_mask marks p - 1 for every target p."""
    lengths = [len(e.input_ids) for e in encoded_examples]
    input_ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)   # (b, T)
    label_mask = torch.zeros(input_ids.shape, dtype=torch.bool)                       # (b, T)
    for row, e in enumerate(encoded_examples):
        input_ids[row, :lengths[row]] = e.input_ids
        label_mask[row, e.prompt_length - 1:lengths[row] - 1] = True
    labels = input_ids[:, 1:][label_mask[:, :-1]]                                     # (N,) row-major
    label_nodes = torch.cat([e.target_nodes for e in encoded_examples]).long()        # (N,)
    return {"input_ids": input_ids, "label_mask": label_mask, "labels": labels, "label_nodes": label_nodes,
            "num_label_tokens": int(labels.numel())}


def collate_prompts(prompt_token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so that every prompt's last token sits in the last column and generation appends after it."""
    lengths = [len(p) for p in prompt_token_lists]
    input_ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)    # (b, T)
    attention_mask = torch.zeros(input_ids.shape, dtype=torch.long)                   # (b, T) 1 = real token
    for row, prompt in enumerate(prompt_token_lists):
        if lengths[row]:
            input_ids[row, -lengths[row]:] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, -lengths[row]:] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------------
# Raw pipeline (SPEC §6): Amazon 2014 (reviews_<Cat>_5.json, meta_<Cat>.json with Python-literal lines) or 2018
# (<Cat>_5.json.gz, meta_<Cat>.json.gz, JSON lines) -> id2name4Rec.json + train/valid/test.csv + prompt.json


def read_records(path: Path):
    """Dicts from a JSON-lines file, gzipped or not; 2014 meta lines are Python literals, hence the fallback."""
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
                    raise ValueError(f"{path}:{line_number}: neither JSON nor a Python literal") from None
            yield record


def clean_title(title) -> str | None:
    """Whitespace and a trailing " VHS" (2014) / " [VHS]" (2018) stripped; None unless longer than 1 character."""
    if not isinstance(title, str):
        return None
    title = title.strip()
    for suffix in (" VHS", " [VHS]"):
        if title.endswith(suffix):
            title = title[:-len(suffix)].strip()
    # The dumps write quotes as &quot; (titles keep HTML entities); a stray literal '"' would close the quoted
    # target early, so it is written the same way.
    return title.replace('"', "&quot;") if len(title) > 1 else None


def category_of(reviews_path) -> str:
    """The category in a dump's file name: reviews_Video_Games_5.json (2014) or Video_Games_5.json.gz (2018) ->
    "video games" ("items" if the name has none)."""
    stem = Path(reviews_path).name.split(".")[0].removeprefix("reviews_").removesuffix("_5")
    return " ".join(stem.replace("_", " ").lower().split()) or "items"


def build_from_raw(reviews_path, meta_path, out_dir, k_core: int = 5, max_history: int = 10) -> dict:
    """Rebuild a processed dataset folder from the review and meta dumps; returns its statistics. Its prompt.json
    gets default_prompt(the category in the reviews file's name), unless the folder already has one (it may have
    been edited by hand)."""
    titles_by_asin = {}
    for meta in read_records(meta_path):
        title = clean_title(meta.get("title"))
        if title is not None and "asin" in meta:
            titles_by_asin[meta["asin"]] = title
    reviews = []                                                       # (user, asin, time) in file order
    for r in read_records(reviews_path):
        if r.get("asin") in titles_by_asin and r.get("reviewerID") is not None and r.get("unixReviewTime") is not None:
            reviews.append((r["reviewerID"], r["asin"], int(r["unixReviewTime"])))
    while True:                                                        # iterative k-core on users and items
        users, items = Counter(r[0] for r in reviews), Counter(r[1] for r in reviews)
        kept = [r for r in reviews if users[r[0]] >= k_core and items[r[1]] >= k_core]
        if len(kept) == len(reviews):
            break
        reviews = kept
    user_id, item_id = {}, {}                                          # 1-based, order of first appearance
    for user, asin, _ in reviews:
        user_id.setdefault(user, len(user_id) + 1)
        item_id.setdefault(asin, len(item_id) + 1)
    sequences = defaultdict(list)
    for user, asin, when in reviews:
        sequences[user_id[user]].append((when, item_id[asin]))
    windows = []                                                       # (user, items, target time)
    for user in sorted(sequences):
        events = sorted(sequences[user], key=lambda e: e[0])           # stable: same-time reviews keep file order
        ids = [i for _, i in events]
        for i in range(min(max_history, len(ids) - 1), len(ids)):
            windows.append((user, ids[max(i - max_history, 0):i + 1], events[i][0]))
    windows.sort(key=lambda w: w[2])                                   # stable, by target time
    cut_valid, cut_test = int(len(windows) * 0.8), int(len(windows) * 0.9)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", windows[:cut_valid]), ("valid", windows[cut_valid:cut_test]),
                       ("test", windows[cut_test:])):
        lines = ["user_id,item_ids,timestamp"] + [f'{u},"{items}",{t}' for u, items, t in part]
        write_text_atomic(out_dir / f"{name}.csv", "\n".join(lines) + "\n")
    id2name = {str(i): titles_by_asin[asin] for asin, i in item_id.items()}
    write_text_atomic(out_dir / "id2name4Rec.json", json.dumps(id2name, ensure_ascii=False, indent=4))
    if not (out_dir / PROMPT_FILE).exists():
        prompt = default_prompt(category_of(reviews_path))
        write_text_atomic(out_dir / PROMPT_FILE, json.dumps(prompt, ensure_ascii=False, indent=4) + "\n")
    return {"users": len(user_id), "items": len(item_id), "interactions": len(reviews), "windows": len(windows)}


# ----------------------------------------------------------------------------------------------------------------
# Download of the authors' processed files


def fetch_file(url: str, dest: Path, timeout: float = 30.0) -> int:
    """Stream url into dest, whole or not at all (write_atomically), so an interrupted download leaves nothing."""
    def download(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            expected, size = response.headers.get("Content-Length"), 0
            while chunk := response.read(1 << 16):
                out.write(chunk)
                size += len(chunk)
        if expected is not None and size != int(expected):
            raise ConnectionError(f"connection cut after {size} of {expected} bytes of {url}")
    write_atomically(dest, download)
    return dest.stat().st_size


def download_dataset(config: DataConfig, base_url: str | None = None, timeout: float = 30.0) -> list[str]:
    """Fetch the paper dataset's missing files, <base_url>/<Folder>/<file> for every RELEASE_FILES, into
    <data root>/<Folder>; files absent from the release are reported."""
    import http.client
    info = dataset_info(config.dataset)
    folder = resolve_data_root(config.data_dir) / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    base_url = (base_url or os.environ.get("BEAR_DATA_URL") or DEFAULT_DOWNLOAD_URL).rstrip("/")
    log = []
    for name in RELEASE_FILES:
        dest, url = folder / name, f"{base_url}/{info.folder}/{name}"
        if dest.is_file():
            log.append(f"{dest}: already present")
            continue
        try:
            log.append(f"{dest}: {fetch_file(url, dest, timeout)} bytes from {url}")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise ConnectionError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            log.append(f"{dest}: not in the release ({url} answers 404)")
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise ConnectionError(f"cannot download {url} ({reason}); offline? copy the authors' files into "
                                  f"{folder} by hand") from None
    return log


# ----------------------------------------------------------------------------------------------------------------
# CLI


def print_statistics(config: DataConfig, tokenizer_path: str | None) -> None:
    stats = dataset_statistics(config)
    paper = TABLE1.get(config.dataset.lower())
    print(f"{stats['name']}: users {stats['users']}, items {stats['items']} "
          f"({stats['unique_titles']} unique titles), interactions {stats['interactions']}" +
          (f"   [paper Table 1: {paper[0]} / {paper[1]} / {paper[2]}]" if paper else ""))
    if not stats["complete"]:
        print("  note: not every split's windows are released, so users/interactions count only released windows")
    print("  file rows: " + ", ".join(f"{name} {n}" for name, n in stats["file_rows"].items()))
    dataset = load_dataset(config)
    print(f"  splits: train {len(dataset.train)} (sample of {config.train_samples}, seed {config.seed}), "
          f"valid {len(dataset.valid)}, test {len(dataset.test)}")
    for note in dataset.notes:
        print(f"  note: {note}")
    if tokenizer_path:
        from tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
        trie = build_trie(dataset, tokenizer)
        lengths = [len(t) for t in trie.item_tokens.values()]
        print(f"  trie: {trie.num_nodes} nodes, {len(trie.leaf_items)} leaves, target tokens per item "
              f"{min(lengths)}..{max(lengths)} (mean {sum(lengths) / len(lengths):.1f})")
        everything = load_dataset(dataclasses.replace(config, train_samples=0))   # every released window
        windows = everything.train + everything.valid + everything.test
        bad = tokenization_mismatches(windows, everything, tokenizer)
        print(f"  tokenisation check: encode(prompt + target) != encode(prompt) + encode(target) for {len(bad)} "
              f"of {len(windows)} windows")
        for e in bad[:5]:
            print(f"    user {e.user_id} target {e.target}: {everything.titles[e.target]!r}")


def main(argv=None) -> int:
    parser = build_parser(DataConfig, "BEAR data: statistics, download, raw pipeline")
    parser.add_argument("--stats", action="store_true", help="print users/items/interactions and the splits")
    parser.add_argument("--tokenizer", help="with --stats: model folder whose tokenizer builds the trie and is checked")
    parser.add_argument("--download", action="store_true", help="fetch the authors' processed files when missing "
                        "(office, book, toy, clothing)")
    parser.add_argument("--download-url", help=f"release base URL (default $BEAR_DATA_URL or {DEFAULT_DOWNLOAD_URL})")
    parser.add_argument("--raw-reviews", help="Amazon review dump (2014 reviews_<Cat>_5.json or 2018 .json.gz)")
    parser.add_argument("--raw-meta", help="Amazon meta dump (meta_<Cat>.json or .json.gz)")
    parser.add_argument("--out", help="output folder of the raw pipeline")
    args = parser.parse_args(argv)
    config = DataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)})
    try:
        if args.raw_reviews or args.raw_meta:
            if not (args.raw_reviews and args.raw_meta and args.out):
                raise ValueError("the raw pipeline needs --raw-reviews, --raw-meta and --out")
            print(build_from_raw(args.raw_reviews, args.raw_meta, args.out))
            name = args.out if args.out.lower() not in DATASETS else os.path.join(".", args.out)  # not a paper name
            print(f"prompt wording: {Path(args.out) / PROMPT_FILE} (edit it by hand if you like); train with "
                  f"--dataset {name}")
            return 0
        if not config.dataset:
            raise ValueError(f"give --dataset (one of {', '.join(DATASETS)}, or a dataset folder)")
        if args.download:
            if config.dataset.lower() not in DATASETS:
                raise ValueError(f"--download fetches the paper datasets ({', '.join(DATASETS)}), not "
                                 f"{config.dataset!r}")
            print("\n".join(download_dataset(config, args.download_url)))
        if args.stats:
            print_statistics(config, args.tokenizer)
        elif not args.download:
            dataset = load_dataset(config)
            print(f"train {len(dataset.train)}, valid {len(dataset.valid)}, test {len(dataset.test)}; "
                  f"{len(dataset.titles)} items")
            for note in dataset.notes:
                print(f"note: {note}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

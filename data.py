"""Data stage: a dataset folder (the paper's four Amazon datasets, or one of your own) -> the
prompts, the item trie and the tensors the losses and the beam search use. How a folder is made
(the raw Amazon dumps, the authors' release) is amazon.py. The oracles in tests/test_data.py: the
authors' own train_10000.csv row for row, a brute-force trie over Python lists, HF `tokenizers`.

Shapes: I items, L a title's target tokens (sum L over all items), E trie edges, N trie nodes
queried (one per label position), M valid (node, token) pairs, b batch rows, T the padded length.

    python data.py --dataset office --stats [--tokenizer MODEL_DIR]   # Table 1, splits, trie
    python data.py --dataset toy --download                          # the authors' processed files
    python data.py --raw-reviews reviews_Toys_5.json --raw-meta meta_Toys.json --out DIR
    python data.py --dataset DIR --stats                             # a dataset folder of your own
"""
import csv
import dataclasses
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cli import build_parser, option, read_json


# ---------------------------------------------------------------- datasets and the prompt (SPEC §1)
@dataclass(frozen=True)
class DatasetInfo:
    folder: str          # sub-folder of the data root; for a folder of your own, its absolute path
    instruction: str
    prefix: str


def wording(plural: str, one: str, verb: str = "used") -> tuple[str, str]:
    """The paper's instruction and input prefix for a category."""
    instruction = (f"Given a list of {plural} the user has {verb} before, please recommend a new "
                   f"{one} that the user likes to the user.")
    return instruction, f"The user has {verb} the following {plural} before:"


DATASETS: dict[str, DatasetInfo] = {
    "office": DatasetInfo("Office", *wording("office products", "office product")),
    "book": DatasetInfo("Book", *wording("books", "book", "read")),
    "toy": DatasetInfo("Toy", *wording("toys", "toy", "played")),
    "clothing": DatasetInfo("Clothing", *wording("clothing", "clothing", "worn")),
}

# One template for training and inference, without the authors' stray whitespace (a trailing space
# after "request." in training, two at inference, "\n " after the titles).
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
          "further context. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{prefix} {titles}\n\n### Response:\n")
PROMPT_FILE = "prompt.json"   # a folder of your own: {"instruction": ..., "prefix": ...}

# Paper Table 1 (users, items, interactions), printed beside our reconstruction by --stats.
TABLE1 = {"office": (4895, 2414, 53149), "book": (16559, 6344, 151928),
          "toy": (19124, 11758, 165247), "clothing": (39230, 22948, 277534)}


def dataset_info(name: str) -> DatasetInfo:
    if name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name.lower()]


def default_prompt(category: str) -> dict[str, str]:
    """The paper's wording for a category of your own; the singular drops -s (-ies: -y) from the
    last word of each "and" part ("toys and games": "toy and game"). Edit prompt.json at will."""
    def singular(phrase: str) -> str:
        head, _, last = phrase.rpartition(" ")
        if last.endswith("ies"):
            last = last[:-3] + "y"
        elif last.endswith("s") and not last.endswith("ss"):
            last = last[:-1]
        return f"{head} {last}".strip()

    plural = " ".join(category.lower().split())
    one = " and ".join(singular(part) for part in plural.split(" and "))
    return dict(zip(("instruction", "prefix"), wording(plural, one)))


def target_text(title: str) -> str:
    return '"' + title + '"'


def escape_quotes(title: str) -> str:
    """A literal '"' would close the quoted target early; the Amazon dumps write it &quot;."""
    return title.replace('"', "&quot;")


def build_prompt(info: DatasetInfo, history_titles: Sequence[str]) -> str:
    titles = ", ".join(target_text(t) for t in history_titles)
    return PROMPT.format(instruction=info.instruction, prefix=info.prefix, titles=titles)


# ---------------------------------------------------------------------- processed files and splits
@dataclass
class DataConfig:
    dataset: str = option("", "office | book | toy | clothing, or a dataset folder of your own")
    data_dir: str | None = option(None, "data root; None: $BEAR_DATA, else ./data")
    train_samples: int = option(10000, "the paper trains on sample(n=10000, random_state=42) of "
                                       "train; <= 0: all of train")
    seed: int = option(42, "seed of the training sample")
    max_history: int = option(10, "history titles per prompt")


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
    notes: list[str]              # the choices load_dataset made for this folder (print them)

    def prompt(self, example: Example) -> str:
        return build_prompt(self.info, [self.titles[i] for i in example.history])


def resolve_data_root(data_dir: str | None) -> Path:
    """--data-dir, else $BEAR_DATA, else ./data (it need not exist yet: --download creates it)."""
    return Path(data_dir or os.environ.get("BEAR_DATA") or "./data").expanduser()


def locate_dataset(name: str, data_dir: str | None) -> tuple[DatasetInfo, Path]:
    """A paper dataset by name (any case) is <data root>/<Folder>, worded as in SPEC §1; any other
    name is the path of a folder of your own (./office for one called office) with a prompt.json."""
    if name.lower() in DATASETS:
        info = DATASETS[name.lower()]
        folder = resolve_data_root(data_dir) / info.folder
        if not folder.is_dir():
            fetch = f"python data.py --dataset {name.lower()} --download"
            fetch += f" --data-dir {data_dir}" if data_dir else ""
            raise FileNotFoundError(f"missing dataset folder {folder}: point --data-dir or "
                                    f"$BEAR_DATA at the folder that holds {info.folder}/, or fetch "
                                    f"it: {fetch}")
        return info, folder
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}, or the "
                         f"path of a dataset folder (id2name4Rec.json, train.csv, test.csv, "
                         f"{PROMPT_FILE})")
    path = folder / PROMPT_FILE
    if not path.is_file():
        hint = (f"; for the paper's {folder.name}, give --dataset {folder.name.lower()} --data-dir "
                f"{folder.resolve().parent}") if folder.name.lower() in DATASETS else ""
        raise FileNotFoundError(f'missing file {path}: a dataset folder of your own needs its '
                                f'prompt wording, {{"instruction": "...", "prefix": "..."}} (the '
                                f'raw pipeline writes one){hint}')
    prompt = read_json(path)
    if not (isinstance(prompt, dict) and sorted(prompt) == ["instruction", "prefix"] and
            all(isinstance(text, str) and text.strip() for text in prompt.values())):
        raise ValueError(f'{path}: want {{"instruction": "...", "prefix": "..."}}, two non-empty '
                         f'strings, got {json.dumps(prompt)[:200]}')
    return DatasetInfo(str(folder.resolve()), prompt["instruction"], prompt["prefix"]), folder


def read_titles(path: Path) -> tuple[dict[int, str], int]:
    """id2name4Rec.json {"<item id>": "<title>", ...}: the titles, each '"' read as &quot; (as the
    raw pipeline writes it), and how many titles held one."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: want a JSON object {{"<item id>": "<title>", ...}}, '
                         f'got a {type(raw).__name__}')
    for key, title in raw.items():   # plain decimal ids only: "01" or " 1" would alias item 1
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):
            raise ValueError(f"{path}: key {key!r} is not an item id (a decimal integer)")
        if not isinstance(title, str):
            raise ValueError(f"{path}: title of item {key} is not a string: "
                             f"{json.dumps(title)[:100]}")
    titles = {int(key): escape_quotes(title) for key, title in raw.items()}
    return titles, sum('"' in title for title in raw.values())


def read_windows(path: Path, titles: dict[int, str], max_history: int = 10) -> list[Example]:
    """One Example per CSV row of user_id, item_ids (a list, last = target), timestamp; extra
    columns are ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    examples, columns = [], ("user_id", "item_ids", "timestamp")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        if missing := [c for c in columns if c not in header]:
            raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}")
        col_user, col_items, col_time = (header.index(c) for c in columns)
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                try:
                    items = json.loads(row[col_items])   # 10x faster than ast.literal_eval
                    user, timestamp = int(row[col_user]), int(row[col_time])
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{where}: malformed row ({type(e).__name__}: {e})") from None
                if len(row) != len(header) or not isinstance(items, list) or \
                        not all(type(i) is int for i in items):
                    raise ValueError(f"{where}: malformed row (want {len(header)} fields and a "
                                     f"list of item ids)")
                if len(items) < 2:
                    raise ValueError(f"{where}: empty history (no item before the target)")
                if unknown := [i for i in items if i not in titles]:
                    raise ValueError(f"{where}: item id {unknown[0]} is not in id2name4Rec.json")
                history = tuple(items[:-1][-max_history:])
                examples.append(Example(user, history, items[-1], timestamp))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed row ({e})") from None
    return examples


def sample_files(folder: Path) -> list[Path]:
    """The authors' training samples train_<N>.csv in the folder, smallest N first."""
    found = [p for p in folder.glob("train_*.csv") if p.stem[len("train_"):].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[len("train_"):]))


def load_dataset(config: DataConfig) -> Dataset:
    """The splits of a dataset folder. The training pool is train.csv, sampled with --seed (seed
    42: the authors' train_10000.csv row for row), else an authors' seed-42 sample train_<N>.csv
    as is: the smallest N that covers --train-samples, else the largest (../shared's Toy has only
    train_5000.csv). Validation is valid.csv, else the chronologically last 1/9 of the pool, then
    never trained on. test.csv is used in full. `notes` says which choices were made."""
    if config.max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {config.max_history}")
    info, folder = locate_dataset(config.dataset, config.data_dir)
    titles, quoted = read_titles(folder / "id2name4Rec.json")
    read = lambda name: read_windows(folder / name, titles, config.max_history)  # noqa: E731
    notes = []
    if quoted:   # real releases hold a few: a nickname in quotes inside a product name
        notes.append(f"{folder.name}: {quoted} of {len(titles)} titles hold a literal '\"'; read "
                     f"as &quot; (as the raw pipeline writes them)")
    if (folder / "train.csv").is_file():
        source = "train.csv"
    elif not (ready := sample_files(folder)):
        raise FileNotFoundError(f"missing file {folder / 'train.csv'} (and no train_<N>.csv)")
    else:
        fits = [p for p in ready if int(p.stem[len("train_"):]) >= config.train_samples > 0]
        source = (fits[0] if fits else ready[-1]).name
        notes.append(f"{folder.name}: no train.csv; using {source} as is (the authors' seed-42 "
                     f"sample of the full train: its first m rows are exactly sample(m))")
    full_train = read(source)
    if (folder / "valid.csv").is_file():
        valid, held_out = read("valid.csv"), set()
    else:   # the last 1/9 by time (stable sort): train : valid : test stays about 8 : 1 : 1
        by_time = sorted(range(len(full_train)), key=lambda i: full_train[i].timestamp)
        held_out = set(by_time[len(full_train) - len(full_train) // 9:])
        valid = [row for i, row in enumerate(full_train) if i in held_out]
        notes.append(f"{folder.name}: no valid.csv; valid = the chronologically last 1/9 of "
                     f"{source} ({len(valid)} windows), removed from the training pool")
    n = config.train_samples
    if n <= 0:
        order = range(len(full_train))
    elif source == "train.csv":
        # pandas' sample(n, random_state=seed) is RandomState(seed).choice(rows, n, replace=False),
        # i.e. permutation(rows)[:n]: so sample(m) is sample(n)[:m] for m <= n
        if n > len(full_train):
            raise ValueError(f"--train-samples {n} exceeds the {len(full_train)} training windows")
        order = np.random.RandomState(config.seed).permutation(len(full_train))[:n]
    else:
        order = range(min(n, len(full_train)))
        if config.seed != 42:
            raise ValueError(f"{source} is a seed-42 sample; it cannot give a sample with seed "
                             f"{config.seed}")
        if n > len(full_train):
            notes.append(f"{folder.name}: asked for {n} training windows, {source} has only "
                         f"{len(full_train)}; using all of them")
    # Sampled from the FULL train (the authors' train_10000.csv row for row), then the held-out
    # rows dropped: about 8/9 of n windows, none of them a validation window.
    train = [full_train[i] for i in order if i not in held_out]
    if held_out and n > 0:
        notes.append(f"{folder.name}: the training sample is the sample of {source} minus its "
                     f"held-out rows: {len(train)} of {len(order)} windows")
    return Dataset(info, titles, train, valid, read("test.csv"), notes)


def dataset_statistics(config: DataConfig) -> dict:
    """Paper Table 1 from every released window. A user's windows are items[max(i-10,0):i+1] for
    i = min(10, n-1) .. n-1, so n = (longest window - 1) + #windows (if all are released)."""
    _, folder = locate_dataset(config.dataset, config.data_dir)
    titles, _ = read_titles(folder / "id2name4Rec.json")
    files = [p for p in sorted(folder.glob("*.csv")) if p.stem in ("train", "valid", "test")]
    if not (folder / "train.csv").is_file():
        files += sample_files(folder)[-1:]
    rows = {p.name: read_windows(p, titles, max_history=10) for p in files}
    windows_per_user, longest = Counter(), Counter()
    for e in (e for examples in rows.values() for e in examples):
        windows_per_user[e.user_id] += 1
        longest[e.user_id] = max(longest[e.user_id], len(e.history) + 1)
    interactions = sum(longest[u] - 1 + windows_per_user[u] for u in windows_per_user)
    return {"name": folder.name, "users": len(windows_per_user), "items": len(titles),
            "unique_titles": len(set(titles.values())), "interactions": interactions,
            "file_rows": {name: len(r) for name, r in rows.items()},
            "complete": all((folder / f"{s}.csv").is_file() for s in ("train", "valid", "test"))}


# ------------------------------------------------------------------------- the item trie (SPEC §2)
class ItemTrie:
    """Prefix tree over every item's target tokens encode('"' + title + '"') + [eos], stored as CSR
    tensors, so the valid next tokens of N prefixes come from a few vectorised torch ops."""

    root = 0

    def __init__(self, child_ptr, child_token, child_node, leaf_items, leaf_count, item_tokens,
                 item_path_ptr, item_path_nodes, item_row):
        self.child_ptr, self.child_token, self.child_node = child_ptr, child_token, child_node
        self.num_nodes = len(child_ptr) - 1
        self.leaf_items: dict[int, frozenset[int]] = leaf_items
        self.leaf_count = leaf_count       # (num_nodes,) leaves (distinct titles) in each subtree
        self.item_tokens: dict[int, tuple[int, ...]] = item_tokens
        self._item_path_ptr, self._item_path_nodes = item_path_ptr, item_path_nodes
        self._item_row = item_row
        self._key_base = int(child_token.max()) + 1 if len(child_token) else 1
        parent = torch.repeat_interleave(torch.arange(self.num_nodes), child_ptr.diff())  # (E,)
        self._edge_key = parent * self._key_base + child_token                 # (E,) sorted key
        # Strictly ascending: step()'s searchsorted needs the order, and the masked losses would
        # count a repeated (row, token) pair twice. Checked once here, not on every loss call.
        if not bool((self._edge_key[1:] > self._edge_key[:-1]).all()):
            raise ValueError("trie edges must be sorted by (parent, token) and contain no "
                             "duplicates")

    @classmethod
    def build(cls, item_tokens: dict[int, Sequence[int]], eos_id: int) -> "ItemTrie":
        items = sorted(item_tokens)
        seqs = [tuple(int(t) for t in item_tokens[i]) for i in items]
        for item, seq in zip(items, seqs):
            if not seq or seq[-1] != eos_id or eos_id in seq[:-1]:
                raise ValueError(f"item {item}: target tokens must end with eos {eos_id} and "
                                 f"contain it only there")
        lengths = np.array([len(s) for s in seqs])                                  # (I,)
        path_ptr = np.concatenate([[0], np.cumsum(lengths)])                        # (I+1,)
        rows = np.arange(len(seqs)).repeat(lengths)                                 # (sum L,)
        columns = np.arange(path_ptr[-1]) - path_ptr[:-1].repeat(lengths)           # (sum L,)
        tokens = np.full((len(seqs), lengths.max()), -1, np.int64)                  # (I, L) -1 pad
        tokens[rows, columns] = np.concatenate(seqs)
        key_base = int(tokens.max()) + 1
        # Level by level: the depth-(d+1) nodes are the distinct (parent, token) pairs at depth d,
        # numbered in sorted order, so node ids run breadth first and every node's children are
        # contiguous and sorted by token.
        node_before = np.zeros((len(seqs), tokens.shape[1] + 1), np.int64)          # (I, L+1)
        parents, child_tokens, next_id = [], [], 1
        for d in range(tokens.shape[1]):
            alive = np.nonzero(lengths > d)[0]
            pairs, inverse = np.unique(node_before[alive, d] * key_base + tokens[alive, d],
                                       return_inverse=True)
            node_before[alive, d + 1] = next_id + inverse
            parents.append(pairs // key_base)
            child_tokens.append(pairs % key_base)
            next_id += len(pairs)
        child_ptr = np.concatenate([[0], np.cumsum(np.bincount(np.concatenate(parents),
                                                               minlength=next_id))])
        leaf = node_before[np.arange(len(seqs)), lengths]                           # (I,)
        leaf_items = defaultdict(set)
        for node, item in zip(leaf.tolist(), items):
            leaf_items[node].add(item)
        _, one_row = np.unique(leaf, return_index=True)                # one item row per title
        on_path = np.arange(tokens.shape[1] + 1) <= lengths[one_row, None]          # root..leaf
        leaf_count = np.bincount(node_before[one_row][on_path], minlength=next_id)  # (nodes,)
        path_nodes = node_before[rows, columns]                  # (sum L,) node before each token
        return cls(torch.from_numpy(child_ptr), torch.from_numpy(np.concatenate(child_tokens)),
                   torch.arange(1, next_id), {n: frozenset(s) for n, s in leaf_items.items()},
                   torch.from_numpy(leaf_count), dict(zip(items, seqs)), path_ptr,
                   torch.from_numpy(path_nodes),
                   {i: r for r, i in enumerate(items)})

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node along each token, or -1 (also for node -1 or a token not in it)."""
        nodes, tokens = nodes.long(), tokens.long()
        query = nodes * self._key_base + tokens                                           # (N,)
        index = torch.searchsorted(self._edge_key, query).clamp(max=len(self._edge_key) - 1)
        found = ((self._edge_key[index] == query) & (nodes >= 0) & (tokens >= 0) &
                 (tokens < self._key_base))                                               # (N,)
        return torch.where(found, self.child_node[index], torch.full_like(nodes, -1))

    def valid_next(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """COO pairs (row, token): row i lists each valid next token after nodes[i] (leaf: none)."""
        nodes = nodes.long()
        if len(nodes) and (nodes.min() < 0 or nodes.max() >= self.num_nodes):
            raise ValueError(f"trie node out of range [0, {self.num_nodes}): "
                             f"{nodes.min().item()}..{nodes.max().item()}")
        start = self.child_ptr[nodes]                                             # (N,)
        count = self.child_ptr[nodes + 1] - start                                 # (N,)
        row = torch.repeat_interleave(torch.arange(len(nodes)), count)            # (M,)
        # Pair j of row i is edge start[i] + (j - first pair of row i): a constant shift per row.
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
                raise ValueError(f"token {token} at position {position} is not a valid "
                                 f"continuation in the trie")
        return nodes

    def item_path(self, item: int) -> torch.Tensor:
        """Nodes before each of the item's target tokens, (len(item_tokens[item]),)."""
        row = self._item_row[item]
        return self._item_path_nodes[self._item_path_ptr[row]:self._item_path_ptr[row + 1]]


# ------------------------------------------------------------------ tokenising examples, batching
def build_trie(dataset: Dataset, tokenizer) -> ItemTrie:
    """Each item's target tokens encode('"' + title + '"') + [eos]: what the model generates."""
    by_title = {title: tuple(tokenizer.encode(target_text(title))) + (tokenizer.eos_id,)
                for title in set(dataset.titles.values())}
    item_tokens = {item: by_title[title] for item, title in dataset.titles.items()}
    return ItemTrie.build(item_tokens, tokenizer.eos_id)


def prompt_tokens(prompt: str, tokenizer) -> list[int]:
    return ([tokenizer.bos_id] if tokenizer.add_bos else []) + list(tokenizer.encode(prompt))


@dataclass(frozen=True)
class EncodedExample:
    input_ids: torch.Tensor       # (L,) int32 (half the memory): prompt tokens + target tokens
    prompt_length: int            # tokens before the first target token (BOS included)
    target_nodes: torch.Tensor    # (L - prompt_length,) trie node before each target token
    target: int


def encode_examples(examples: Sequence[Example], dataset: Dataset, tokenizer,
                    trie: ItemTrie) -> list[EncodedExample]:
    """Prompt and target tokenised apart, as the beam search sees them (encode(prompt), then trie
    tokens); tokenization_mismatches() checks that this equals tokenising them jointly."""
    encoded = []
    for e in examples:
        prompt = prompt_tokens(dataset.prompt(e), tokenizer)
        ids = torch.tensor(prompt + list(trie.item_tokens[e.target]), dtype=torch.int32)
        encoded.append(EncodedExample(ids, len(prompt), trie.item_path(e.target), e.target))
    return encoded


def sample_negatives(examples: Sequence[Example], titles: dict[int, str], count: int,
                     seed: int) -> torch.Tensor:
    """S-DPO's negatives, (len(examples), count) item ids: for each window, `count` distinct titles
    drawn uniformly from those neither in its history nor its target (a title shared by several ids
    is one item, named by its smallest id), by a generator seeded with (seed, the window's index):
    drawn once, the same in a resumed run and on every process."""
    smallest_id = {}
    for item, title in sorted(titles.items()):
        smallest_id.setdefault(title, item)
    candidates = sorted(smallest_id)
    negatives = []
    for index, e in enumerate(examples):
        excluded = {titles[item] for item in (*e.history, e.target)}
        if len(candidates) - len(excluded) < count:
            raise ValueError(f"{count} negatives wanted, but window {index} leaves only "
                             f"{len(candidates) - len(excluded)} other titles")
        rng, chosen = np.random.default_rng([seed, index]), []
        while len(chosen) < count:  # rejection: uniform over the titles left, without replacement
            title = candidates[int(rng.integers(len(candidates)))]
            if title not in excluded and title not in chosen:
                chosen.append(title)
        negatives.append([smallest_id[title] for title in chosen])
    return torch.tensor(negatives, dtype=torch.long).view(len(examples), count)


def tokenization_mismatches(examples: Sequence[Example], dataset: Dataset,
                            tokenizer) -> list[Example]:
    """Examples where encode(prompt + target) != encode(prompt) + encode(target): there the split
    tokens we train on are not the joined text's (SPEC §2: assert, do not assume)."""
    def split_differs(e: Example) -> bool:
        prompt, target = dataset.prompt(e), target_text(dataset.titles[e.target])
        joined = list(tokenizer.encode(prompt + target))
        return joined != list(tokenizer.encode(prompt)) + list(tokenizer.encode(target))
    return [e for e in examples if split_differs(e)]


def collate_train(encoded_examples: Sequence[EncodedExample], pad_id: int, device="cpu") -> dict:
    """Right padding: under causal attention no real token sees the padding after it, so no mask.
    The logits predicting position p sit at p - 1, so label_mask marks p - 1 for every target p.
    The tensors on `device`, but the trie nodes stay on the CPU."""
    lengths = [len(e.input_ids) for e in encoded_examples]
    input_ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)   # (b, T)
    label_mask = torch.zeros(input_ids.shape, dtype=torch.bool)                       # (b, T)
    for row, e in enumerate(encoded_examples):
        input_ids[row, :lengths[row]] = e.input_ids
        label_mask[row, e.prompt_length - 1:lengths[row] - 1] = True
    labels = input_ids[:, 1:][label_mask[:, :-1]]                                     # (N,)
    label_nodes = torch.cat([e.target_nodes for e in encoded_examples]).long()        # (N,)
    return {"input_ids": input_ids.to(device), "label_mask": label_mask.to(device),
            "labels": labels.to(device), "label_nodes": label_nodes,
            "num_label_tokens": int(labels.numel())}


def collate_prompts(prompt_token_lists: Sequence[Sequence[int]],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every prompt ends in the last column, where generation appends."""
    lengths = [len(p) for p in prompt_token_lists]
    T = max(lengths)
    input_ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)               # (b, T)
    attention_mask = torch.zeros(input_ids.shape, dtype=torch.long)                   # (b, T)
    for row, prompt in enumerate(prompt_token_lists):
        input_ids[row, T - lengths[row]:] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, T - lengths[row]:] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------- the CLI
def print_statistics(config: DataConfig, tokenizer_path: str | None) -> None:
    stats, paper = dataset_statistics(config), TABLE1.get(config.dataset.lower())
    print(f"{stats['name']}: users {stats['users']}, items {stats['items']} "
          f"({stats['unique_titles']} unique titles), interactions {stats['interactions']}" +
          (f"   [paper Table 1: {paper[0]} / {paper[1]} / {paper[2]}]" if paper else ""))
    if not stats["complete"]:
        print("  note: not every split's windows are released, so users/interactions count only "
              "released windows")
    print("  file rows: " + ", ".join(f"{name} {n}" for name, n in stats["file_rows"].items()))
    dataset = load_dataset(config)
    print(f"  splits: train {len(dataset.train)} (sample of {config.train_samples}, seed "
          f"{config.seed}), valid {len(dataset.valid)}, test {len(dataset.test)}")
    for note in dataset.notes:
        print(f"  note: {note}")
    if tokenizer_path:
        from tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
        trie = build_trie(dataset, tokenizer)
        lengths = [len(t) for t in trie.item_tokens.values()]
        print(f"  trie: {trie.num_nodes} nodes, {len(trie.leaf_items)} leaves, target tokens per "
              f"item {min(lengths)}..{max(lengths)} (mean {sum(lengths) / len(lengths):.1f})")
        everything = load_dataset(dataclasses.replace(config, train_samples=0))   # every window
        windows = everything.train + everything.valid + everything.test
        bad = tokenization_mismatches(windows, everything, tokenizer)
        print(f"  tokenisation check: encode(prompt + target) != encode(prompt) + encode(target) "
              f"for {len(bad)} of {len(windows)} windows")
        for e in bad[:5]:
            print(f"    user {e.user_id} target {e.target}: {everything.titles[e.target]!r}")


def main(argv=None) -> int:
    from amazon import DEFAULT_DOWNLOAD_URL, build_from_raw, download_dataset  # it imports this file
    parser = build_parser(DataConfig, "BEAR data: statistics, download, raw pipeline")
    add = parser.add_argument
    add("--stats", action="store_true", help="print users/items/interactions and the splits")
    add("--tokenizer",
        help="with --stats: model folder whose tokenizer builds the trie and is checked")
    add("--download", action="store_true",
        help="fetch the authors' processed files when missing (office, book, toy, clothing)")
    add("--download-url", help=f"release base URL (default $BEAR_DATA_URL or "
                               f"{DEFAULT_DOWNLOAD_URL})")
    add("--raw-reviews", help="Amazon review dump (2014 reviews_<Cat>_5.json or 2018 .json.gz)")
    add("--raw-meta", help="Amazon meta dump (meta_<Cat>.json or .json.gz)")
    add("--out", help="output folder of the raw pipeline")
    args = parser.parse_args(argv)
    config = DataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)})
    try:
        if args.raw_reviews or args.raw_meta:
            if not (args.raw_reviews and args.raw_meta and args.out):
                raise ValueError("the raw pipeline needs --raw-reviews, --raw-meta and --out")
            print(build_from_raw(args.raw_reviews, args.raw_meta, args.out))
            name = os.path.join(".", args.out) if args.out.lower() in DATASETS else args.out
            print(f"prompt wording: {Path(args.out) / PROMPT_FILE} (edit it by hand if you like); "
                  f"train with --dataset {name}")   # ./office, not the paper's office
            return 0
        if not config.dataset:
            raise ValueError(f"give --dataset (one of {', '.join(DATASETS)}, or a dataset folder)")
        if args.download:   # dataset_info() refuses a folder of your own
            print("\n".join(download_dataset(config, args.download_url)))
        if args.stats:
            print_statistics(config, args.tokenizer)
        elif not args.download:
            dataset = load_dataset(config)
            print(f"train {len(dataset.train)}, valid {len(dataset.valid)}, test "
                  f"{len(dataset.test)}; {len(dataset.titles)} items")
            for note in dataset.notes:
                print(f"note: {note}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

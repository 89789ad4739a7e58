"""data.py against independent oracles: the authors' released files, the HF `tokenizers` library, and plain
brute-force re-implementations written inside this file."""
import csv
import gzip
import http.server
import json
import random
import re
import socket
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizerLib

import amazon
import data

REPO = Path(__file__).resolve().parents[1]
NAMES = ["office", "book", "toy", "clothing"]
FOLDERS = {"office": "Office", "book": "Book", "toy": "Toy", "clothing": "Clothing"}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers: model.load_tokenizer when the model stage has it, the HF `tokenizers` library as the oracle


class HFTokenizer:
    """The tokenizer contract of CONTRACTS.md on top of the HF `tokenizers` library (oracle / stand-in)."""

    def __init__(self, path, bos, eos, add_bos):
        self._tok = HFTokenizerLib.from_file(str(path))
        self.bos_id = self._tok.token_to_id(bos)
        self.eos_id = self.pad_id = self._tok.token_to_id(eos)
        self.add_bos = add_bos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


@pytest.fixture(scope="session")
def oracles(llama3_tokenizer_dir, smollm2_dir):
    return {"llama3": HFTokenizer(llama3_tokenizer_dir / "tokenizer.json", "<|begin_of_text|>", "<|end_of_text|>", True),
            "smollm2": HFTokenizer(smollm2_dir / "tokenizer.json", "<|im_start|>", "<|im_end|>", False)}


@pytest.fixture(scope="session")
def tokenizers(oracles, llama3_tokenizer_dir, smollm2_dir):
    """What data.py runs with: the product's tokenizer (model.load_tokenizer); the HF library stays the oracle."""
    from tokenizer import load_tokenizer
    return {"llama3": load_tokenizer(llama3_tokenizer_dir), "smollm2": load_tokenizer(smollm2_dir)}


_datasets = {}


@pytest.fixture(scope="session")
def load(data_root):
    def load(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in _datasets:
            _datasets[key] = data.load_dataset(data.DataConfig(name, data_dir=str(data_root), **kw))
        return _datasets[key]
    return load


_tries = {}


@pytest.fixture(scope="session")
def trie_of(load, tokenizers):
    def trie_of(name, tok_name):
        if (name, tok_name) not in _tries:
            _tries[name, tok_name] = data.build_trie(load(name), tokenizers[tok_name])
        return _tries[name, tok_name]
    return trie_of


def read_csv_rows(path):
    with open(path, newline="") as f:
        return [(int(r["user_id"]), tuple(json.loads(r["item_ids"])), int(r["timestamp"])) for r in csv.DictReader(f)]


def as_rows(examples):
    return [(e.user_id, e.history + (e.target,), e.timestamp) for e in examples]


# ----------------------------------------------------------------------------------------------------------------
# Datasets, splits, statistics


def test_dataset_names_are_case_insensitive_and_unknown_names_list_the_valid_ones():
    assert data.dataset_info("OfFiCe").folder == "Office"
    with pytest.raises(ValueError, match="unknown dataset 'movies'.*office, book, toy, clothing"):
        data.dataset_info("movies")


def test_data_root_resolution(tmp_path, monkeypatch):
    explicit, env, cwd = tmp_path / "explicit", tmp_path / "env", tmp_path / "cwd"
    for d in (explicit, env, cwd / "data"):
        d.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("BEAR_DATA", str(env))
    assert data.resolve_data_root(str(explicit)) == explicit
    assert data.resolve_data_root(None) == env
    monkeypatch.delenv("BEAR_DATA")
    assert data.resolve_data_root(None).resolve() == (cwd / "data").resolve()
    assert data.resolve_data_root(str(tmp_path / "nowhere")) == tmp_path / "nowhere"   # --download creates it


def test_office_statistics_equal_table_1(data_root):
    stats = data.dataset_statistics(data.DataConfig("office", data_dir=str(data_root)))
    assert (stats["users"], stats["items"], stats["interactions"]) == (4895, 2414, 53149)
    for name, n in stats["file_rows"].items():
        with open(data_root / "Office" / name) as f:
            assert n == sum(1 for _ in f) - 1


def test_stats_cli_prints_table_1_and_file_row_counts(data_root):
    out = subprocess.run([sys.executable, str(REPO / "data.py"), "--dataset", "Office", "--stats", "--data-dir",
                          str(data_root)], capture_output=True, text=True, check=True).stdout
    assert "users 4895, items 2414" in out and "interactions 53149" in out
    assert "train.csv 15400" in out and "valid.csv 1925" in out and "test.csv 1925" in out
    assert "train 10000" in out


@pytest.mark.parametrize("name", ["office", "book", "clothing"])
def test_train_sample_is_the_authors_train_10000_row_for_row(name, load, data_root):
    folder = data_root / FOLDERS[name]
    full, authors = read_csv_rows(folder / "train.csv"), read_csv_rows(folder / "train_10000.csv")
    dataset = load(name)
    if name == "office":
        assert as_rows(dataset.train) == authors
        assert as_rows(dataset.valid) == read_csv_rows(folder / "valid.csv")
    else:
        # no valid.csv: the chronologically last 1/9 of train.csv is held out and dropped from the sample
        by_time = sorted(range(len(full)), key=lambda i: full[i][2])
        held = [full[i] for i in sorted(by_time[len(full) - len(full) // 9:])]
        assert as_rows(dataset.valid) == held
        held_set = set(held)
        assert as_rows(dataset.train) == [r for r in authors if r not in held_set]
        assert min(r[2] for r in held) >= max(r[2] for r in full if r not in held_set)
        assert any("chronologically last 1/9" in note for note in dataset.notes)
    assert as_rows(dataset.test) == read_csv_rows(folder / "test.csv")


def test_smaller_samples_are_prefixes_and_other_seeds_follow_numpy(load, data_root):
    full = read_csv_rows(data_root / "Office" / "train.csv")
    assert as_rows(load("office", train_samples=1234).train) == read_csv_rows(data_root / "Office" / "train_10000.csv")[:1234]
    # pandas' sample(n, random_state=seed) calls RandomState(seed).choice(len, n, replace=False)
    picks = np.random.RandomState(7).choice(len(full), 500, replace=False)
    assert as_rows(load("office", train_samples=500, seed=7).train) == [full[i] for i in picks]
    assert len(load("office", train_samples=0).train) == len(full)
    with pytest.raises(ValueError, match="exceeds the 15400 training windows"):
        load("office", train_samples=20000)


def test_toy_uses_the_released_train_5000_as_is(load, data_root):
    rows = read_csv_rows(data_root / "Toy" / "train_5000.csv")
    dataset = load("toy")
    assert as_rows(dataset.train) == rows
    assert any("train_5000.csv" in note for note in dataset.notes)
    assert as_rows(load("toy", train_samples=3000).train) == rows[:3000]
    assert as_rows(dataset.valid) == read_csv_rows(data_root / "Toy" / "valid.csv")   # extra columns ignored


def test_training_pool_is_train_csv_else_the_smallest_sample_file_that_covers_n(tmp_path):
    """The documented order: train.csv (sampled with the seed) when the folder has it (the authors' release does
    for all four datasets), else the smallest train_<N>.csv with N >= n, else the largest one."""
    folder = tmp_path / "Toy"
    folder.mkdir()
    (folder / "id2name4Rec.json").write_text(json.dumps({str(i): f"Toy {i}" for i in range(1, 41)}))
    full = [(u, (u, u + 1), 100 + u) for u in range(1, 40)]
    order = np.random.RandomState(42).permutation(len(full))

    def write(name, rows):
        lines = ["user_id,item_ids,timestamp"] + [f'{u},"{list(items)}",{t}' for u, items, t in rows]
        (folder / name).write_text("\n".join(lines) + "\n")
    write("train.csv", full)
    write("valid.csv", full[:3])
    write("test.csv", full[:3])
    write("train_10.csv", [full[i] for i in order[:10]])
    write("train_20.csv", [full[i] for i in order[:20]])
    write("train_old.csv", full[:1])              # not a sample file: ignored
    load = lambda n: data.load_dataset(data.DataConfig("toy", data_dir=str(tmp_path), train_samples=n))  # noqa: E731
    assert as_rows(load(15).train) == [full[i] for i in order[:15]] and load(15).notes == []
    (folder / "train.csv").unlink()
    for n, source, rows in [(8, "train_10.csv", 8), (15, "train_20.csv", 15), (30, "train_20.csv", 20),
                            (0, "train_20.csv", 20)]:
        dataset = load(n)
        assert as_rows(dataset.train) == [full[i] for i in order[:rows]]
        assert f"no train.csv; using {source} as is" in dataset.notes[0]


def test_titles_keep_html_entities(load, data_root):
    with open(data_root / "Toy" / "id2name4Rec.json") as f:
        raw = json.load(f)
    assert load("toy").titles[3] == raw["3"] and "&amp;" in raw["3"]


def test_prompt_is_the_spec_template_exactly():
    prompt = data.build_prompt(data.dataset_info("office"), ["Pens &amp; Pencils", "Stapler"])
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nGiven a list of office products the "
        "user has used before, please recommend a new office product that the user likes to the user.\n\n"
        "### Input:\nThe user has used the following office products before: \"Pens &amp; Pencils\", \"Stapler\"\n\n"
        "### Response:\n")
    assert data.target_text("Stapler") == '"Stapler"'


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def make_root(tmp_path, csv_text, titles=None):
    folder = tmp_path / "Office"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "id2name4Rec.json").write_text(json.dumps(titles or {"1": "A", "2": "B", "3": "C"}))
    for name in ("train.csv", "valid.csv", "test.csv"):
        (folder / name).write_text("user_id,item_ids,timestamp\n1,\"[1, 2]\",5\n")
    (folder / "train.csv").write_text(csv_text)
    return tmp_path


def load_office(root):
    return data.load_dataset(data.DataConfig("office", data_dir=str(root), train_samples=0))


def test_malformed_csv_row_names_file_and_line(tmp_path):
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n2,"[1, 2",6\n')
    with pytest.raises(ValueError, match=r"train\.csv:3: malformed row"):
        load_office(root)
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n1,"[1, 3]",x\n')
    with pytest.raises(ValueError, match=r"train\.csv:3: malformed row"):
        load_office(root)


def test_unknown_item_id_is_named(tmp_path):
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n1,"[1, 99]",6\n')
    with pytest.raises(ValueError, match=r"train\.csv:3: item id 99 is not in id2name4Rec\.json"):
        load_office(root)


def test_title_with_a_literal_quote_is_read_as_the_raw_pipeline_writes_it(tmp_path, capsys):
    # Real releases hold a few (a nickname in quotes inside a product name). A '"' would close the
    # quoted target early, so it is read as &quot;, as clean_title() writes the raw dumps; one note
    # says how many titles changed.
    titles = {"1": "A", "2": 'The "B"', "3": '"C" &quot;D&quot;'}
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n', titles)
    dataset = load_office(root)
    assert dataset.titles == {1: "A", 2: "The &quot;B&quot;", 3: "&quot;C&quot; &quot;D&quot;"}
    assert amazon.clean_title('The "B"') == dataset.titles[2]
    note = "Office: 2 of 3 titles hold a literal '\"'; read as &quot; (as the raw pipeline writes them)"
    assert dataset.notes == [note]
    assert data.build_prompt(dataset.info, [dataset.titles[2]]).count('"') == 2
    assert data.main(["--dataset", "office", "--data-dir", str(root), "--train-samples", "0"]) == 0
    assert f"note: {note}\n" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["corrupt", "not utf-8", "a list", "a number as title", "a key that is no id",
                                  "a padded id"])
def test_bad_id2name4rec_json_is_one_line_naming_the_file(case, tmp_path, capsys):
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n')
    path = root / "Office" / "id2name4Rec.json"
    # "corrupt" is a file cut short: json's message alone (no file name) was all the CLI used to print.
    text, expected = {
        "corrupt": ('{\n    "1": "A",\n    "2": "B",\n    "3": "C",\n    "4": "Desk', r"not valid JSON \(Unterminated "
                                                                           r"string starting at: line 5 column 10"),
        "not utf-8": ('{"1": "caf\xe9"}', "not valid JSON .*utf-8"),
        "a list": ('["A", "B", "C"]', r'want a JSON object \{"<item id>": "<title>", ...\}, got a list'),
        "a number as title": ('{"1": "A", "2": 2, "3": "C"}', "title of item 2 is not a string: 2"),
        "a key that is no id": ('{"1": "A", "two": "B", "3": "C"}', "key 'two' is not an item id"),
        "a padded id": ('{"1": "A", "02": "B", "3": "C"}', "key '02' is not an item id"),
    }[case]
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {expected}"):
        load_office(root)
    # The CLI: `error: <path>: ...` on one line, exit status 2.
    assert data.main(["--dataset", "office", "--data-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1


def test_empty_history_is_rejected(tmp_path):
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n1,"[3]",6\n')
    with pytest.raises(ValueError, match=r"train\.csv:3: empty history"):
        load_office(root)


def test_missing_dataset_folder_and_file(tmp_path, monkeypatch):
    # One line that says how to point at the data or fetch it, whether the root or only the folder is missing.
    monkeypatch.delenv("BEAR_DATA", raising=False)
    for root in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match="missing dataset folder .*Office") as error:
            load_office(root)
        message = str(error.value)
        assert "\n" not in message and "--data-dir" in message and "$BEAR_DATA" in message
        assert f"python data.py --dataset office --download --data-dir {root}" in message
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data/Toy: .*fetch it: python data.py --dataset toy --download$"):
        data.load_dataset(data.DataConfig("Toy"))
    root = make_root(tmp_path, 'user_id,item_ids,timestamp\n1,"[1, 2]",5\n')
    (root / "Office" / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file .*test\.csv"):
        load_office(root)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    result = subprocess.run([sys.executable, str(REPO / "data.py"), "--dataset", "movies"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr == "error: unknown dataset 'movies'; valid datasets: office, " \
        "book, toy, clothing, or the path of a dataset folder (id2name4Rec.json, train.csv, test.csv, prompt.json)\n"
    for args in (["--dataset", "office", "--data-dir", str(tmp_path / "none"), "--stats"],
                 ["--raw-reviews", str(tmp_path / "r.json"), "--raw-meta", str(tmp_path / "m.json"), "--out", "x"]):
        assert data.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# The item trie


def test_trie_on_hand_made_sequences():
    eos = 9
    trie = data.ItemTrie.build({1: [5, 6, eos], 2: [5, 6, 7, eos], 3: [5, 6, eos], 4: [4, eos]}, eos)
    assert trie.num_nodes == 8   # root, 4, 4-eos, 5, 5-6, 5-6-7, 5-6-eos, 5-6-7-eos
    leaf_sets = sorted(sorted(s) for s in trie.leaf_items.values())
    assert leaf_sets == [[1, 3], [2], [4]]   # a duplicate title is one leaf; a title that is a prefix is fine
    node_56 = trie.path([5, 6, 7])[2]
    rows, tokens = trie.valid_next(torch.tensor([0, node_56, node_56, 0]))
    assert rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and tokens.tolist() == [4, 5, 7, 9, 7, 9, 4, 5]
    step = trie.step(torch.tensor([0, 0, -1, node_56, 0]), torch.tensor([5, 8, 5, 123456, -1]))
    assert step[0] > 0 and step[1:].tolist() == [-1, -1, -1, -1]
    with pytest.raises(ValueError, match="not a valid continuation"):
        trie.path([5, 8])
    with pytest.raises(ValueError, match="out of range"):
        trie.valid_next(torch.tensor([trie.num_nodes]))
    with pytest.raises(ValueError, match="must end with eos"):
        data.ItemTrie.build({1: [5, 6]}, eos)


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
@pytest.mark.parametrize("name", NAMES)
def test_trie_paths_leaves_and_valid_next_against_brute_force(name, tok_name, load, trie_of, oracles):
    dataset, trie, oracle = load(name), trie_of(name, tok_name), oracles[tok_name]
    items = sorted(dataset.titles)
    # Oracle token sequences straight from the HF library.
    encoded = oracle.encode_many(['"' + dataset.titles[i] + '"' for i in items])
    sequences = {i: tuple(ids) + (oracle.eos_id,) for i, ids in zip(items, encoded)}
    assert trie.item_tokens == sequences
    # Every item's path: it starts at the root, each step follows the item's next token, the last one (EOS) lands on
    # a leaf whose id set is exactly the ids sharing that title. All steps of all items in one vectorised call.
    lengths = torch.tensor([len(sequences[i]) for i in items])
    path_nodes = torch.cat([trie.item_path(i) for i in items])                     # (sum L,)
    path_tokens = torch.tensor([t for i in items for t in sequences[i]])          # (sum L,)
    after = trie.step(path_nodes, path_tokens)
    ends = lengths.cumsum(0) - 1
    inner = torch.ones(len(after), dtype=torch.bool)
    inner[ends] = False
    assert (after >= 0).all(), "an item's path leaves the trie"
    assert (path_nodes[ends - lengths + 1] == 0).all()
    assert torch.equal(after[inner], path_nodes[1:][inner[:-1]])
    ids_by_title = defaultdict(set)
    for i in items:
        ids_by_title[dataset.titles[i]].add(i)
    assert [trie.leaf_items[n] for n in after[ends].tolist()] == [ids_by_title[dataset.titles[i]] for i in items]
    assert len(trie.leaf_items) == len(ids_by_title)      # duplicate titles are one leaf
    # valid_next of every inner node against a brute-force table: prefix -> set of next tokens.
    next_tokens, prefix_of = defaultdict(set), {}
    flat_nodes, start = path_nodes.tolist(), 0
    for i in items:
        seq = sequences[i]
        for d in range(len(seq)):
            next_tokens[seq[:d]].add(seq[d])
            prefix_of[flat_nodes[start + d]] = seq[:d]
        start += len(seq)
    assert len(prefix_of) + len(trie.leaf_items) == trie.num_nodes   # one node per distinct prefix
    query = torch.tensor(sorted(prefix_of))
    rows, tokens = trie.valid_next(query)
    expected = {(node, t) for node, prefix in prefix_of.items() for t in next_tokens[prefix]}
    assert len(rows) == len(expected) and set(zip(query[rows].tolist(), tokens.tolist())) == expected
    order = rows * (tokens.max() + 1) + tokens
    assert (order.diff() > 0).all()                       # rows in order, tokens sorted within a row
    assert trie.valid_next(torch.tensor(sorted(trie.leaf_items)))[0].numel() == 0


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
@pytest.mark.parametrize("name", NAMES)
def test_tokenisation_consistency(name, tok_name, load, tokenizers, oracles):
    """encode(prompt + target) == encode(prompt) + encode(target): for EVERY item's target after the prompt's
    fixed ending, and for a sample of 300 full examples per dataset (the --stats CLI counts every window)."""
    dataset, tokenizer, oracle = load(name), tokenizers[tok_name], oracles[tok_name]
    ending = "### Response:\n"
    targets = ['"' + t + '"' for t in sorted(set(dataset.titles.values()))]
    joined = oracle.encode_many([ending + t for t in targets])
    alone = oracle.encode_many(targets)
    head = oracle.encode(ending)
    item_mismatches = sum(j != head + a for j, a in zip(joined, alone))
    examples = random.Random(0).sample(dataset.train + dataset.valid + dataset.test, 300)
    mismatches = data.tokenization_mismatches(examples, dataset, tokenizer)
    print(f"{name}/{tok_name}: {item_mismatches} of {len(targets)} titles, {len(mismatches)} of 300 examples mismatch")
    assert item_mismatches == 0 and mismatches == []


def test_tokenisation_check_detects_a_mismatch(load):
    class MergingTokenizer:   # joins "\n" and a following '"' into one token, as a careless BPE could
        def encode(self, text):
            return [ord(c) for c in text.replace('\n"', "\x00")]
    dataset = load("office")
    assert len(data.tokenization_mismatches(dataset.test[:3], dataset, MergingTokenizer())) == 3


# ----------------------------------------------------------------------------------------------------------------
# Encoded examples and batches


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
def test_encoding_and_training_batches(tok_name, load, tokenizers, trie_of, oracles):
    dataset, tokenizer, oracle, trie = load("office"), tokenizers[tok_name], oracles[tok_name], trie_of("office", tok_name)
    examples = dataset.train[:7]
    encoded = data.encode_examples(examples, dataset, tokenizer, trie)
    pad = 77777
    batch = data.collate_train(encoded, pad)
    expected_rows, expected_labels = [], []
    for e in examples:
        titles = ", ".join('"' + dataset.titles[i] + '"' for i in e.history)
        prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  + dataset.info.instruction + "\n\n### Input:\n" + dataset.info.prefix + " " + titles +
                  "\n\n### Response:\n")
        prompt_ids = ([oracle.bos_id] if oracle.add_bos else []) + oracle.encode(prompt)
        target_ids = oracle.encode('"' + dataset.titles[e.target] + '"') + [oracle.eos_id]
        expected_rows.append((prompt_ids, target_ids))
        expected_labels += target_ids
    T = max(len(p) + len(t) for p, t in expected_rows)
    assert batch["input_ids"].shape == batch["label_mask"].shape == (len(examples), T)
    assert batch["input_ids"].dtype == torch.long and batch["label_mask"].dtype == torch.bool
    for row, (p, t) in enumerate(expected_rows):
        assert batch["input_ids"][row].tolist() == p + t + [pad] * (T - len(p) - len(t))
        # the logits at position q predict token q + 1: marked exactly where the NEXT token is a target token
        assert batch["label_mask"][row].nonzero().flatten().tolist() == list(range(len(p) - 1, len(p) + len(t) - 1))
    assert batch["labels"].tolist() == expected_labels
    assert batch["num_label_tokens"] == len(expected_labels)
    # label_nodes: the root first, then each step of the trie along the labels; every label is a valid next token
    nodes, labels = batch["label_nodes"], batch["labels"]
    rows, tokens = trie.valid_next(nodes)
    valid = set(zip(rows.tolist(), tokens.tolist()))
    assert all((j, int(labels[j])) in valid for j in range(len(labels)))
    starts = np.cumsum([0] + [len(t) for _, t in expected_rows])[:-1]
    assert nodes[starts].tolist() == [0] * len(examples)
    after = trie.step(nodes, labels)
    not_last = torch.ones(len(labels), dtype=torch.bool)
    not_last[np.cumsum([len(t) for _, t in expected_rows]) - 1] = False
    assert torch.equal(after[not_last], nodes[1:][not_last[:-1]])
    assert all(int(after[j]) in trie.leaf_items for j in np.flatnonzero(~not_last.numpy()))


def test_prompt_batches_are_left_padded():
    input_ids, attention_mask = data.collate_prompts([[5, 6, 7], [8], [1, 2]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


# ----------------------------------------------------------------------------------------------------------------
# The raw pipeline, against a straightforward re-implementation of SPEC §6


def make_raw_dump(rng):
    """About 40 users and 25 items with timestamp ties, untitled items, 1-character and " VHS" titles, and a
    sparse tail that the 5-core needs several rounds to remove."""
    metas = []
    for a in range(30):
        title = f"Item {a} &amp; more"
        if a % 11 == 3:
            title = "X"                       # too short: dropped
        elif a % 7 == 2:
            title = f"  Movie {a} VHS"        # trailing " VHS" stripped
        elif a == 8:
            title = 'The "Quoted" Item'      # a literal quote is written as &quot;, as the dumps do
        meta = {"asin": f"A{a:03d}", "title": title} if a % 13 != 5 else {"asin": f"A{a:03d}"}
        metas.append(meta)
    reviews = []
    for u in range(45):
        for _ in range(rng.randint(3, 16)):
            reviews.append({"reviewerID": f"U{u}", "asin": f"A{rng.randint(0, 29):03d}", "overall": 5.0,
                            "unixReviewTime": 1000 + 10 * rng.randint(0, 40)})
    # A fringe only iteration removes: A100 (2 reviews) goes in round 1, which leaves U90 with 4 reviews, so U90
    # goes in round 2.
    chain = [("U90", "A000"), ("U90", "A001"), ("U90", "A004"), ("U90", "A006"), ("U90", "A100"), ("U91", "A100")]
    reviews += [{"reviewerID": u, "asin": a, "unixReviewTime": 5} for u, a in chain]
    metas += [{"asin": "A100", "title": "Fringe one"}]
    return reviews, metas


def oracle_pipeline(reviews, metas):
    titles = {}
    for m in metas:
        t = m.get("title")
        if t is None:
            continue
        t = t.strip()
        if t.endswith(" VHS"):
            t = t[:-4].strip()
        if len(t) > 1:
            titles[m["asin"]] = t.replace('"', "&quot;")
    events = [(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in reviews if r["asin"] in titles]
    rounds = 0
    while True:   # remove sparse users, then sparse items, until nothing changes (the k-core is unique)
        rounds += 1
        users = Counter(e[0] for e in events)
        after_users = [e for e in events if users[e[0]] >= 5]
        items = Counter(e[1] for e in after_users)
        after_items = [e for e in after_users if items[e[1]] >= 5]
        if after_items == events:
            break
        events = after_items
    user_ids, item_ids = {}, {}
    for u, a, _ in events:
        if u not in user_ids:
            user_ids[u] = len(user_ids) + 1
        if a not in item_ids:
            item_ids[a] = len(item_ids) + 1
    windows = []
    for u in sorted(user_ids, key=user_ids.get):
        mine = [e for e in events if e[0] == u]
        mine = sorted(mine, key=lambda e: e[2])
        seq = [item_ids[e[1]] for e in mine]
        n = len(seq)
        for i in range(min(10, n - 1), n):
            windows.append((user_ids[u], tuple(seq[max(i - 10, 0):i + 1]), mine[i][2]))
    windows = sorted(windows, key=lambda w: w[2])
    n = len(windows)
    splits = {"train": windows[:int(n * 0.8)], "valid": windows[int(n * 0.8):int(n * 0.9)],
              "test": windows[int(n * 0.9):]}
    return splits, {str(i): titles[a] for a, i in item_ids.items()}, rounds


@pytest.mark.parametrize("year", [2014, 2018])
def test_raw_pipeline_against_a_plain_reimplementation(year, tmp_path):
    reviews, metas = make_raw_dump(random.Random(year))
    if year == 2014:   # reviews: JSON lines; meta: Python-literal lines
        reviews_path, meta_path = tmp_path / "reviews_Office_Products_5.json", tmp_path / "meta_Office_Products.json"
        reviews_path.write_text("".join(json.dumps(r) + "\n" for r in reviews))
        meta_path.write_text("".join(repr(m) + "\n" for m in metas))
    else:              # both JSON lines, gzipped
        reviews_path, meta_path = tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz"
        with gzip.open(reviews_path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in reviews)
        with gzip.open(meta_path, "wt") as f:
            f.writelines(json.dumps(m) + "\n" for m in metas)
    out = tmp_path / "out" / "Office"
    stats = amazon.build_from_raw(reviews_path, meta_path, out)
    splits, id2name, rounds = oracle_pipeline(reviews, metas)
    assert rounds >= 3, "the fixture should need several 5-core rounds"
    for name, expected in splits.items():
        assert read_csv_rows(out / f"{name}.csv") == expected
    assert json.loads((out / "id2name4Rec.json").read_text()) == id2name
    assert stats["items"] == len(id2name) and not any("VHS" in t for t in id2name.values())
    assert "The &quot;Quoted&quot; Item" in id2name.values()
    # the rebuilt folder loads, and the statistics reconstructed from its windows are the pipeline's own
    config = data.DataConfig("office", data_dir=str(out.parent), train_samples=0)
    assert len(data.load_dataset(config).train) == len(splits["train"])
    rebuilt = data.dataset_statistics(config)
    assert (rebuilt["users"], rebuilt["items"], rebuilt["interactions"]) == \
        (stats["users"], stats["items"], stats["interactions"])


# ----------------------------------------------------------------------------------------------------------------
# --download against a local HTTP server


class ReleaseHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.endswith("test.csv") and b"cut" in self.files.get("/mode", b""):
            self.wfile.write(body[:len(body) // 2])   # the connection drops mid-file
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def release_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_is_atomic_and_reports_missing_and_offline(tmp_path, release_server):
    assert amazon.DEFAULT_DOWNLOAD_URL == "https://raw.githubusercontent.com/Tiny-Snow/BEAR-SIGIR-2026/main/data"
    # The authors' release layout, <url>/<Folder>/<file>; this one lacks train_10000.csv.
    csv_text = b"user_id,item_ids,timestamp\n" + b"".join(b'1,"[1, 2]",%d\n' % t for t in range(5000))
    ReleaseHandler.files = {"/Toy/id2name4Rec.json": b'{"1": "A", "2": "B"}', "/Toy/train.csv": csv_text,
                            "/Toy/test.csv": csv_text, "/mode": b"cut"}
    url = f"http://127.0.0.1:{release_server.server_address[1]}"
    config = data.DataConfig("toy", data_dir=str(tmp_path), train_samples=100)
    with pytest.raises(ConnectionError, match="test.csv"):
        amazon.download_dataset(config, url, timeout=10)
    folder = tmp_path / "Toy"
    assert not (folder / "test.csv").exists() and not list(folder.glob("*.tmp"))
    assert (folder / "train.csv").read_bytes() == csv_text           # completed files stay
    ReleaseHandler.files["/mode"] = b"whole"
    assert data.main(["--dataset", "toy", "--download", "--download-url", url, "--data-dir", str(tmp_path)]) == 0
    assert (folder / "test.csv").read_bytes() == csv_text
    log = amazon.download_dataset(config, url, timeout=10)
    assert any("train_10000.csv: not in the release" in line for line in log)
    assert any("train.csv: already present" in line for line in log)
    # What the release gives loads: the full train.csv is sampled, valid is its chronologically last 1/9.
    dataset = data.load_dataset(config)
    assert len(dataset.valid) == 5000 // 9 and len(dataset.train) < 100
    assert any("no valid.csv; valid = the chronologically last 1/9 of train.csv" in n for n in dataset.notes)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ConnectionError, match="offline"):
        amazon.download_dataset(data.DataConfig("book", data_dir=str(tmp_path)), f"http://127.0.0.1:{port}", timeout=5)


def test_trie_children_are_distinct_and_sorted():
    # The masked losses count a repeated (row, token) pair of valid_next twice, so a node's children must be
    # distinct tokens; build() guarantees it and the constructor checks it once (not every loss call).
    eos = 9
    trie = data.ItemTrie.build({1: [5, 6, eos], 2: [5, 6, 7, eos], 3: [4, eos]}, eos)
    rest = (trie.leaf_items, trie.leaf_count, trie.item_tokens, trie._item_path_ptr, trie._item_path_nodes, trie._item_row)
    child_ptr = trie.child_ptr.clone()
    child_ptr[1:] += 1                                                    # the root gets one more edge ...
    repeated = torch.cat([trie.child_token[:1], trie.child_token])       # ... repeating its first child's token
    with pytest.raises(ValueError, match="duplicates"):
        data.ItemTrie(child_ptr, repeated, torch.cat([trie.child_node[:1], trie.child_node]), *rest)
    swapped = trie.child_token.clone()
    swapped[[0, 1]] = swapped[[1, 0]]                                     # the root's children out of order
    with pytest.raises(ValueError, match="sorted"):
        data.ItemTrie(trie.child_ptr, swapped, trie.child_node, *rest)
    data.ItemTrie(trie.child_ptr, trie.child_token, trie.child_node, *rest)  # build()'s own arrays pass

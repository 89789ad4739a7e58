"""A dataset of your own: any folder in the processed format, worded by its prompt.json, from the raw pipeline
through train.py and eval.py. Oracles: the SPEC §1 wording of the paper datasets, the CSV files themselves, and
the CLIs run end to end from other working directories."""
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import amazon  # noqa: E402
import data  # noqa: E402
from test_data import as_rows, make_raw_dump, read_csv_rows  # noqa: E402

GAMES_PROMPT = {"instruction": "Given a list of video games the user has used before, please recommend a new video "
                               "game that the user likes to the user.",
                "prefix": "The user has used the following video games before:"}


def write_raw_dump(folder: Path, seed: int = 1) -> tuple[Path, Path]:
    """A 2014-style Video_Games dump (reviews JSON lines, meta Python literals): 38 users, 25 items after the
    5-core, 56 windows."""
    reviews, metas = make_raw_dump(random.Random(seed))
    folder.mkdir(parents=True, exist_ok=True)
    reviews_path, meta_path = folder / "reviews_Video_Games_5.json", folder / "meta_Video_Games.json"
    reviews_path.write_text("".join(json.dumps(r) + "\n" for r in reviews))
    meta_path.write_text("".join(repr(m) + "\n" for m in metas))
    return reviews_path, meta_path


@pytest.fixture
def games(tmp_path) -> Path:
    """A Video_Games folder built by the raw pipeline."""
    amazon.build_from_raw(*write_raw_dump(tmp_path / "raw"), tmp_path / "games")
    return tmp_path / "games"


# ----------------------------------------------------------------------------------------------------------------
# The default wording


def test_category_from_the_dump_file_names():
    assert amazon.category_of("reviews_Video_Games_5.json") == "video games"                 # 2014
    assert amazon.category_of("/dumps/Video_Games_5.json.gz") == "video games"               # 2018
    assert amazon.category_of("reviews_Toys_and_Games_5.json") == "toys and games"


def test_default_prompt_follows_the_paper_wording():
    assert data.default_prompt("video games") == GAMES_PROMPT
    office = data.DATASETS["office"]   # the paper's generic "used" wording, word for word
    assert data.default_prompt("office products") == {"instruction": office.instruction, "prefix": office.prefix}
    for category, one in [("toys and games", "toy and game"), ("cell phones and accessories", "cell phone and "
                          "accessory"), ("clothing", "clothing"), ("Beauty", "beauty"), ("glass", "glass")]:
        assert f"please recommend a new {one} that" in data.default_prompt(category)["instruction"]


# ----------------------------------------------------------------------------------------------------------------
# Loading a folder


def test_raw_pipeline_writes_the_prompt_file_and_keeps_an_edited_one(tmp_path, games):
    assert json.loads((games / "prompt.json").read_text()) == GAMES_PROMPT
    edited = {"instruction": "Pick the next game.", "prefix": "Played:"}
    (games / "prompt.json").write_text(json.dumps(edited))
    amazon.build_from_raw(tmp_path / "raw" / "reviews_Video_Games_5.json", tmp_path / "raw" / "meta_Video_Games.json",
                        games)
    assert json.loads((games / "prompt.json").read_text()) == edited


def test_a_folder_loads_with_its_own_wording_by_absolute_or_relative_path(games, monkeypatch):
    dataset = data.load_dataset(data.DataConfig(str(games), train_samples=0))
    assert dataset.info == data.DatasetInfo(str(games.resolve()), **GAMES_PROMPT)
    for split in ("train", "valid", "test"):
        assert as_rows(getattr(dataset, split)) == read_csv_rows(games / f"{split}.csv")
    assert dataset.notes == []
    example = dataset.test[0]
    titles = ", ".join(f'"{dataset.titles[i]}"' for i in example.history)
    assert dataset.prompt(example).endswith(f"### Instruction:\n{GAMES_PROMPT['instruction']}\n\n### Input:\n"
                                            f"{GAMES_PROMPT['prefix']} {titles}\n\n### Response:\n")
    monkeypatch.chdir(games.parent)
    monkeypatch.setenv("BEAR_DATA", "/nowhere")          # the data root plays no part for a folder
    relative = data.load_dataset(data.DataConfig("games", train_samples=0))
    assert relative.info == dataset.info and relative.test == dataset.test


def test_without_valid_csv_the_last_ninth_of_train_is_held_out(games, capsys):
    full = read_csv_rows(games / "train.csv")
    (games / "valid.csv").unlink()
    dataset = data.load_dataset(data.DataConfig(str(games), train_samples=0))
    by_time = sorted(range(len(full)), key=lambda i: full[i][2])
    held = sorted(by_time[len(full) - len(full) // 9:])
    assert as_rows(dataset.valid) == [full[i] for i in held]
    assert as_rows(dataset.train) == [row for i, row in enumerate(full) if i not in held]
    assert dataset.notes == [f"games: no valid.csv; valid = the chronologically last 1/9 of train.csv "
                             f"({len(held)} windows), removed from the training pool"]
    # --stats works on a folder (no paper Table 1 to compare with) and prints the note
    assert data.main(["--dataset", str(games), "--stats", "--train-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("games: users ") and "Table 1" not in out and "chronologically last 1/9" in out


def test_paper_names_keep_their_wording_and_folders_of_that_name_are_looked_up_by_name(tmp_path, games):
    root = tmp_path / "root"
    root.mkdir()
    games.rename(root / "Office")   # an Office folder that happens to hold a prompt.json
    by_name = data.load_dataset(data.DataConfig("OFFICE", data_dir=str(root), train_samples=0))
    assert by_name.info == data.DATASETS["office"]
    by_path = data.load_dataset(data.DataConfig(str(root / "Office"), train_samples=0))
    assert by_path.info.instruction == GAMES_PROMPT["instruction"]
    (root / "Office" / "prompt.json").unlink()   # a path to a paper-named folder without one: the error says how
    with pytest.raises(FileNotFoundError, match=f"missing file .*prompt.json: .*--dataset office --data-dir {root}$"):
        data.load_dataset(data.DataConfig(str(root / "Office")))


@pytest.mark.parametrize("case", ["missing", "corrupt", "a list", "a missing key", "an extra key", "a number",
                                  "an empty prefix"])
def test_bad_prompt_file_is_one_line_naming_the_file(case, games, capsys):
    path = games / "prompt.json"
    text, expected = {
        "missing": (None, "missing file .*prompt.json: a dataset folder of your own needs its prompt wording"),
        "corrupt": ('{"instruction": "Pick', "not valid JSON"),
        "a list": ('["Pick a game.", "Played:"]', "want"),
        "a missing key": ('{"instruction": "Pick a game."}', "want"),
        "an extra key": ('{"instruction": "Pick a game.", "prefix": "Played:", "prefx": "x"}', "want"),
        "a number": ('{"instruction": 3, "prefix": "Played:"}', "want"),
        "an empty prefix": ('{"instruction": "Pick a game.", "prefix": " "}', "want"),
    }[case]
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=expected) as error:
        data.load_dataset(data.DataConfig(str(games)))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert data.main(["--dataset", str(games)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# End to end: raw dump -> data.py -> train.py -> eval.py, each CLI from its own working directory


def test_raw_pipeline_then_train_then_eval_through_the_clis(tmp_path, smollm2_dir, monkeypatch, capsys):
    import eval as evaluation
    import train
    from test_train import make_tiny_llama
    model = make_tiny_llama(tmp_path / "model", smollm2_dir)
    reviews, meta = write_raw_dump(tmp_path / "raw")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("BEAR_DATA", raising=False)
    assert data.main(["--raw-reviews", str(reviews), "--raw-meta", str(meta), "--out", "games"]) == 0
    assert "prompt wording: games/prompt.json" in capsys.readouterr().out

    # A relative --dataset: train.py records the folder's absolute path, so eval.py finds it from anywhere.
    flags = dict(dataset="games", model=model, out="run", loss="bear", train_samples=0, limit=8, epochs=1,
                 global_batch=4, micro_batch=2, lr=1e-2, warmup_steps=1, beam_width=3, valid_limit=2, eval_batch=2,
                 dtype="fp32")
    argv = [x for name, value in flags.items() for x in (f"--{name.replace('_', '-')}", str(value))]
    assert train.main(argv) == 0
    recorded = json.loads((work / "run" / "train_config.json").read_text())
    assert recorded["dataset"] == str(work / "games")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dump = tmp_path / "preds.jsonl"
    assert evaluation.main(["--ckpt", str(work / "run"), "--dump", str(dump), "--batch", "3"]) == 0
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    test_rows = read_csv_rows(work / "games" / "test.csv")
    assert metrics["num_examples"] == len(test_rows) == 6
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    items = {int(i) for i in json.loads((work / "games" / "id2name4Rec.json").read_text())}
    assert [r["target"] for r in records] == [row[1][-1] for row in test_rows]
    assert all(1 <= len(r["beams"]) <= 3 and set(r["beams"][0]["items"]) <= items for r in records)


def test_a_title_with_a_literal_quote_trains_evaluates_and_is_found(tmp_path, games, smollm2_dir,
                                                                    capsys):
    """Real releases hold a few titles with a literal '"' (a nickname in quotes in a product name).
    Such a folder trains and evaluates, its title read as &quot; (as the raw pipeline writes it),
    and the beam search reaches that item like any other."""
    import beam
    import eval as evaluation
    import torch
    import train
    from model import load_model
    from test_data import HFTokenizer
    from test_train import make_tiny_llama
    from tokenizer import load_tokenizer
    model_dir = make_tiny_llama(tmp_path / "model", smollm2_dir)
    titles = json.loads((games / "id2name4Rec.json").read_text())
    test_rows = read_csv_rows(games / "test.csv")
    quoted = test_rows[0][1][-1]                       # the first test window's target
    titles[str(quoted)] = 'Pac "Rocket" Man'
    (games / "id2name4Rec.json").write_text(json.dumps(titles))
    dataset = data.load_dataset(data.DataConfig(str(games), train_samples=0))
    assert dataset.titles[quoted] == "Pac &quot;Rocket&quot; Man"
    note = (f"games: 1 of {len(titles)} titles hold a literal '\"'; read as &quot; (as the raw "
            f"pipeline writes them)")
    assert dataset.notes == [note]

    flags = dict(dataset=games, model=model_dir, out=tmp_path / "run", loss="bear", train_samples=0,
                 limit=8, epochs=1, global_batch=4, micro_batch=2, lr=1e-2, warmup_steps=1,
                 beam_width=3, valid_limit=2, eval_batch=2, dtype="fp32")
    argv = [x for name, value in flags.items() for x in (f"--{name.replace('_', '-')}", str(value))]
    assert train.main(argv) == 0
    assert f"note: {note}" in capsys.readouterr().out
    dump = tmp_path / "preds.jsonl"
    assert evaluation.main(["--ckpt", str(tmp_path / "run"), "--dump", str(dump)]) == 0
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["target"] for r in records] == [row[1][-1] for row in test_rows]

    # In the trie like any other item: its target tokens decode (HF `tokenizers`, the oracle) to the
    # title in quotes, and a search as wide as the trie has leaves returns every leaf, this one too.
    tokenizer = load_tokenizer(model_dir)
    trie = data.build_trie(dataset, tokenizer)
    oracle = HFTokenizer(model_dir / "tokenizer.json", "<|im_start|>", "<|im_end|>", False)
    tokens = trie.item_tokens[quoted]
    assert tokens[-1] == oracle.eos_id
    assert oracle.decode(tokens[:-1]) == '"Pac &quot;Rocket&quot; Man"'
    model = load_model(model_dir, dtype=torch.float32)
    prompt = data.prompt_tokens(dataset.prompt(dataset.test[0]), tokenizer)
    config = beam.BeamConfig(beam_width=len(trie.leaf_items))
    found = beam.beam_search(model, [prompt], trie, tokenizer.eos_id, tokenizer.pad_id, config)[0]
    leaves = sorted(sorted(items) for items in trie.leaf_items.values())
    assert sorted(sorted(items) for items, _ in found) == leaves
    assert frozenset({quoted}) in {items for items, _ in found}

"""load_tokenizer against independent oracles: the Hugging Face `tokenizers` library (Llama-3 from its tiktoken
file and from tokenizer.json, SmolLM2 from tokenizer.json) and the `sentencepiece` library (a tiny model trained
here), on every item title of the four datasets, the SPEC §1 prompt, and edge cases."""
import io
import json
import shutil

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer

import tokenizer as M

DATASETS = {  # SPEC §1: instruction and prefix per dataset
    "Toy": ("Given a list of toys the user has played before, please recommend a new toy that the user likes to the user.",
            "The user has played the following toys before:"),
    "Book": ("Given a list of books the user has read before, please recommend a new book that the user likes to the user.",
             "The user has read the following books before:"),
    "Office": ("Given a list of office products the user has used before, please recommend a new office product that "
               "the user likes to the user.", "The user has used the following office products before:"),
    "Clothing": ("Given a list of clothing the user has worn before, please recommend a new clothing that the user "
                 "likes to the user.", "The user has worn the following clothing before:"),
}
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n"
          "### Input:\n{prefix} {titles}\n\n"
          "### Response:\n")

EDGE_CASES = [
    "", " ", "   ", "\n", "\n\n\n", " \n ", "\r\n\r\n", "\t\tx", "a\u00a0b\u2003c",
    "12345678901", " 123 4567", "abc  123", "x1y2z3", "3.14159, 2,718 and 1e10", "Pack of 12", "A 4-Pack 8.5x11",
    "hello   world", "   leading", "trailing   ", "end with spaces and newline  \n",
    "naïve café Zürich", "日本語のテキスト", "Ελληνικά Русский עברית العربية", "½ ² Ⅻ ٣٤٥ ๓",
    "emoji 😀👍🏽 test 🇫🇷", "don't it's I'M we'll THEY'RE", "Tom &amp; Jerry &quot;Toys&quot;",
    "<|im_end|>", "<|begin_of_text|>hi<|end_of_text|>", "<|eot_id|> <s> </s> <unk> <|endoftext|>",
]
SPECIAL_TEXT = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def titles(data_root):
    found = []
    for name in DATASETS:
        found += json.loads((data_root / name / "id2name4Rec.json").read_text(encoding="utf-8")).values()
    assert len(found) > 40000
    return found


@pytest.fixture(scope="module")
def prompts(titles, data_root):
    """SPEC §1 prompts, each followed by a quoted target title as in training."""
    texts = []
    for name, (instruction, prefix) in DATASETS.items():
        items = list(json.loads((data_root / name / "id2name4Rec.json").read_text(encoding="utf-8")).values())
        for start in range(0, 50, 10):
            history = ", ".join('"' + t + '"' for t in items[start:start + 9])
            texts.append(PROMPT.format(instruction=instruction, prefix=prefix, titles=history)
                         + '"' + items[start + 9] + '"')
    return texts


def plain_text_oracle(tokenizer_json):
    """The HF tokenizer with its added tokens removed: special-token text is then encoded as plain text,
    which is what our encode() promises for user data."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(spec))


ROUTES = ["llama3-tokenizer.json", "smollm2-tokenizer.json"]


@pytest.fixture(scope="module", params=ROUTES)
def route(request, llama3_tokenizer_dir, smollm2_dir):
    """(ours, HF oracle, plain-text HF oracle, route name)."""
    if request.param == "llama3-tokenizer.json":
        ours, json_file = M.load_tokenizer(llama3_tokenizer_dir), llama3_tokenizer_dir / "tokenizer.json"
    else:
        ours, json_file = M.load_tokenizer(smollm2_dir), smollm2_dir / "tokenizer.json"
    return ours, HFTokenizer.from_file(str(json_file)), plain_text_oracle(json_file), request.param


def hf_encode(oracle, texts):
    return [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]


def test_every_dataset_title_matches_hf(route, titles):
    ours, oracle, _, _ = route
    quoted = ['"' + t + '"' for t in titles]                    # the target form used for the trie (SPEC §2)
    for texts in (titles, quoted):
        expected = hf_encode(oracle, texts)
        mismatches = [(t, e) for t, e in zip(texts, expected) if ours.encode(t) != e]
        assert not mismatches, mismatches[:3]


def test_titles_decode_round_trip(route, titles):
    ours = route[0]
    assert all(ours.decode(ours.encode(t)) == t for t in titles)


def test_prompt_template_matches_hf(route, prompts):
    ours, oracle, _, _ = route
    for text, expected in zip(prompts, hf_encode(oracle, prompts)):
        assert ours.encode(text) == expected
        assert ours.decode(expected) == text


def test_edge_cases_match_hf_with_special_token_text_as_plain_text(route):
    ours, _, plain, name = route
    for text, expected in zip(EDGE_CASES, hf_encode(plain, EDGE_CASES)):
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text, text
    special_ids = {ours.token_id(t) for t in SPECIAL_TEXT} - {None}
    assert special_ids                                            # the vocabulary has some of them
    for text in SPECIAL_TEXT:
        assert not special_ids & set(ours.encode(text)), text


def test_smollm2_digit_split_is_applied_before_the_gpt2_regex(smollm2_dir):
    """Sequence[Digits, ByteLevel] runs the GPT-2 regex on each piece after the digit split. One combined regex
    would glue the space to the digit (' 1') or treat the space before a digit as trailing whitespace."""
    ours, plain = M.load_tokenizer(smollm2_dir), plain_text_oracle(smollm2_dir / "tokenizer.json")
    for text in ["a 1", "x  5", "size 10 in", "  7", "v2 and v 3"]:
        expected = plain.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected.ids
        assert not any(t.startswith("Ġ") and t[1:].isdigit() for t in expected.tokens)  # no 'Ġ1' pieces


def test_digit_runs_kept_together_when_individual_digits_is_false(tmp_path, smollm2_dir):
    def runs(spec):
        spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    folder = smollm2_json_variant(tmp_path, smollm2_dir, runs)
    ours, plain = M.load_tokenizer(folder), plain_text_oracle(folder / "tokenizer.json")
    for text in EDGE_CASES + ["ab12cd 345 6", "1", "x1"]:
        assert ours.encode(text) == plain.encode(text, add_special_tokens=False).ids, text


def test_control_characters_missing_from_smollm2_vocab_are_dropped_like_hf(smollm2_dir):
    ours, plain = M.load_tokenizer(smollm2_dir), plain_text_oracle(smollm2_dir / "tokenizer.json")
    for text in ["a\x04b", "x\x1dy z", "\x06"]:
        assert ours.encode(text) == plain.encode(text, add_special_tokens=False).ids


def test_special_ids_and_add_bos(llama3_tokenizer_dir, smollm2_dir):
    hf_llama3 = HFTokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    for ours in (M.load_tokenizer(llama3_tokenizer_dir), M.load_tokenizer(llama3_tokenizer_dir / "tokenizer.json")):
        assert ours.bos_id == hf_llama3.token_to_id("<|begin_of_text|>") == 128000
        assert ours.eos_id == ours.pad_id == hf_llama3.token_to_id("<|end_of_text|>") == 128001
        assert ours.add_bos and ours.vocab_size == 128256
        # all 256 special tokens decode to the names tokenizer.json gives them
        special_ids = list(range(128000, 128256))
        assert ours.decode(special_ids) == hf_llama3.decode(special_ids, skip_special_tokens=False)
    smol = M.load_tokenizer(smollm2_dir)
    hf_smol = HFTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert smol.eos_id == smol.pad_id == hf_smol.token_to_id("<|im_end|>") == 2
    assert smol.bos_id == hf_smol.token_to_id("<|im_start|>") and not smol.add_bos and smol.vocab_size == 49152
    assert smol.decode([1, 9690, 2]) == hf_smol.decode([1, 9690, 2], skip_special_tokens=False)


def test_post_processor_template_sets_add_bos(tmp_path, smollm2_dir):
    """Without tokenizer_config.json, the HF post-processor template decides add_bos (checked against HF)."""
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours = M.load_tokenizer(tmp_path)
    with_specials = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("hi", add_special_tokens=True).ids
    assert ours.add_bos and [ours.bos_id] + ours.encode("hi") == with_specials
    assert ours.eos_id == 0                                        # <|endoftext|>: no config, so the vocab's EOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False,
                                                                "eos_token": {"content": "<|im_end|>"}}))
    ours = M.load_tokenizer(tmp_path / "tokenizer.json")
    assert not ours.add_bos and ours.eos_id == ours.pad_id == 2


def test_tokenizer_json_wins_over_tokenizer_model_in_a_folder(tmp_path, llama3_tokenizer_dir, smollm2_dir):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(llama3_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    assert M.load_tokenizer(tmp_path).vocab_size == 49152
    # Meta's tiktoken file on its own is not read: a Llama-3 folder is read through its tokenizer.json.
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model .*tokenizer.json"):
        M.load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------- sentencepiece

@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sentencepiece_model(request, tmp_path_factory, titles):
    """A tiny Llama-2-style sentencepiece model (identity normalisation, byte fallback), trained here."""
    folder = tmp_path_factory.mktemp(f"sp_{request.param}")
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(titles[::20]), model_writer=proto, vocab_size=600, model_type=request.param,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.9995, split_digits=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    return folder


def test_sentencepiece_route_matches_the_library(sentencepiece_model, titles, prompts):
    oracle = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model / "tokenizer.model"))
    for ours in (M.load_tokenizer(sentencepiece_model), M.load_tokenizer(sentencepiece_model / "tokenizer.model")):
        texts = titles[::7] + prompts + EDGE_CASES
        for text, expected in zip(texts, oracle.encode(texts)):
            assert ours.encode(text) == expected, text
            assert ours.decode(expected) == oracle.decode(expected)
        assert all(ours.decode(ours.encode(t)) == t for t in titles[::7])
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (oracle.bos_id(), oracle.eos_id(), oracle.eos_id())
        assert ours.add_bos and ours.vocab_size == oracle.get_piece_size() == 600
        assert ours.bos_id not in ours.encode("<s> hi </s>") and ours.eos_id not in ours.encode("<s> hi </s>")


# --------------------------------------------------------------------------------------- bad inputs

def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer path not found"):
        M.load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer file in .*tokenizer.json, tokenizer.model"):
        M.load_tokenizer(tmp_path)


def test_unreadable_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        M.load_tokenizer(tmp_path)


def smollm2_json_variant(tmp_path, smollm2_dir, edit):
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return tmp_path


def test_bad_tokenizer_json(tmp_path, smollm2_dir):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        M.load_tokenizer(tmp_path)
    folder = smollm2_json_variant(tmp_path, smollm2_dir, lambda s: s.update(pre_tokenizer={"type": "Whitespace"}))
    with pytest.raises(ValueError, match="unsupported pre-tokenizer step"):
        M.load_tokenizer(folder)
    def prefix_space(spec):
        spec["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    folder = smollm2_json_variant(tmp_path, smollm2_dir, prefix_space)
    with pytest.raises(ValueError, match="add_prefix_space=true is not supported"):
        M.load_tokenizer(folder)
    folder = smollm2_json_variant(tmp_path, smollm2_dir, lambda s: s.update(normalizer={"type": "NFC"}))
    with pytest.raises(ValueError, match="only byte-level BPE without normalizer"):
        M.load_tokenizer(folder)

    def swap_merges(spec):
        merges = spec["model"]["merges"]
        merges[100], merges[5000] = merges[5000], merges[100]
    folder = smollm2_json_variant(tmp_path, smollm2_dir, swap_merges)
    with pytest.raises(ValueError, match="merge #101 .* inconsistent with the vocab ranks"):
        M.load_tokenizer(folder)


def test_tokenizer_config_names_unknown_token(tmp_path, smollm2_dir):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no_such_token|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|no_such_token\|>' is not in the vocabulary"):
        M.load_tokenizer(tmp_path)

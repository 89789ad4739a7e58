"""The tokenizers of Llama-family checkpoints, in pure Python over tiktoken / sentencepiece.

Two kinds of tokenizer file load, those Hugging Face Llama folders ship: a byte-level BPE
`tokenizer.json` (every Llama-3.x upload, SmolLM2), converted to tiktoken ranks, and a sentencepiece
`tokenizer.model` (the Llama-2 family). `load_tokenizer(folder)` picks one and reads BOS/EOS/pad
from tokenizer_config.json. The oracles in tests/test_tokenizer.py are HF `tokenizers`
and `sentencepiece` themselves, on the real Llama-3 and SmolLM2 files.
"""
import itertools
import json
import unicodedata
from pathlib import Path

from cli import read_json

# GPT-2's pattern, which HF's ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class Tokenizer:
    """encode(text) adds nothing (no BOS/EOS) and treats special-token text in user data as text.

    Two engines: tiktoken (HF byte-level BPE tokenizer.json converted to ranks), or sentencepiece
    (Llama-2 family). `pre_split` runs the pre-tokenizer steps before the regex one."""

    def __init__(self, *, bos_id, eos_id, pad_id, add_bos, vocab_size, token_ids: dict[str, int],
                 encoding=None, pre_split=None, dropped_ids=frozenset(), sentencepiece=None):
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.vocab_size = vocab_size
        self._token_ids = token_ids        # special / added token text -> id
        self._encoding, self._pre_split, self._sp = encoding, pre_split, sentencepiece
        self._dropped_ids = dropped_ids    # ids of bytes the vocabulary lacks (HF drops them)

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)   # sentencepiece never parses control-token text
        pieces = [text] if self._pre_split is None else self._pre_split(text)
        ids = [i for piece in pieces for i in self._encoding.encode_ordinary(piece)]
        return [i for i in ids if i not in self._dropped_ids] if self._dropped_ids else ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._encoding.decode(ids)

    def token_id(self, text: str) -> int | None:
        """The id of a special/added token given its text (e.g. "<|im_end|>"), or None."""
        return self._token_ids.get(text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which HF byte-level vocabularies are written:
    printable bytes stand for themselves, the others for chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = (chr(256 + i) for i in itertools.count())
    return {b: chr(b) if b in printable else next(others) for b in range(256)}


def _split_digits(individual: bool):
    """HF's Digits pre-tokenizer: numeric characters (Rust char::is_numeric = categories Nd, Nl, No)
    are isolated one by one (individual_digits) or as runs; the text between is one piece."""
    def is_numeric(ch):
        return ch.isnumeric() and unicodedata.category(ch)[0] == "N"

    def split(text: str) -> list[str]:
        pieces = []
        for numeric, run in itertools.groupby(text, key=is_numeric):
            run = "".join(run)
            pieces.extend(run if numeric and individual else [run])   # a str extends by characters
        return pieces
    return split


def _pre_tokenizer_steps(spec: dict | None, source: Path):
    """tokenizer.json's pre_tokenizer -> (Python pre-split function or None, tiktoken's regex).

    tiktoken runs one regex + BPE per call; a Digits step before it runs in Python on the pieces
    first. Running each step on the previous step's pieces (not one merged regex) is what HF does:
    SmolLM2's Sequence[Digits, ByteLevel] differs from a combined regex where lookaheads meet a
    digit boundary."""
    is_sequence = spec and spec.get("type") == "Sequence"
    steps = spec.get("pretokenizers", []) if is_sequence else [spec] if spec else []
    splitters, pattern = [], None
    for step in steps:
        kind, use_regex = step.get("type"), step.get("use_regex", True)
        if kind == "ByteLevel" and step.get("add_prefix_space"):
            raise ValueError(f"{source}: ByteLevel add_prefix_space=true is not supported")
        if kind == "Split" and pattern is None and "Regex" in step.get("pattern", {}) \
                and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]["Regex"]
        elif kind == "ByteLevel" and use_regex and pattern is None:
            pattern = GPT2_PATTERN
        elif kind == "ByteLevel" and not use_regex:
            pass                        # only maps bytes to printable characters: nothing to split
        elif kind == "Digits" and pattern is None:
            splitters.append(_split_digits(bool(step.get("individual_digits"))))
        else:
            raise ValueError(f"{source}: unsupported pre-tokenizer step {json.dumps(step)[:120]}")
    if pattern is None:
        raise ValueError(f"{source}: pre_tokenizer has no regex split step (need Split or "
                         "ByteLevel(use_regex))")

    def pre_split(text: str) -> list[str]:
        pieces = [text]
        for split in splitters:
            pieces = [p for piece in pieces for p in split(piece)]
        return pieces
    return (pre_split if splitters else None), pattern


def _post_processor_bos(spec: dict | None) -> str | None | bool:
    """The special token HF's TemplateProcessing puts before a lone sequence; False: no template."""
    if spec and spec.get("type") == "Sequence":
        found = (_post_processor_bos(inner) for inner in spec.get("processors", []))
        return next((bos for bos in found if bos is not False), False)
    if not spec or spec.get("type") != "TemplateProcessing":
        return False
    first = (spec.get("single") or [{}])[0]
    return first["SpecialToken"]["id"] if "SpecialToken" in first else None


def _from_tokenizer_json(path: Path):
    """HF byte-level BPE tokenizer.json -> (Encoding, pre_split, ids to drop, token ids, BOS)."""
    import tiktoken
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        bpe = spec["model"]
        vocab, merges = bpe["vocab"], bpe["merges"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e!r})") from None
    if bpe.get("type", "BPE") != "BPE" or bpe.get("byte_fallback") or spec.get("normalizer") \
            or bpe.get("continuing_subword_prefix") or bpe.get("end_of_word_suffix"):
        raise ValueError(f"{path}: only byte-level BPE without normalizer is supported (Llama-3, "
                         "SmolLM2 style)")
    pre_split, pattern = _pre_tokenizer_steps(spec.get("pre_tokenizer"), path)

    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    ranks = {}
    for token, rank in vocab.items():
        if token in added:
            continue                   # special tokens are decoded by tiktoken's special table
        try:
            ranks[bytes(byte_of[ch] for ch in token)] = rank
        except KeyError:
            raise ValueError(f"{path}: vocab entry {token!r} is not byte-level BPE text") from None
    if len(ranks) != len(set(ranks.values())):
        raise ValueError(f"{path}: vocab ids are not unique")
    # Some vocabularies lack a few bytes (SmolLM2: bytes that never occur in UTF-8, and six control
    # characters). HF drops such characters; tiktoken needs every byte ranked, so give them ids past
    # the vocabulary and filter those ids out after encoding.
    next_ids = itertools.count(max([*vocab.values(), *added.values()]) + 1)
    missing = {bytes([b]): next(next_ids) for b in range(256) if bytes([b]) not in ranks}
    ranks.update(missing)
    # tiktoken merges the adjacent pair whose result has the lowest rank; HF applies merges in list
    # order. The two agree when the merges are sorted by the result's id, which HF's conversions
    # guarantee; check it.
    previous = -1
    for i, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        result = vocab.get(left + right)
        if left not in vocab or right not in vocab or result is None or result < previous:
            raise ValueError(f"{path}: merge #{i} {left!r}+{right!r} is inconsistent with the "
                             "vocab ranks (cannot be run as tiktoken BPE)")
        previous = result
    rank_ids = set(ranks.values())
    specials = {text: i for text, i in added.items() if i not in rank_ids}
    encoding = tiktoken.Encoding(path.parent.name or "tokenizer", pat_str=pattern,
                                 mergeable_ranks=ranks, special_tokens=specials)
    return (encoding, pre_split, set(missing.values()), {**vocab, **added},
            _post_processor_bos(spec.get("post_processor")))


def load_tokenizer(path) -> Tokenizer:
    """A model folder (or a tokenizer file) -> Tokenizer. In a folder, tokenizer.json wins over
    tokenizer.model (it declares its own pre-tokenizer and special tokens; a Llama-3 folder's
    tokenizer.model is Meta's tiktoken file). tokenizer_config.json beside it, when present, gives
    the eos/pad/bos tokens and add_bos_token."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise FileNotFoundError(f"no tokenizer file in {path} (looked for tokenizer.json, "
                                    "tokenizer.model)")
        folder = path
    elif path.is_file():
        file, folder = path, path.parent
    else:
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}

    sp, encoding, pre_split, dropped_ids, template_bos = None, None, None, set(), False
    if file.suffix == ".json":
        encoding, pre_split, dropped_ids, token_ids, template_bos = _from_tokenizer_json(file)
    else:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(file.read_bytes())
        except Exception:
            raise ValueError(f"{file}: not a sentencepiece model (a Llama-3 folder's "
                             "tokenizer.json is read instead of its tiktoken file)") from None
        token_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                     if not sp.is_unused(i)}

    def lookup(field):   # a token tokenizer_config.json names, as text or {"content": text}
        value = config[field]
        text = value.get("content") if isinstance(value, dict) else value
        if text not in token_ids:
            raise ValueError(f"{config_path}: {field} {text!r} is not in the vocabulary")
        return token_ids[text]

    if sp is not None:
        bos_id, eos_id = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id()))
    else:
        bos_id = token_ids.get(template_bos or "<|begin_of_text|>")   # the template's, or Llama-3's
        eos_id = next((token_ids[t] for t in ("<|end_of_text|>", "</s>", "<|endoftext|>")
                       if t in token_ids), None)
    bos_id = lookup("bos_token") if config.get("bos_token") else bos_id
    eos_id = lookup("eos_token") if config.get("eos_token") else eos_id
    if eos_id is None:
        raise ValueError(f"{file}: cannot tell the EOS token (no eos_token in "
                         "tokenizer_config.json and none of <|end_of_text|>, </s>, <|endoftext|> "
                         "in the vocabulary)")
    pad_id = lookup("pad_token") if config.get("pad_token") else eos_id

    # add_bos: the config's add_bos_token, else the HF post-processor template, else the family's.
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif template_bos is not False:
        add_bos = template_bos is not None
    else:
        add_bos = sp is not None or "<|begin_of_text|>" in token_ids
    if add_bos and bos_id is None:
        raise ValueError(f"{file}: the model expects a BOS token but none is defined")
    vocab_size = (sp.get_piece_size() if sp is not None
                  else encoding.max_token_value + 1 - len(dropped_ids))
    return Tokenizer(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                     vocab_size=vocab_size, token_ids=token_ids, encoding=encoding,
                     pre_split=pre_split, dropped_ids=dropped_ids, sentencepiece=sp)

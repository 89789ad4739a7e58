"""Behaviour fingerprint of one checkout, to prove a refactor changes nothing (issue 11): run it from the root of
the old checkout and of the new one, then compare the two files.

    cd OLD && python NEW/bench/same_outputs.py /tmp/old.json --adapter ADAPTER_DIR
    cd NEW && python bench/same_outputs.py /tmp/new.json --adapter ADAPTER_DIR
    python bench/same_outputs.py --compare /tmp/old.json /tmp/new.json

It records, with the modules of the CURRENT DIRECTORY's checkout: the fp32 constrained beam search (B = 10) on the
first 32 Office test users with a trained adapter (ranked items and scores, floats in hex), the exact top-10 and
the teacher-forced check on 8 of them, and for every loss arm two train.py steps (bf16, LoRA dropout on) with
their logged losses and gradient norms and the SHA-256 of the adapter file written. Timings are recorded beside,
never compared for equality; --compare prints their after/before ratios (one run each, the same machine).
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = {"sft": ["--loss", "sft"], "msl": ["--loss", "msl"], "bear": ["--loss", "bear"], "obj31": ["--loss", "obj31"],
        "bear-authors-norm": ["--loss", "bear", "--normalize", "authors"],
        "bear-violators": ["--loss", "bear", "--surrogate", "violators"]}


def fingerprint(args) -> dict:
    sys.path.insert(0, os.getcwd())  # the checkout under test, not this file's
    import torch
    import beam
    import data
    import train
    from lora import load_adapter
    from model import load_model
    try:
        from tokenizer import load_tokenizer
    except ImportError:  # a checkout from before tokenizer.py
        from model import load_tokenizer
    result, timing = {}, {}
    tokenizer = load_tokenizer(args.model)
    dataset = data.load_dataset(data.DataConfig("office", data_dir=args.data_dir, train_samples=512))
    trie = data.build_trie(dataset, tokenizer)
    model = load_model(args.model, dtype=torch.float32)
    load_adapter(model, args.adapter)
    model.eval()
    users = dataset.test[:32]
    prompts = [data.prompt_tokens(dataset.prompt(e), tokenizer) for e in users]
    config = beam.BeamConfig(beam_width=10, batch_size=16)
    with torch.no_grad():
        start = time.time()
        lists = beam.beam_search(model, prompts, trie, tokenizer.eos_id, tokenizer.pad_id, config)
        timing["beam_search_32_users_s"] = time.time() - start
        start = time.time()
        exact = beam.exact_topk(model, prompts[:8], trie, 10, tokenizer.eos_id, tokenizer.pad_id, config)
        timing["exact_topk_8_users_s"] = time.time() - start
        forced = beam.search_and_teacher_force(model, prompts[:8], [e.target for e in users[:8]], trie,
                                               tokenizer.eos_id, tokenizer.pad_id, config)
    result["beam_search"] = [[[sorted(items), float(score).hex()] for items, score in r] for r in lists]
    result["exact_topk"] = repr(exact)
    result["search_and_teacher_force"] = repr(forced)
    for arm, flags in ARMS.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            argv = ["--dataset", "office", "--model", args.model, "--data-dir", args.data_dir, "--out", str(run),
                    "--train-samples", "512", "--limit", "16", "--global-batch", "8", "--micro-batch", "4",
                    "--epochs", "1", "--max-steps", "2", "--valid-limit", "2", "--warmup-steps", "1", "--lr", "1e-3",
                    *flags]
            start = time.time()
            assert train.main(argv) == 0, arm
            timing[f"train_{arm}_s"] = time.time() - start
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            for record in log:  # wall-clock fields are not behaviour
                record.pop("tokens_per_s", None)
                record.pop("valid_s", None)
                record.pop("peak_memory_gb", None)  # a measurement too
            last = json.loads((run / "checkpoint.json").read_text())["last"]
            digest = hashlib.sha256((run / last / "adapter_model.safetensors").read_bytes()).hexdigest()
            result[f"train_{arm}"] = {"log": log, "adapter_sha256": digest}
    return {"result": result, "timing": timing}


def compare(before_path: str, after_path: str) -> int:
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    same = True
    for key, value in before["result"].items():
        equal = value == after["result"].get(key)
        same &= equal
        print(f"{key}: {'identical' if equal else 'DIFFERENT'}")
    for key, seconds in before["timing"].items():
        if key not in after["timing"]:
            continue
        print(f"{key}: before {seconds:.1f} s, after {after['timing'][key]:.1f} s, "
              f"after/before {after['timing'][key] / seconds:.3f}")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="where to write this checkout's fingerprint (.json)")
    parser.add_argument("--adapter", help="a trained adapter folder (PEFT files) for the SmolLM2 base")
    parser.add_argument("--model", default=os.path.expanduser(os.environ.get("BEAR_SMOLLM2",
                                                                             "~/.cache/bear-tests/smollm2")))
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "amazon"))
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not (args.out and args.adapter):
        parser.error("give OUT and --adapter (or --compare BEFORE AFTER)")
    Path(args.out).write_text(json.dumps(fingerprint(args), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

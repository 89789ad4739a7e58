"""S-DPO and S-DPO + BEAR (SPEC §3; the paper's Figure 7) against independent references.

Oracles: the loss and its gradient written from the formula in float64 (Python loops over prompts, titles and
tokens, Python sorting for beta_t, each title run as one full sequence); DPO's -log sigmoid(beta (r_0 - r_1));
transformers + peft on the real SmolLM2 for the titles' log-probabilities; one process for two; the
uninterrupted run for a killed one; a first step at log(1 + n) (the reference is the starting policy).
"""
import json
import math
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import beam  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import loss  # noqa: E402
import train  # noqa: E402
from lora import LoraConfig, apply_lora  # noqa: E402
from model import load_model  # noqa: E402
from test_lora import randomize_adapters  # noqa: E402
from test_train import (adapter, assert_same_run, kill_at_step, manifest, office_slice,  # noqa: E402,F401
                        run_killed, run_script, step_losses, tiny_llama, train_argv)


# ------------------------------------------------------------------------------------------------ negatives
def test_negatives_are_uniform_over_the_other_titles_one_id_per_title_and_reproducible():
    # Titles a..g; item 5 repeats item 3's title "d". Every window has history {0, 1} and target 2, so the
    # allowed titles are d, e, f, g: 3 of 4 drawn, each with probability 3/4, "d" always as item 3.
    titles = {0: "a", 1: "b", 2: "c", 3: "d", 4: "e", 5: "d", 6: "f", 7: "g"}
    windows = [data.Example(user_id=i, history=(0, 1), target=2, timestamp=0) for i in range(4000)]
    negatives = data.sample_negatives(windows, titles, count=3, seed=7)
    assert negatives.shape == (4000, 3)
    assert all(len(set(row)) == 3 for row in negatives.tolist())
    frequency = Counter(negatives.reshape(-1).tolist())
    assert set(frequency) == {3, 4, 6, 7}  # never a history or target title, never the duplicate id 5
    for item in frequency:
        assert frequency[item] / 4000 == pytest.approx(0.75, abs=0.03)
    assert torch.equal(negatives, data.sample_negatives(windows, titles, count=3, seed=7))
    assert torch.equal(negatives[100:200], data.sample_negatives(windows, titles, 3, seed=7)[100:200])
    assert not torch.equal(negatives, data.sample_negatives(windows, titles, count=3, seed=8))
    with pytest.raises(ValueError, match="only 4 other titles"):
        data.sample_negatives(windows[:1], titles, count=5, seed=7)


# ------------------------------------------------------------------------------ the loss, brute force (float64)
def random_titles(seed, num_prompts=3, num_titles=4, vocab_size=60):
    """Logits for num_prompts x num_titles titles of 1-5 tokens, each position's valid set a random subset
    holding its label (1 to 14 tokens), and random reference log-probabilities."""
    gen = torch.Generator().manual_seed(seed)
    labels, rows, tokens, title_of, sets = [], [], [], [], []
    for title in range(num_prompts * num_titles):
        for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
            size = int(torch.randint(1, 15, (1,), generator=gen))
            valid = torch.randperm(vocab_size, generator=gen)[:size].tolist()
            labels.append(valid[int(torch.randint(size, (1,), generator=gen))])
            rows += [len(sets)] * size
            tokens += valid
            sets.append(valid)
            title_of.append(title)
    logits = 3 * torch.randn(len(labels), vocab_size, generator=gen, dtype=torch.float64)
    reference = -10 * torch.rand(num_prompts, num_titles, generator=gen, dtype=torch.float64)
    return (logits, torch.tensor(labels), torch.tensor(rows), torch.tensor(tokens), torch.tensor(title_of),
            reference, sets)


def brute_force_sdpo(logits, labels, sets, title_of, reference, dpo_beta, lam=0.0, xi=2.75, beam_width=10,
                     softmax="full"):
    """Per prompt: -log sigmoid(-log sum_{j>=1} exp(beta (r_j - r_0))) + lam (sum_pos reg - sum_neg reg),
    reg = log sigmoid((log beta_t - log p_t) / xi), beta_t the B-th largest valid probability (detached)."""
    z_all = logits.detach().clone().requires_grad_(True)
    num_prompts, num_titles = reference.shape
    log_prob = [torch.zeros((), dtype=torch.float64) for _ in range(num_prompts * num_titles)]
    regulariser = [torch.zeros((), dtype=torch.float64) for _ in range(num_prompts)]
    for i, y in enumerate(labels.tolist()):
        z, title = z_all[i], int(title_of[i])
        log_prob[title] = log_prob[title] + z[y] - torch.logsumexp(z, 0)  # S-DPO: full vocabulary
        normaliser = torch.logsumexp(z if softmax == "full" else z[sets[i]], 0)
        valid_log_probs = sorted((float(z[v].detach() - normaliser.detach()) for v in sets[i]), reverse=True)
        log_beta = valid_log_probs[min(beam_width, len(valid_log_probs)) - 1]
        reg = torch.log(torch.sigmoid((log_beta - (z[y] - normaliser)) / xi))
        sign = 1.0 if title % num_titles == 0 else -1.0
        regulariser[title // num_titles] = regulariser[title // num_titles] + sign * reg
    losses = []
    for u in range(num_prompts):
        r = [log_prob[u * num_titles + j] - reference[u, j] for j in range(num_titles)]
        inner = torch.log(sum(torch.exp(dpo_beta * (r[j] - r[0])) for j in range(1, num_titles)))
        losses.append(-torch.log(torch.sigmoid(-inner)) + lam * regulariser[u])
    values = torch.stack(losses)
    (grad,) = torch.autograd.grad(values.sum(), z_all)
    return values.detach(), grad


def ours(fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    values = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), grad


@pytest.mark.parametrize("seed,dpo_beta", [(0, 1.0), (1, 0.5), (2, 3.0)])
def test_sdpo_and_its_gradient_match_the_float64_formula(seed, dpo_beta):
    logits, labels, _, _, title_of, reference, sets = random_titles(seed)
    expected = brute_force_sdpo(logits, labels, sets, title_of, reference, dpo_beta)
    actual = ours(loss.sdpo, logits, labels, title_of, reference, dpo_beta)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed,softmax,beam_width,lam,xi",
                         [(0, "full", 10, 0.6875, 2.75), (1, "masked", 10, 0.6875, 2.75), (2, "full", 3, 2.0, 0.5),
                          (3, "masked", 2, 5.0, 1.0)])
def test_sdpo_bear_and_its_gradient_match_the_float64_formula(seed, softmax, beam_width, lam, xi):
    logits, labels, rows, tokens, title_of, reference, sets = random_titles(seed)
    expected = brute_force_sdpo(logits, labels, sets, title_of, reference, 1.0, lam, xi, beam_width, softmax)
    actual = ours(loss.sdpo_bear, logits, labels, rows, tokens, title_of, reference, 1.0, beam_width=beam_width,
                  lam=lam, xi=xi, base="sft" if softmax == "full" else "msl")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


def test_sdpo_with_one_negative_is_dpo():
    logits, labels, _, _, title_of, reference, _ = random_titles(4, num_prompts=5, num_titles=2)
    log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    policy = torch.zeros(10, dtype=torch.float64).index_add(0, title_of, log_p).view(5, 2)
    r = policy - reference
    for dpo_beta in (0.1, 1.0, 4.0):
        dpo = -torch.nn.functional.logsigmoid(dpo_beta * (r[:, 0] - r[:, 1]))
        torch.testing.assert_close(loss.sdpo(logits, labels, title_of, reference, dpo_beta).double(), dpo,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softmax", ["full", "masked"])
def test_the_regulariser_pushes_positive_tokens_up_and_negative_tokens_down(softmax):
    logits, labels, rows, tokens, title_of, reference, sets = random_titles(5, num_prompts=4)
    base = "sft" if softmax == "full" else "msl"

    def regulariser(z):  # sdpo_bear minus sdpo: lam * (sum_pos reg - sum_neg reg)
        return (loss.sdpo_bear(z, labels, rows, tokens, title_of, reference, base=base)
                - loss.sdpo(z, labels, title_of, reference)).sum()

    def token_log_probs(z):
        return torch.stack([z[i, y] - torch.logsumexp(z[i] if softmax == "full" else z[i, sets[i]], 0)
                            for i, y in enumerate(labels.tolist())])

    leaf = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(regulariser(leaf), leaf)
    change = token_log_probs(logits - 1e-3 * grad) - token_log_probs(logits)  # one small descent step
    positive = title_of % 4 == 0
    moved = change.abs() > 1e-12  # masked softmax: one valid token has p_t = 1 whatever the step
    assert (change[positive & moved] > 0).all() and (change[~positive & moved] < 0).all()
    assert moved[~positive].sum() > 10 and moved[positive].sum() > 3


# ------------------------------------------------------------------------- the model path: one prompt, K titles
def tiny_trie_case(seed, num_prompts=3, num_negatives=2):
    """Random prompts and items (shared title prefixes, so valid sets hold several tokens) for a tiny model."""
    gen = torch.Generator().manual_seed(seed)
    stems = [torch.randint(3, 500, (int(torch.randint(0, 3, (1,), generator=gen)),), generator=gen).tolist()
             for _ in range(3)]
    item_tokens = {item: tuple(stems[item % 3] + torch.randint(3, 500, (int(torch.randint(1, 4, (1,),
                   generator=gen)),), generator=gen).tolist()) + (2,) for item in range(9)}
    trie = data.ItemTrie.build(item_tokens, eos_id=2)
    windows, negatives = [], []
    for u in range(num_prompts):
        prompt = [1] + torch.randint(3, 500, (int(torch.randint(4, 12, (1,), generator=gen)),),
                                     generator=gen).tolist()
        items = torch.randperm(9, generator=gen)[:1 + num_negatives].tolist()
        ids = torch.tensor(prompt + list(item_tokens[items[0]]), dtype=torch.int32)
        windows.append(data.EncodedExample(ids, len(prompt), trie.item_path(items[0]), items[0]))
        negatives.append(items[1:])
    reference = -20 * torch.rand(num_prompts, 1 + num_negatives, generator=gen, dtype=torch.float64)
    return trie, item_tokens, windows, torch.tensor(negatives), reference


@pytest.mark.parametrize("kind,softmax", [("sdpo", "full"), ("sdpo-bear", "full"), ("sdpo-bear", "masked")])
def test_the_training_path_and_its_lora_gradients_match_full_sequences_in_float64(tiny_llama, kind, softmax):
    # Ours: each prompt prefilled once, its titles on the cached keys/values (with gradient). The reference:
    # each (prompt, title) a full causal sequence, the loss by brute_force_sdpo's float64 formula.
    trie, item_tokens, windows, negatives, reference = tiny_trie_case(0)
    model = load_model(tiny_llama, dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    randomize_adapters(model, seed=3)
    config = train.TrainConfig(loss=kind, lam=1.5, xi=1.0, beam_width=2, dpo_beta=2.0, reg_softmax=softmax)
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]

    values = train.preference_losses(model, windows, negatives, reference, trie, config, pad_id=2)
    ours_grads = torch.autograd.grad(values.sum(), params)

    rows, labels, title_of, sets = [], [], [], []
    for u, window in enumerate(windows):
        prompt = window.input_ids[:window.prompt_length].tolist()
        for j, item in enumerate([window.target, *negatives[u].tolist()]):
            tokens = list(item_tokens[item])
            logits = model(torch.tensor([prompt + tokens]))[0]  # (T, V), one full sequence
            rows.append(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].double())
            labels += tokens
            title_of += [u * (1 + negatives.shape[1]) + j] * len(tokens)
            sets += [sorted({other[t] for other in item_tokens.values() if other[:t] == tuple(tokens[:t])})
                     for t in range(len(tokens))]
    stacked = torch.cat(rows)  # (N, V), with the graph back to the LoRA parameters
    lam = config.lam if kind == "sdpo-bear" else 0.0
    expected, grad_logits = brute_force_sdpo(stacked, torch.tensor(labels), sets, torch.tensor(title_of),
                                             reference, config.dpo_beta, lam, config.xi, config.beam_width, softmax)
    expected_grads = torch.autograd.grad(stacked, params, grad_outputs=grad_logits.to(stacked.dtype))
    torch.testing.assert_close(values.double(), expected, rtol=1e-4, atol=1e-5)
    for ours_grad, expected_grad in zip(ours_grads, expected_grads):
        scale = float(expected_grad.abs().max())  # fp32 sums of terms of both signs: relative to the largest
        torch.testing.assert_close(ours_grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-4 * scale)
    assert max(g.abs().max() for g in ours_grads) > 1e-4  # the comparison is not between zeros


def test_title_log_probs_equal_transformers_and_peft_on_smollm2(smollm2_dir, data_root):
    import peft
    import transformers
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(smollm2_dir)
    dataset = data.load_dataset(data.DataConfig(dataset="office", data_dir=str(data_root), train_samples=64))
    trie = data.build_trie(dataset, tokenizer)
    windows = data.encode_examples(dataset.train[:2], dataset, tokenizer, trie)
    negatives = data.sample_negatives(dataset.train[:2], dataset.titles, 3, seed=42)

    ours = load_model(smollm2_dir, dtype=torch.float32).eval()
    config = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    apply_lora(ours, config)
    randomize_adapters(ours, seed=4)
    with torch.no_grad():
        items = train.title_items(windows, negatives)  # (2, 4): target first
        logits, labels, title_of = beam.title_logits(ours, train.prompts_of(windows), items, trie, tokenizer.pad_id)
        actual = loss.title_log_probs(-loss.sft(logits, labels), title_of, (2, 4))

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    twin = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"])).eval()
    from lora import lora_state_dict
    result = peft.set_peft_model_state_dict(twin, {"base_model.model." + k: v for k, v in
                                                   lora_state_dict(ours).items()})
    assert not [key for key in result.unexpected_keys if "lora_" in key]
    expected = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        for u, window in enumerate(windows):
            prompt = window.input_ids[:window.prompt_length].tolist()
            for j, item in enumerate([window.target, *negatives[u].tolist()]):
                tokens = list(trie.item_tokens[item])
                out = twin(input_ids=torch.tensor([prompt + tokens])).logits[0].double()
                log_probs = torch.log_softmax(out[len(prompt) - 1:-1], dim=-1)
                expected[u, j] = log_probs.gather(1, torch.tensor(tokens)[:, None]).sum()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=2e-3)
    assert (expected[:, 0] != expected[:, 1]).all()


# -------------------------------------------------------------------------------------------- train.py runs
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_llama, office_slice) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    assert train.main(train_argv(tiny_llama, office_slice, out, loss="sft")) == 0
    return out


@pytest.fixture(scope="module")
def sdpo_run(tmp_path_factory, tiny_llama, office_slice, sft_run) -> Path:
    # In a child process at one thread, like the killed and resumed runs it is compared with: the
    # S-DPO backward's float sums are ordered by the thread count, so bits differ across counts.
    out = tmp_path_factory.mktemp("sdpo") / "run"
    result = run_script(["train.py", *train_argv(tiny_llama, office_slice, out, loss="sdpo", init_adapter=sft_run)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_reference_is_the_starting_policy_so_the_first_loss_is_log_1_plus_n(tmp_path, tiny_llama,
                                                                                 office_slice, sft_run):
    out = tmp_path / "run"  # dropout off: at step 1 the policy is the reference, every r_j = 0
    assert train.main(train_argv(tiny_llama, office_slice, out, loss="sdpo", init_adapter=sft_run,
                                 lora_dropout=0.0, negatives=4, max_steps=1)) == 0
    assert step_losses(out)[0][1] == pytest.approx(math.log(5), abs=1e-5)
    saved = torch.load(out / train.REFERENCE_FILE, weights_only=True)
    assert saved["negatives"].shape == (12, 4) and saved["reference"].shape == (12, 5)
    assert (saved["reference"] < 0).all()


def test_sdpo_bear_on_two_gloo_processes_equals_one(tmp_path, tiny_llama, office_slice, sft_run):
    flags = dict(loss="sdpo-bear", init_adapter=sft_run, global_batch=5, micro_batch=2, epochs=1, dtype="fp32",
                 lora_dropout=0.0, save_every=0, eval_batch=3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(train_argv(tiny_llama, office_slice, one, **flags)) == 0
    result = run_script(["train.py", *train_argv(tiny_llama, office_slice, two, **flags)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(step_losses(one)) == 3
    for (_, a), (_, b) in zip(step_losses(one), step_losses(two)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    reference = [torch.load(out / train.REFERENCE_FILE, weights_only=True) for out in (one, two)]
    assert torch.equal(reference[0]["negatives"], reference[1]["negatives"])
    assert torch.equal(reference[0]["reference"], reference[1]["reference"])  # the same chunks: bit for bit
    weights_one, weights_two = adapter(one / manifest(one)["last"]), adapter(two / manifest(two)["last"])
    start = adapter(sft_run / manifest(sft_run)["best"])
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-6)
    assert max((weights_one[n] - start[n]).abs().max() for n in start) > 1e-4  # it trained from the SFT adapter


def test_sdpo_killed_then_resumed_equals_the_uninterrupted_run(tmp_path, tiny_llama, office_slice, sft_run,
                                                               sdpo_run):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama, office_slice, out, loss="sdpo", init_adapter=sft_run)
    killed = run_killed(argv, kill_at_step(5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert manifest(out)["last"] == "step-00000004"
    resumed = run_script(["train.py", *argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, sdpo_run)


def test_eval_ranks_with_an_sdpo_checkpoint(sdpo_run, office_slice):
    report = evaluation.run_eval(evaluation.EvalConfig(ckpt=str(sdpo_run), split="valid"), cli.Distributed())
    assert report["num_examples"] == 4 and set(report) >= {"ndcg@10", "hr@10"}
    recorded = json.loads((sdpo_run / "train_config.json").read_text())
    assert recorded["loss"] == "sdpo" and recorded["lora_r"] == 8  # the SFT adapter's shape
    assert recorded["reference_log_probs_s"] >= 0


@pytest.mark.parametrize("case", ["no init adapter", "missing init adapter", "dpo flag without sdpo",
                                  "reg-softmax without sdpo-bear", "zero negatives", "other lora rank"])
def test_bad_sdpo_inputs_give_one_error_line_and_write_nothing(case, tmp_path, tiny_llama, office_slice,
                                                               sft_run, capsys):
    out = tmp_path / "run"
    flags, expected = {
        "no init adapter": (dict(loss="sdpo"), "error: --loss sdpo starts from an SFT adapter"),
        "missing init adapter": (dict(loss="sdpo", init_adapter=tmp_path / "nowhere"),
                                 f"error: --init-adapter {tmp_path / 'nowhere'}: no adapter_config.json"),
        "dpo flag without sdpo": (dict(loss="bear", dpo_beta=2), "apply only to --loss sdpo and sdpo-bear"),
        "reg-softmax without sdpo-bear": (dict(loss="sdpo", init_adapter=sft_run, reg_softmax="masked"),
                                          "error: --reg-softmax applies only to --loss sdpo-bear"),
        "zero negatives": (dict(loss="sdpo", init_adapter=sft_run, negatives=0), "--negatives must be >= 1"),
        "other lora rank": (dict(loss="sdpo", init_adapter=sft_run, lora_r=4),
                            "error: --lora-r 4 differs from --init-adapter's 8"),
    }[case]
    code = cli.cli_main(train.main, train_argv(tiny_llama, office_slice, out, **flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()

"""loss.py against brute-force references written plainly here: Python loops over label positions, Python
sorting for the B-th largest probability, torch autograd on the reference for the gradients."""
import math

import pytest
import torch

import loss


# ------------------------------------------------------------------------------------------- random inputs
def random_case(seed, num_positions=40, vocab_size=120, dtype=torch.float32):
    """Logits, labels and COO valid sets shaped like a trie's: many positions with 1-5 valid tokens, some with
    fewer than B=10, some with dozens. Pairs are shuffled so nothing may rely on row order."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(num_positions, vocab_size, generator=gen)).to(dtype)
    labels, rows, tokens = [], [], []
    for i in range(num_positions):
        kind = i % 4
        size = [1, int(torch.randint(2, 6, (1,), generator=gen)), int(torch.randint(6, 15, (1,), generator=gen)),
                int(torch.randint(15, vocab_size, (1,), generator=gen))][kind]
        valid = torch.randperm(vocab_size, generator=gen)[:size].tolist()
        labels.append(valid[int(torch.randint(size, (1,), generator=gen))])
        rows += [i] * size
        tokens += valid
    order = torch.randperm(len(rows), generator=gen)
    return (logits, torch.tensor(labels), torch.tensor(rows)[order], torch.tensor(tokens)[order])


def valid_sets(num_positions, rows, tokens):
    sets = [[] for _ in range(num_positions)]
    for r, t in zip(rows.tolist(), tokens.tolist()):
        sets[r].append(t)
    return sets


# ---------------------------------------------------------------------------------- brute-force references
def reference_log_probs(z, valid, base, tau):
    """log-probabilities (over `valid` for msl at tau, over the vocabulary for sft) as a dict token -> tensor."""
    if base == "msl":
        lse = torch.logsumexp(torch.stack([z[v] / tau for v in valid]), 0)
        return {v: z[v] / tau - lse for v in valid}
    lse = torch.logsumexp(z, 0)
    return {v: z[v] - lse for v in valid}


def reference_beta(log_probs, beam_width):
    """log of the B-th largest valid probability (the smallest when fewer than B), detached, by Python sorting."""
    ordered = sorted((float(lp.detach()) for lp in log_probs.values()), reverse=True)
    return ordered[min(beam_width, len(ordered)) - 1]


def reference_losses(kind, logits, labels, rows, tokens, beam_width=10, lam=0.6875, xi=2.75, tau=1.0,
                     base="msl", thresholds=None, label_example=None, surrogate="paper",
                     dtype=torch.float32):
    z_all = logits.detach().to(dtype).requires_grad_(True)
    sets = valid_sets(len(labels), rows, tokens) if rows is not None else None
    out, prefix, prev_example = [], None, None
    for i, y in enumerate(labels.tolist()):
        z = z_all[i]
        if kind == "sft":
            out.append(torch.logsumexp(z, 0) - z[y])
            continue
        log_probs = reference_log_probs(z, sets[i], "msl" if kind == "msl" else base, tau)
        base_loss = -log_probs[y]
        if kind == "msl":
            out.append(base_loss)
        elif kind == "bear" and surrogate == "violators":  # our ablation: -log sigmoid(-Delta/xi)
            log_beta = reference_beta(log_probs, beam_width)
            out.append(base_loss - lam * torch.log(torch.sigmoid(-(log_beta - log_probs[y]) / xi)))
        elif kind == "bear":
            log_beta = reference_beta(log_probs, beam_width)
            out.append(base_loss + lam * torch.log(torch.sigmoid((log_beta - log_probs[y]) / xi)))
        elif kind == "authors":  # base CE times the detached weight 1 + lam' sigmoid((log p - log beta)/xi)
            log_beta = reference_beta(log_probs, beam_width)
            weight = 1 + (lam / xi) * torch.sigmoid((log_probs[y].detach() - log_beta) / xi)
            out.append(weight * base_loss)
        elif kind == "obj31":
            example = int(label_example[i])
            prefix = log_probs[y] if example != prev_example else prefix + log_probs[y]
            prev_example = example
            out.append(base_loss + lam * torch.log(torch.sigmoid((float(thresholds[i]) - prefix) / xi)))
    values = torch.stack(out)
    (grad,) = torch.autograd.grad(values.sum(), z_all)
    return values.detach(), grad


def reference_bear_weights(logits, labels, rows, tokens, beam_width=10, lam=0.6875, xi=2.75,
                           tau=1.0, base="msl", surrogate="paper"):
    """w_t = 1 + (lam/xi) sigmoid(-+Delta_t^B / xi) (- for eq. 3.4, + for violators), float64."""
    sets = valid_sets(len(labels), rows, tokens)
    sign = 1.0 if surrogate == "violators" else -1.0
    weights = []
    for i, y in enumerate(labels.tolist()):
        log_probs = reference_log_probs(logits[i].double(), sets[i], base, tau)
        delta = reference_beta(log_probs, beam_width) - float(log_probs[y])  # log beta - log p
        weights.append(1 + (lam / xi) / (1 + math.exp(-sign * delta / xi)))
    return torch.tensor(weights, dtype=torch.float64)


def ours(fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    values = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), grad


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("seed", [0, 1])
def test_sft_matches_reference(seed):
    logits, labels, _, _ = random_case(seed, vocab_size=300)
    values, grad = ours(loss.sft, logits, labels)
    ref_values, ref_grad = reference_losses("sft", logits, labels, None, None)
    assert values.dtype == torch.float32 and values.shape == labels.shape
    assert_close(values, ref_values)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("seed,tau", [(0, 1.0), (1, 0.7), (2, 2.5)])
def test_msl_matches_reference(seed, tau):
    logits, labels, rows, tokens = random_case(seed, vocab_size=50 + 100 * seed)
    values, grad = ours(loss.msl, logits, labels, rows, tokens, tau=tau)
    ref_values, ref_grad = reference_losses("msl", logits, labels, rows, tokens, tau=tau)
    assert_close(values, ref_values)
    assert_close(grad, ref_grad)


def test_msl_single_valid_token_contributes_exactly_zero():
    logits, labels, rows, tokens = random_case(3)
    single = torch.bincount(rows, minlength=len(labels)) == 1
    assert single.sum() >= 5
    values, grad = ours(loss.msl, logits, labels, rows, tokens, tau=0.8)
    assert torch.equal(values[single], torch.zeros(int(single.sum())))
    assert torch.equal(grad[single], torch.zeros_like(grad[single]))
    assert (values[~single] > 0).all()


BEAR_CASES = [  # seed, B, lambda (eq. 3.5 units), xi, tau, base
    (0, 10, 0.6875, 2.75, 1.0, "msl"),
    (1, 3, 2.0, 0.5, 1.0, "msl"),
    (2, 10, 0.6875, 2.75, 0.6, "msl"),
    (3, 5, 1.3, 1.5, 1.0, "sft"),
    (4, 1, 0.4, 1.0, 1.0, "msl"),
]


@pytest.mark.parametrize("seed,beam_width,lam,xi,tau,base", BEAR_CASES)
def test_bear_matches_reference(seed, beam_width, lam, xi, tau, base):
    logits, labels, rows, tokens = random_case(seed, vocab_size=80 + 40 * seed)
    kwargs = dict(beam_width=beam_width, lam=lam, xi=xi, tau=tau, base=base)
    values, grad = ours(loss.bear, logits, labels, rows, tokens, **kwargs)
    ref_values, ref_grad = reference_losses("bear", logits, labels, rows, tokens, **kwargs)
    assert_close(values, ref_values)
    assert_close(grad, ref_grad)
    # The regulariser is really there: BEAR differs from its base loss.
    base_values = loss.msl(logits, labels, rows, tokens, tau) if base == "msl" else loss.sft(logits, labels)
    assert (values - base_values).abs().max() > 1e-2


@pytest.mark.parametrize("seed,beam_width,lam,xi,tau,base", BEAR_CASES)
def test_bear_violators_matches_float64_reference(seed, beam_width, lam, xi, tau, base):
    """--surrogate violators (our ablation): L_base - lam log sigmoid(-Delta_t^B / xi), values and
    gradients against the float64 loop."""
    logits, labels, rows, tokens = random_case(seed, vocab_size=80 + 40 * seed)
    kwargs = dict(beam_width=beam_width, lam=lam, xi=xi, tau=tau, base=base)
    values, grad = ours(loss.bear, logits, labels, rows, tokens, surrogate="violators", **kwargs)
    ref_values, ref_grad = reference_losses("bear", logits, labels, rows, tokens,
                                            surrogate="violators", dtype=torch.float64, **kwargs)
    assert values.dtype == torch.float32 and values.shape == labels.shape
    assert_close(values, ref_values)
    assert_close(grad, ref_grad)
    # Not the paper's surrogate, and a penalty: -log sigmoid > 0 adds to the base loss everywhere.
    paper, paper_grad = ours(loss.bear, logits, labels, rows, tokens, **kwargs)
    assert (values - paper).abs().max() > 1e-2 and (grad - paper_grad).abs().max() > 1e-3
    base_values = loss.msl(logits, labels, rows, tokens, tau) if base == "msl" else \
        loss.sft(logits, labels)
    assert (values > base_values).all()


@pytest.mark.parametrize("surrogate", loss.SURROGATES)
@pytest.mark.parametrize("seed,beam_width,lam,xi,tau,base", [
    (0, 10, 0.6875, 2.75, 1.0, "msl"),
    (1, 3, 2.0, 0.5, 0.7, "msl"),
    (2, 5, 1.3, 1.5, 1.0, "sft"),
])
def test_bear_token_weights_scale_the_base_gradient(seed, beam_width, lam, xi, tau, base,
                                                    surrogate):
    """bear_token_weights is w_t = 1 + (lam/xi) sigmoid(-Delta/xi) (paper) or sigmoid(+Delta/xi)
    (violators), detached, and grad(bear) = w_t * grad(L_base) position by position (its docstring;
    --normalize authors divides by the sum of these w_t)."""
    logits, labels, rows, tokens = random_case(seed, vocab_size=100 + 50 * seed)
    hyper = dict(beam_width=beam_width, lam=lam, xi=xi, tau=tau, base=base)
    weights = loss.bear_token_weights(logits.clone().requires_grad_(True), labels, rows, tokens,
                                      surrogate=surrogate, **hyper)
    assert weights.shape == labels.shape and not weights.requires_grad
    ref_weights = reference_bear_weights(logits, labels, rows, tokens, surrogate=surrogate, **hyper)
    assert_close(weights, ref_weights, atol=1e-6, rtol=1e-6)
    assert (ref_weights.max() - ref_weights.min()) > 1e-2 * lam / xi  # not a constant
    # The claim, on ours and on the float64 reference (where it holds to rounding).
    base_fn = (loss.msl, (rows, tokens), {"tau": tau}) if base == "msl" else (loss.sft, (), {})
    _, grad_base = ours(base_fn[0], logits, labels, *base_fn[1], **base_fn[2])
    _, grad_bear = ours(loss.bear, logits, labels, rows, tokens, surrogate=surrogate, **hyper)
    assert_close(grad_bear, weights[:, None] * grad_base, atol=1e-6, rtol=1e-5)
    assert (grad_bear - grad_base).abs().max() > 1e-3  # the weights do something
    f64 = dict(dtype=torch.float64, tau=tau)
    _, ref_grad_base = reference_losses(base, logits, labels, rows, tokens, **f64)
    _, ref_grad_bear = reference_losses("bear", logits, labels, rows, tokens, surrogate=surrogate,
                                        **dict(hyper, dtype=torch.float64))
    torch.testing.assert_close(ref_grad_bear, ref_weights[:, None] * ref_grad_base,
                               atol=1e-12, rtol=1e-10)
    # The two surrogates' weights are mirror images: sigmoid(-x) + sigmoid(x) = 1.
    other = loss.bear_token_weights(logits, labels, rows, tokens,
                                    surrogate=({"paper": "violators", "violators": "paper"}
                                               [surrogate]), **hyper)
    assert_close(weights + other, torch.full_like(weights, 2 + lam / xi), atol=1e-6, rtol=1e-6)


def test_bear_beta_falls_back_to_smallest_valid_probability():
    # One position, 4 valid tokens (< B = 10): beta is the smallest valid probability, by hand.
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0, 0.5, 3.0]])
    labels = torch.tensor([1])
    rows, tokens = torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 5])
    lam, xi, tau = 0.9, 1.7, 1.3
    got = loss.bear(logits, labels, rows, tokens, beam_width=10, lam=lam, xi=xi, tau=tau)
    lse = math.log(sum(math.exp(v / tau) for v in (2.0, -1.0, 5.0, 3.0)))
    log_p, log_beta = 2.0 / tau - lse, -1.0 / tau - lse  # token 2 (logit -1) is the smallest valid one
    expected = -log_p + lam * math.log(1 / (1 + math.exp(-(log_beta - log_p) / xi)))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # With B = 2 beta is the 2nd largest (token 5, logit 3) instead.
    got2 = loss.bear(logits, labels, rows, tokens, beam_width=2, lam=lam, xi=xi, tau=tau)
    log_beta2 = 3.0 / tau - lse
    expected2 = -log_p + lam * math.log(1 / (1 + math.exp(-(log_beta2 - log_p) / xi)))
    assert got2.item() == pytest.approx(expected2, rel=1e-6)


@pytest.mark.parametrize("seed,tau,base", [(0, 1.0, "msl"), (1, 0.5, "msl"), (2, 1.0, "sft")])
def test_bear_gradient_equals_authors_reweighted_cross_entropy(seed, tau, base):
    """The gradient of L_base + lam*log sigmoid((log beta - log p)/xi) equals the gradient of w * L_base with
    w = 1 + lam' sigmoid((log p - log beta)/xi) detached and lam' = lam/xi, for EVERY logit, not just z_y."""
    logits, labels, rows, tokens = random_case(seed, vocab_size=150)
    xi, topk_weight = 2.75, 0.25
    kwargs = dict(beam_width=10, xi=xi, tau=tau, base=base)
    lam = topk_weight * xi  # eq. 3.5's lambda from the authors' topk_weight
    _, grad_bear = ours(loss.bear, logits, labels, rows, tokens, lam=lam, **kwargs)
    # The authors' form, w_t * L_base with w_t detached, written plainly in reference_losses.
    _, grad_authors = reference_losses("authors", logits, labels, rows, tokens, lam=lam, **kwargs)
    assert_close(grad_bear, grad_authors, atol=1e-6, rtol=1e-5)
    # The equivalence is not vacuous: cancelling the normaliser before detaching (z_B.detach() - z_y, the
    # tempting shortcut) leaves a different gradient.
    leaf = logits.clone().requires_grad_(True)
    base_loss = loss.msl(leaf, labels, rows, tokens, tau) if base == "msl" else loss.sft(leaf, labels)
    z_y = leaf.gather(1, labels[:, None]).squeeze(1) / tau
    sets = valid_sets(len(labels), rows, tokens)
    z_beta = []
    for i in range(len(labels)):
        ordered = sorted((float(logits[i, v]) / tau for v in sets[i]), reverse=True)
        z_beta.append(ordered[min(10, len(ordered)) - 1])
    z_beta = torch.tensor(z_beta)
    shortcut = base_loss + topk_weight * xi * torch.nn.functional.logsigmoid((z_beta - z_y) / xi)
    (grad_shortcut,) = torch.autograd.grad(shortcut.sum(), leaf)
    assert (grad_shortcut - grad_authors).abs().max() > 1e-3


def test_obj31_matches_reference_with_fixed_thresholds():
    logits, labels, rows, tokens = random_case(5, num_positions=36, vocab_size=200)
    # 8 examples of uneven lengths; example ids need not be 0..E-1 or sorted, only consecutive.
    lengths = [3, 6, 2, 7, 4, 5, 1, 8]
    ids = [13, 2, 7, 0, 5, 11, 4, 9]
    label_example = torch.tensor([e for e, n in zip(ids, lengths) for _ in range(n)])
    gen = torch.Generator().manual_seed(7)
    for base, tau in [("msl", 1.0), ("msl", 0.8), ("sft", 1.0)]:
        # Thresholds around the running log-probs so the sigmoid sits in its informative range.
        ref_plain, _ = reference_losses("obj31", logits, labels, rows, tokens, lam=0.0, base=base, tau=tau,
                                        thresholds=torch.zeros(36), label_example=label_example)
        thresholds = -3.0 * torch.arange(1, 37) / 6 + torch.randn(36, generator=gen)
        kwargs = dict(lam=1.1, xi=1.5, tau=tau, base=base)
        values, grad = ours(loss.obj31, logits, labels, rows, tokens, thresholds, label_example, **kwargs)
        ref_values, ref_grad = reference_losses("obj31", logits, labels, rows, tokens, thresholds=thresholds,
                                                label_example=label_example, **kwargs)
        assert_close(values, ref_values)
        assert_close(grad, ref_grad)
        assert (values - ref_plain).abs().max() > 1e-2


def test_bf16_logits_are_computed_in_fp32():
    logits, labels, rows, tokens = random_case(6, vocab_size=256, dtype=torch.bfloat16)
    thresholds = -torch.rand(len(labels)) * 5
    label_example = torch.arange(len(labels)) // 4
    cases = [("sft", loss.sft, (), {}), ("msl", loss.msl, (rows, tokens), {"tau": 0.9}),
             ("bear", loss.bear, (rows, tokens), {"beam_width": 3}),
             ("obj31", loss.obj31, (rows, tokens, thresholds, label_example), {})]
    for kind, fn, args, kwargs in cases:
        values, grad = ours(fn, logits, labels, *args, **kwargs)
        assert values.dtype == torch.float32 and grad.dtype == torch.bfloat16
        ref_kwargs = dict(kwargs, thresholds=thresholds, label_example=label_example)
        ref_values, ref_grad = reference_losses(kind, logits, labels, rows, tokens, **ref_kwargs)
        assert_close(values, ref_values)  # the bf16 logits are exact in fp32: same values to fp32 tolerance
        assert_close(grad, ref_grad.to(torch.bfloat16), atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_get_one_clear_error():
    logits, labels, rows, tokens = random_case(8, num_positions=8, vocab_size=30)
    with pytest.raises(ValueError, match="not among its valid next tokens"):
        loss.msl(logits, (labels + 1) % 30, rows, tokens)
    with pytest.raises(ValueError, match="base must be one of"):
        loss.bear(logits, labels, rows, tokens, base="dpo")
    with pytest.raises(ValueError, match="tau"):
        loss.bear(logits, labels, rows, tokens, base="sft", tau=0.5)
    with pytest.raises(ValueError, match="labels must be"):
        loss.sft(logits, labels[:-1])
    with pytest.raises(ValueError, match="valid_token must lie"):
        loss.msl(logits, labels, rows, tokens + 100)
    with pytest.raises(ValueError, match="beam_width"):
        loss.bear(logits, labels, rows, tokens, beam_width=0)
    with pytest.raises(ValueError, match="consecutive"):
        loss.obj31(logits, labels, rows, tokens, torch.zeros(8), torch.tensor([0, 0, 1, 1, 0, 2, 2, 2]))
    with pytest.raises(ValueError, match="finite"):
        loss.obj31(logits, labels, rows, tokens, torch.full((8,), -torch.inf), torch.zeros(8, dtype=torch.long))

"""Training losses of the BEAR paper: SFT (eq. 2.1), MSL, BEAR (eq. 3.4/3.5) and the "straightforward" objective 3.1.

Each loss takes the logits at the label positions only and returns a PER-POSITION loss in fp32; the training
loop sums it and divides by the global number of label tokens. The naive oracle is `reference_losses` in
tests/test_loss.py (a Python loop over positions, Python sorting for beta, autograd for the gradients).

Shapes: N label positions, V vocabulary, M valid (row, token) pairs, E examples, L the longest example's label count.
  logits (N, V) in any dtype (computed in fp32), labels (N,) int64.
  valid_row (M,), valid_token (M,) int64: the trie-valid next-token sets V_t as COO pairs from
  data.ItemTrie.valid_next. Row i lists every valid next token at label position i, each once, the label among
  them; rows may come in any order.

Which probabilities. In `msl`, `bear` and `obj31`, p_t is the probability under the distribution the base loss
trains: with base="msl" the softmax over the valid tokens V_t at temperature tau (the "masked probabilities"
of the authors' code; their inference.py searches at temperature 1), with base="sft" the full-vocabulary softmax.
At tau = 1 (the default and the paper's setting) this is exactly the model's next-token probability that the
constrained beam search ranks by (mask before / after the softmax respectively). The choice is what makes
BEAR's gradient EXACTLY the authors' re-weighted cross-entropy (see `bear` and `bear_authors_reweighted`).

The valid sets are tiny next to the vocabulary (most positions allow 1-5 tokens, a few allow thousands), so the
masked losses never build an (N, V) mask: they gather the M valid logits and reduce them per row with
index_add / scatter_reduce / one integer sort. The only (N, V) work is the gather's backward, the same cost any
loss on these logits pays.
"""
import torch
import torch.nn.functional as F

BASES = ("msl", "sft")
SURROGATES = ("paper", "violators")  # eq. 3.4's log sigmoid(Delta / xi), or our ablation -log sigmoid(-Delta / xi)


# -------------------------------------------------------------------------------------------------- losses
def sft(logits, labels):
    """Eq. 2.1 ("LML" in the authors' code): cross-entropy over the whole vocabulary. Returns (N,) fp32."""
    _check_inputs(logits, labels)
    return F.cross_entropy(logits.float(), labels, reduction="none")                  # (N,)


def msl(logits, labels, valid_row, valid_token, tau=1.0):
    """Masked softmax loss (MSL, SIGIR'25): cross-entropy over the valid tokens V_t only, at temperature tau,
    -z_y/tau + logsumexp_{v in V_t} z_v/tau. A position with a single valid token contributes exactly 0
    (value and gradient). Returns (N,) fp32."""
    _check_inputs(logits, labels, valid_row, valid_token)
    _check_hyper(1, 0.0, 1.0, tau, "msl")
    _, z_label, lse = _masked_log_softmax_parts(logits, labels, valid_row, valid_token, tau)
    return lse - z_label                                                               # (N,)


def bear(logits, labels, valid_row, valid_token, beam_width=10, lam=0.6875, xi=2.75, tau=1.0, base="msl",
         surrogate="paper"):
    """BEAR, eq. 3.5: L_base + lam * log sigmoid(Delta_t^B / xi) per label position, the surrogate (eq. 3.4) of
    the pruning margin Delta_t^B = log beta_t - log p_t (eq. 3.3, `_base_loss_and_margin`). Returns (N,) fp32.

    beta_t = the beam_width-th largest next-token probability among the valid tokens V_t, detached; with fewer
    than beam_width valid tokens, the smallest valid probability (authors' code). Delta_t^B > 0: at least B
    valid tokens outrank the positive's token at step t, so the beam search prunes the positive there whatever
    the other beams hold. p_t and beta_t are probabilities of the distribution the base loss trains (module
    docstring): masked over V_t at temperature tau for base="msl" (default, authors' code), full-vocabulary
    for base="sft" (tau must be 1).

    lam is in eq. 3.5 units. The authors' `topk_weight` lam' is lam / xi (default 0.25 * 2.75 = 0.6875).
    With u = Delta_t^B / xi and d/du log sigmoid(u) = sigmoid(-u), the regulariser's gradient is
    lam * sigmoid(-u) * (-1/xi) * grad(log p) = lam' * sigmoid((log p - log beta)/xi) * grad(L_base), as
    L_base = -log p. So the gradient of this loss is, position by position and for every logit (the label's
    and all the others', through the normaliser), w_t * grad(L_base) with the detached weight
    w_t = 1 + lam' * sigmoid((log p_t - log beta_t) / xi), i.e. the gradient of the authors' re-weighted
    cross-entropy (`bear_authors_reweighted`). The loss VALUES differ. Positions where beta_t = p_t (e.g. a
    single valid token) add the constant lam * log(1/2), no gradient.

    surrogate="violators" is OUR ablation, not the paper's method: lam * -log sigmoid(-Delta_t^B / xi), whose
    gradient weight lam' * sigmoid(Delta_t^B / xi) is largest for the tokens that violate the necessary condition
    most, where eq. 3.4's vanishes for them."""
    _check_inputs(logits, labels, valid_row, valid_token)
    _check_hyper(beam_width, lam, xi, tau, base, surrogate)
    base_loss, margin = _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, tau, base)
    if surrogate == "violators":
        return base_loss - lam * F.logsigmoid(-margin / xi)
    return base_loss + lam * F.logsigmoid(margin / xi)                                 # eq. 3.4 in eq. 3.5


@torch.no_grad()
def bear_token_weights(logits, labels, valid_row, valid_token, beam_width=10, lam=0.6875, xi=2.75, tau=1.0,
                       base="msl", surrogate="paper"):
    """The detached per-token weight w_t with grad(bear) = w_t * grad(L_base) at each position (see `bear`):
    1 + lam' * sigmoid((log p_t - log beta_t)/xi) for eq. 3.4, 1 + lam' * sigmoid((log beta_t - log p_t)/xi) for
    the "violators" ablation; lam' = lam / xi. The authors' normalisation divides by their sum. Returns (N,)."""
    _, margin = _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, tau, base)
    sign = 1.0 if surrogate == "violators" else -1.0
    return 1.0 + (lam / xi) * torch.sigmoid(sign * margin / xi)


def bear_authors_reweighted(logits, labels, valid_row, valid_token, beam_width=10, topk_weight=0.25, xi=2.75,
                            tau=1.0, base="msl"):
    """The authors' formulation of BEAR: the base cross-entropy re-weighted per token by the DETACHED weight
    w_t = 1 + topk_weight * sigmoid((log p_t - log beta_t) / xi). Its gradient equals `bear(..., lam=topk_weight
    * xi)`; its value is w_t * L_base. Kept for readers and for the equivalence test. Returns (N,) fp32."""
    _check_inputs(logits, labels, valid_row, valid_token)
    _check_hyper(beam_width, topk_weight, xi, tau, base)
    base_loss, margin = _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, tau, base)
    weight = 1.0 + topk_weight * torch.sigmoid(-margin.detach() / xi)                  # (N,) detached
    return weight * base_loss


def lam_from_topk_weight(topk_weight, xi):
    """lam in eq. 3.5 units from the authors' `topk_weight` lam' (their per-token weight 1 + lam' * sigmoid)."""
    return topk_weight * xi


def obj31(logits, labels, valid_row, valid_token, thresholds, label_example, beam_width=10, lam=0.6875, xi=2.75,
          tau=1.0, base="msl"):
    """Objective 3.1 (the "straightforward solution"): per label position t,
    L_base + lam * log sigmoid((thr_t - log P(y_<=t)) / xi).

    thresholds (N,): detached, the log-probability of the B-th best candidate prefix of the same length in a
    simulated constrained beam search under the current parameters (beam.prefix_thresholds); must be finite
    (with fewer than B candidates, the smallest one, as for beta in `bear`). label_example (N,): which example
    each label position belongs to; an example's labels are consecutive and in order. log P(y_<=t) is the
    running sum, within the example and with gradient, of the positive's token log-probs log p_t, p_t as in
    `bear` (masked at tau for base="msl", full vocabulary for "sft"), so the thresholds must come from a beam
    search scored the same way (mask before the softmax for "msl", after it for "sft"; logits / tau if tau != 1).
    beam_width is unused here (the thresholds already encode it); kept for a uniform signature. Returns (N,)."""
    _check_inputs(logits, labels, valid_row, valid_token)
    _check_hyper(beam_width, lam, xi, tau, base)
    _check_examples(thresholds, label_example, logits.shape[0])
    if base == "msl":
        base_loss = msl(logits, labels, valid_row, valid_token, tau)                   # (N,) -log p_t
    else:
        base_loss = sft(logits, labels)                                                # (N,)
    if logits.shape[0] == 0:
        return base_loss
    prefix_log_prob = _running_sum_per_example(-base_loss, label_example)            # (N,) log P(y_<=t)
    return base_loss + lam * F.logsigmoid((thresholds.detach().float() - prefix_log_prob) / xi)


# ------------------------------------------------------------------------ BEAR's pruning margin (eq. 3.3)
def _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, tau, base):
    """The base loss -log p_t (N,) and eq. 3.3's pruning margin Delta_t^B = log beta_t - log p_t (N,), with
    beta_t detached as in eq. 3.4. Detaching beta as a whole matters: cancelling the normaliser first and
    detaching only z_(B) gives the same value but loses the normaliser's gradient (tests/test_loss.py)."""
    num_positions = logits.shape[0]
    if base == "msl":
        z_valid, z_label, lse = _masked_log_softmax_parts(logits, labels, valid_row, valid_token, tau)
        base_loss = lse - z_label                                                      # (N,) -log p_t
    else:  # full-vocabulary softmax; beta is still the B-th largest among the VALID tokens (the beam's choice)
        with torch.no_grad():
            z_valid = logits.reshape(-1)[valid_row * logits.shape[1] + valid_token].float()  # (M,)
            z_label = logits.gather(1, labels[:, None]).squeeze(1).float()             # (N,)
        base_loss = F.cross_entropy(logits.float(), labels, reduction="none")          # (N,) -log p_t
    z_beta = _kth_largest_per_row(z_valid.detach(), valid_row, num_positions, int(beam_width))  # (N,) z_(B)
    # Delta = log beta - log p, log p = -base_loss. Its value: the normaliser cancels, z_(B) - z_y (logits / tau).
    # Its gradient: beta is detached, so grad(Delta) = -grad(log p) = grad(base_loss), carried by a 0-valued term.
    margin_value = z_beta - z_label.detach()                                           # (N,) log beta - log p
    margin = margin_value + (base_loss - base_loss.detach())                           # (N,) Delta_t^B
    return base_loss, margin


# ------------------------------------------------------------------------------- the masked distribution
def _masked_log_softmax_parts(logits, labels, valid_row, valid_token, tau):
    """Everything the masked losses need from one gather of the valid logits.

    Returns z_valid (M,) fp32 valid logits / tau (with grad), z_label (N,) label logit / tau (with grad) and
    lse (N,) = logsumexp over V_t of z / tau (with grad)."""
    num_positions, vocab_size = logits.shape
    # One flat gather: its backward is a single scatter into the (N, V) gradient.
    flat_index = valid_row * vocab_size + valid_token                                  # (M,)
    z_valid = logits.reshape(-1).gather(0, flat_index).float() / tau                  # (M,)

    is_label = valid_token == labels[valid_row]                                        # (M,)
    label_count = torch.zeros(num_positions, dtype=torch.long, device=logits.device)
    label_count.index_add_(0, valid_row, is_label.long())                              # (N,)
    # A label outside V_t has p_t = 0 and no logit to place below: one clear error, not a wrong loss. Checked
    # here, where the label pairs are counted anyway, rather than in a second pass over the M pairs on entry.
    if num_positions and label_count.min() != 1:
        bad = int((label_count != 1).nonzero()[0])
        raise ValueError(f"label position {bad}: its label {int(labels[bad])} is not among its valid next tokens")
    # Exactly one label pair per row, so an index_add places each row's label logit.
    z_label = z_valid.new_zeros(num_positions).index_add(0, valid_row[is_label], z_valid[is_label])  # (N,)

    lse = segment_logsumexp(z_valid, valid_row, num_positions)                         # (N,)
    return z_valid, z_label, lse


def segment_logsumexp(values, rows, num_rows):
    """logsumexp of `values` (M,) within each of `num_rows` rows, (num_rows,): the normaliser of a softmax
    restricted to each row's valid tokens (here and in beam.py's masked scores). The row maximum is subtracted so
    exp() cannot overflow; it is detached, as it cancels out of the gradient."""
    row_max = values.new_full((num_rows,), -torch.inf).scatter_reduce(0, rows, values.detach(), reduce="amax")
    sum_exp = values.new_zeros(num_rows).index_add(0, rows, torch.exp(values - row_max[rows]))  # (num_rows,)
    return torch.log(sum_exp) + row_max


@torch.no_grad()
def _kth_largest_per_row(values, rows, num_rows, k):
    """The min(k, |row|)-th largest of `values` within each row (rows may come in any order).

    Sorting by the key (row, -value) puts every row's values in one block, largest first; the answer is then
    read at block_start + min(k, block_size) - 1. The min() is the authors' fallback: with fewer than k valid
    tokens, beta is the smallest valid probability."""
    order = torch.sort(rows * 2**32 + _descending_sort_key(values)).indices          # (M,)
    sorted_values = values[order]                                                      # (M,) row blocks
    block_size = torch.zeros(num_rows, dtype=torch.long, device=values.device)
    block_size.index_add_(0, rows, torch.ones_like(rows))                              # (N,)
    block_start = torch.cumsum(block_size, 0) - block_size                             # (N,)
    return sorted_values[block_start + torch.clamp(block_size, max=k) - 1]             # (N,)


def _descending_sort_key(values):
    """int64 keys in [0, 2^32) whose ascending order is the DESCENDING order of the float32 `values`.

    IEEE-754 bits read as a signed integer already order the non-negative floats; the negative ones come out
    reversed, so they are reflected. An integer key lets a single sort order the (row, value) pairs at once."""
    bits = values.float().view(torch.int32).long()                                     # sign in the top bit
    ascending = torch.where(bits < 0, -(bits + 2**31) - 1, bits)                       # in [-2^31, 2^31)
    return (2**31 - 1) - ascending


# -------------------------------------------------------------------------------- Obj 3.1's running sum
def _running_sum_per_example(log_p, label_example):
    """log P(y_<=t) (N,): the running sum of log_p (N,) within each example, with gradient.

    Runs of equal label_example are the examples (consecutive: checked on entry). Laying the examples out as
    rows of an (E, L) grid and summing along each row keeps one example's sum free of another's rounding,
    which a single cumsum minus each example's offset would not."""
    num_positions = log_p.shape[0]
    new_run = torch.ones(num_positions, dtype=torch.bool, device=log_p.device)
    new_run[1:] = label_example[1:] != label_example[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1                                       # (N,)
    num_runs = int(run_id[-1]) + 1
    run_start = new_run.nonzero().squeeze(1)                                           # (E,)
    offset = torch.arange(num_positions, device=log_p.device) - run_start[run_id]     # (N,)
    grid = log_p.new_zeros(num_runs, int(offset.max()) + 1)                            # (E, L)
    grid = grid.index_put((run_id, offset), log_p)
    return torch.cumsum(grid, dim=1)[run_id, offset]                                   # (N,)


# ------------------------------------------------------------------------------ checks where input enters
# The public losses check their arguments on entry (bear_token_weights, called beside bear, does not); the math
# above assumes them. Each check stops a silently wrong answer or turns an opaque indexing error into one line
# that names the argument.
# The pairs are not checked for duplicates per call (a duplicate would count its token twice in the masked
# softmax): ItemTrie.valid_next lists each child of a node once, and a node's children are distinct tokens.
def _check_inputs(logits, labels, valid_row=None, valid_token=None):
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V) at the label positions, got shape {tuple(logits.shape)}")
    num_positions, vocab_size = logits.shape
    if labels.dim() != 1 or labels.numel() != num_positions:
        raise ValueError(f"labels must be ({num_positions},) to match logits, got shape {tuple(labels.shape)}")
    if labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 token ids, got {labels.dtype}")
    if num_positions and (labels.min() < 0 or labels.max() >= vocab_size):
        raise ValueError(f"labels must lie in [0, {vocab_size}), got range [{labels.min()}, {labels.max()}]")
    if valid_row is None:
        return
    if valid_row.dim() != 1 or valid_token.dim() != 1 or valid_row.numel() != valid_token.numel():
        raise ValueError(f"valid_row and valid_token must be 1-D of equal length (COO pairs), got shapes "
                         f"{tuple(valid_row.shape)} and {tuple(valid_token.shape)}")
    if valid_row.dtype != torch.long or valid_token.dtype != torch.long:
        raise ValueError(f"valid_row / valid_token must be int64, got {valid_row.dtype} / {valid_token.dtype}")
    if valid_row.numel() and (valid_row.min() < 0 or valid_row.max() >= num_positions):
        raise ValueError(f"valid_row must lie in [0, {num_positions}), got [{valid_row.min()}, {valid_row.max()}]")
    # Out of range, the flat gather (row * V + token) would silently read a neighbouring row's logit.
    if valid_token.numel() and (valid_token.min() < 0 or valid_token.max() >= vocab_size):
        raise ValueError(f"valid_token must lie in [0, {vocab_size}), got [{valid_token.min()}, {valid_token.max()}]")


def _check_hyper(beam_width, lam, xi, tau, base, surrogate="paper"):
    """train.check_config gives the CLI's messages; these guard direct callers (an unknown base would run as
    SFT, beam_width 0 would read a neighbouring row's beta, a negative xi or tau would flip the loss)."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if int(beam_width) != beam_width or beam_width < 1:
        raise ValueError(f"beam_width must be a positive integer, got {beam_width!r}")
    if not xi > 0:
        raise ValueError(f"xi must be > 0, got {xi!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if base == "sft" and tau != 1.0:
        raise ValueError(f"tau={tau!r} applies only to base='msl' (SFT is the plain cross-entropy of eq. 2.1)")
    if lam != lam:  # NaN
        raise ValueError("lam must be a number, got NaN")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


def _check_examples(thresholds, label_example, num_positions):
    """obj31's per-example inputs. Non-consecutive examples would silently split one example's running sum."""
    if thresholds.shape != (num_positions,) or label_example.shape != (num_positions,):
        raise ValueError(f"thresholds and label_example must be ({num_positions},), got "
                         f"{tuple(thresholds.shape)} and {tuple(label_example.shape)}")
    if not torch.isfinite(thresholds).all():
        raise ValueError("thresholds must be finite log-probabilities (fall back to the smallest candidate)")
    num_runs = int((label_example[1:] != label_example[:-1]).sum()) + 1 if num_positions else 0
    if torch.unique(label_example).numel() != num_runs:
        raise ValueError("label_example: the label positions of an example must be consecutive")

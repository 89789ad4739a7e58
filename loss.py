"""Training losses of the BEAR paper: SFT (eq. 2.1), MSL, BEAR (eq. 3.4/3.5), objective 3.1, and
S-DPO with and without BEAR's regularisers (Figure 7).

Each loss takes the logits at the label positions and returns a per-position loss in fp32 (S-DPO: a
per-prompt loss); the training loop sums it and divides by the global number of label tokens
(S-DPO: of prompts). The oracle is
`reference_losses` in tests/test_loss.py: a Python loop over positions, Python sorting for beta_t,
autograd for the gradients.

Shapes: N label positions, V vocabulary, M valid (row, token) pairs, E examples, L the longest one.
  logits (N, V) in any dtype (computed in fp32), labels (N,) int64.
  valid_row, valid_token (M,) int64: the trie-valid next-token sets V_t as COO pairs
  (data.ItemTrie.valid_next); row i lists each valid token at label position i once, the label
  among them; rows come in any order.

p_t is the probability under the distribution the base loss trains: for base="msl" the softmax over
V_t at temperature tau (the authors' "masked probabilities"), for base="sft" the full-vocabulary
softmax. At tau = 1 it is exactly what the constrained beam search ranks by, and it makes BEAR's
gradient exactly the authors' re-weighted cross-entropy (`bear`). The valid sets are tiny next to V
(mostly 1-5 tokens, a few thousands), so the masked losses gather the M valid logits and reduce them
per row; they never build an (N, V) mask.
"""
import torch
import torch.nn.functional as F

BASES = ("msl", "sft")
SURROGATES = ("paper", "violators")  # eq. 3.4's log sigmoid(Delta/xi); ours -log sigmoid(-Delta/xi)


# ------------------------------------------------------------------------------------------ losses
def sft(logits, labels):
    """Eq. 2.1 ("LML" in the authors' code): cross-entropy over the whole vocabulary. (N,) fp32."""
    _check_inputs(logits, labels)
    return F.cross_entropy(logits.float(), labels, reduction="none")              # (N,)


def msl(logits, labels, valid_row, valid_token, tau=1.0):
    """Masked softmax loss (MSL, SIGIR'25): cross-entropy over the valid tokens V_t at temperature
    tau, -z_y/tau + logsumexp_{v in V_t} z_v/tau. A position with one valid token contributes
    exactly 0 (value and gradient). Returns (N,) fp32."""
    _check_inputs(logits, labels, valid_token)
    z_valid, lse = masked_logits(logits, valid_row, valid_token, tau)             # (M,), (N,)
    return lse - at_labels(z_valid, valid_row, valid_token, labels)               # (N,)


def bear(logits, labels, valid_row, valid_token, beam_width=10, lam=0.6875, xi=2.75, tau=1.0,
         base="msl", surrogate="paper"):
    """BEAR, eq. 3.5: L_base + lam * log sigmoid(Delta_t^B / xi) per label position (eq. 3.4), with
    the pruning margin Delta_t^B = log beta_t - log p_t (eq. 3.3). beta_t is the beam_width-th
    largest probability among the valid tokens V_t, detached (the smallest if fewer than B are
    valid, as in the authors' code). Delta_t^B > 0: B valid tokens outrank the positive's token at
    step t, so the beam search prunes the positive there whatever the other beams hold; p_t >=
    beta_t is the necessary condition. Returns (N,) fp32.

    lam is in eq. 3.5 units; the authors' `topk_weight` lam' is lam / xi (0.25 * 2.75 = 0.6875).
    As d/du log sigmoid(u) = sigmoid(-u) and grad(Delta_t^B) = -grad(log p_t) = grad(L_base), the
    gradient is, for every logit, w_t * grad(L_base) with the detached weight
    w_t = 1 + lam' * sigmoid((log p_t - log beta_t) / xi): the gradient of the authors' re-weighted
    cross-entropy (tested), though the values differ. Where beta_t = p_t (e.g.
    one valid token) the term is the constant lam * log(1/2).

    surrogate="violators" is OUR ablation, not the paper's method: lam * -log sigmoid(-Delta_t^B /
    xi), whose weight lam' * sigmoid(Delta_t^B / xi) is largest for the tokens that violate the
    necessary condition most, where eq. 3.4's vanishes."""
    _check_inputs(logits, labels, valid_token)
    _check_hyper(beam_width, tau, base, surrogate)
    base_loss, margin = _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width,
                                              tau, base)
    if surrogate == "violators":
        return base_loss - lam * F.logsigmoid(-margin / xi)
    return base_loss + lam * F.logsigmoid(margin / xi)                            # eq. 3.4 in 3.5


@torch.no_grad()
def bear_token_weights(logits, labels, valid_row, valid_token, beam_width=10, lam=0.6875, xi=2.75,
                       tau=1.0, base="msl", surrogate="paper"):
    """The detached w_t with grad(bear) = w_t * grad(L_base) (see `bear`): 1 + lam' *
    sigmoid(-Delta_t^B / xi) for eq. 3.4, 1 + lam' * sigmoid(Delta_t^B / xi) for "violators";
    lam' = lam / xi. The authors' normalisation divides by their sum. Returns (N,)."""
    _, margin = _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, tau, base)
    sign = 1.0 if surrogate == "violators" else -1.0
    return 1.0 + (lam / xi) * torch.sigmoid(sign * margin / xi)


def obj31(logits, labels, valid_row, valid_token, thresholds, label_example, beam_width=10,
          lam=0.6875, xi=2.75, tau=1.0, base="msl"):
    """Objective 3.1 (the "straightforward solution"), per label position t:
    L_base + lam * log sigmoid((thr_t - log P(y_<=t)) / xi).

    thresholds (N,): detached and finite, the log-prob of the B-th best candidate prefix of the same
    length in a constrained beam search simulated under the current parameters
    (beam.prefix_thresholds, scored like p_t here: masked before the softmax for "msl", after it for
    "sft", logits / tau). label_example (N,): each position's example; an example's labels are
    consecutive and in order. log P(y_<=t) is the running sum of log p_t within the example, with
    gradient. beam_width is unused (the thresholds encode it). Returns (N,) fp32."""
    _check_inputs(logits, labels, valid_token)
    _check_hyper(beam_width, tau, base)
    if not torch.isfinite(thresholds).all():
        raise ValueError("thresholds must be finite log-probabilities "
                         "(fall back to the smallest candidate)")
    if base == "msl":
        base_loss = msl(logits, labels, valid_row, valid_token, tau)              # (N,) -log p_t
    else:
        base_loss = sft(logits, labels)                                           # (N,)
    if logits.shape[0] == 0:
        return base_loss
    prefix_log_prob = _running_sum_per_example(-base_loss, label_example)         # log P(y_<=t)
    return base_loss + lam * F.logsigmoid((thresholds.detach().float() - prefix_log_prob) / xi)


def sdpo(logits, labels, title_of, reference_log_probs, dpo_beta=1.0):
    """S-DPO (NeurIPS'24; official `dpo_loss`), per prompt: softplus(logsumexp_j beta (r_j - r_0)) =
    -log sigmoid(-log sum_j exp(beta (r_j - r_0))), r_j = log pi(y_j | x) - log pi_ref(y_j | x)
    summed over title j's tokens, EOS included, under the full-vocabulary softmax.

    reference_log_probs (U, K): log pi_ref of each prompt's K = 1 + n titles, the positive first.
    title_of (N,): the title each label position belongs to, as the row-major index u * K + j.
    Returns (U,) fp32; one negative gives DPO's -log sigmoid(beta (r_0 - r_1))."""
    _check_inputs(logits, labels)
    policy = title_log_probs(-sft(logits, labels), title_of, reference_log_probs.shape)  # (U, K)
    reward = policy - reference_log_probs.detach().float()                        # (U, K) r_j
    return F.softplus(torch.logsumexp(dpo_beta * (reward[:, 1:] - reward[:, :1]), dim=1))


def sdpo_bear(logits, labels, valid_row, valid_token, title_of, reference_log_probs, dpo_beta=1.0,
              beam_width=10, lam=0.6875, xi=2.75, base="sft"):
    """S-DPO with BEAR's regularisers (the paper's Figure 7), per prompt: S-DPO + lam * sum_t of eq.
    3.4's log sigmoid(Delta_t^B / xi) over the positive's tokens (into the top-B, as `bear`) - lam
    * the same sum over every negative's tokens (below the top-B: the beam search prunes them).
    p_t and beta_t under the full-vocabulary softmax (base="sft", S-DPO's own) or the masked one
    over V_t (base="msl"). Shapes as `sdpo` and `bear`; returns (U,) fp32."""
    _check_inputs(logits, labels, valid_token)
    _check_hyper(beam_width, 1.0, base)
    _, margin = _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, 1.0, base)
    num_titles = reference_log_probs.shape[1]
    sign = torch.where(title_of % num_titles == 0, 1.0, -1.0)                     # (N,) +pos, -neg
    per_token = sign * F.logsigmoid(margin / xi)                                  # (N,) eq. 3.4
    prompt = title_of // num_titles                                               # (N,)
    regulariser = per_token.new_zeros(len(reference_log_probs)).index_add(0, prompt, per_token)
    return sdpo(logits, labels, title_of, reference_log_probs, dpo_beta) + lam * regulariser


def title_log_probs(token_log_probs, title_of, shape):
    """Each title's log-probability (its tokens' log p summed), `shape` (U, K) from (N,) values."""
    sums = token_log_probs.new_zeros(shape[0] * shape[1]).index_add(0, title_of, token_log_probs)
    return sums.view(shape)


# ----------------------------------------------------------------- BEAR's pruning margin (eq. 3.3)
def _base_loss_and_margin(logits, labels, valid_row, valid_token, beam_width, tau, base):
    """The base loss -log p_t (N,) and Delta_t^B = log beta_t - log p_t (N,), beta_t detached as in
    eq. 3.4. Detaching beta as a whole matters: cancelling the normaliser first and detaching only
    z_(B) gives the same value but loses the normaliser's gradient (tests/test_loss.py)."""
    if base == "msl":
        z_valid, lse = masked_logits(logits, valid_row, valid_token, tau)         # (M,), (N,)
        z_label = at_labels(z_valid, valid_row, valid_token, labels)              # (N,)
        base_loss = lse - z_label                                                 # (N,) -log p_t
    else:  # full-vocabulary softmax; beta is still the B-th largest VALID one (the beam's choice)
        with torch.no_grad():
            flat_index = valid_row * logits.shape[1] + valid_token                # (M,)
            z_valid = logits.reshape(-1)[flat_index].float()                      # (M,)
            z_label = logits.gather(1, labels[:, None]).squeeze(1).float()        # (N,)
        base_loss = F.cross_entropy(logits.float(), labels, reduction="none")     # (N,) -log p_t
    z_beta = _kth_largest_per_row(z_valid.detach(), valid_row, logits.shape[0], int(beam_width))
    # The value: the normaliser cancels, z_(B) - z_y (logits / tau). The gradient: beta is
    # detached, so grad(Delta) = -grad(log p) = grad(base_loss), carried by a 0-valued term.
    margin_value = z_beta - z_label.detach()                                      # (N,)
    margin = margin_value + (base_loss - base_loss.detach())                      # Delta_t^B
    return base_loss, margin


@torch.no_grad()
def _kth_largest_per_row(values, rows, num_rows, k):
    """The min(k, |row|)-th largest of `values` (M,) within each row, (num_rows,); the min() is the
    authors' fallback (fewer than k valid tokens: the smallest). Sorting by the key (row, -value)
    puts each row in one block, largest first: the answer is at block_start + min(k, size) - 1."""
    order = torch.sort(rows * 2**32 + _descending_sort_key(values)).indices       # (M,)
    sorted_values = values[order]                                                 # row blocks
    block_size = torch.zeros(num_rows, dtype=torch.long, device=values.device)
    block_size.index_add_(0, rows, torch.ones_like(rows))                         # (N,)
    block_start = torch.cumsum(block_size, 0) - block_size                        # (N,)
    return sorted_values[block_start + torch.clamp(block_size, max=k) - 1]        # (N,)


def _descending_sort_key(values):
    """int64 keys in [0, 2^32) whose ascending order is the descending order of float32 `values`:
    IEEE-754 bits read as a signed integer order the non-negative floats and reverse the negative
    ones, which are reflected. With an integer key, one sort orders the (row, value) pairs."""
    bits = values.float().view(torch.int32).long()                                # sign: top bit
    ascending = torch.where(bits < 0, -(bits + 2**31) - 1, bits)                  # [-2^31, 2^31)
    return (2**31 - 1) - ascending


# ---------------------------------------------------------- the masked distribution (also beam.py)
def masked_logits(logits, rows, tokens, tau=1.0):
    """The valid logits z = logits[rows, tokens] / tau (M,) fp32 and each row's masked-softmax
    normaliser lse = logsumexp_{v in V_t} z_v (R,), so log p = z - lse[rows]. logits (R, V)."""
    flat_index = rows * logits.shape[1] + tokens                                  # (M,)
    # One flat gather: its backward is a single scatter into the (R, V) gradient.
    z = logits.reshape(-1).gather(0, flat_index).float() / tau                    # (M,)
    return z, segment_logsumexp(z, rows, logits.shape[0])                         # (M,), (R,)


def segment_logsumexp(values, rows, num_rows):
    """logsumexp of `values` (M,) within each of `num_rows` rows, (num_rows,). The row maximum is
    subtracted so exp() cannot overflow; it is detached, as it cancels out of the gradient."""
    row_max = values.new_full((num_rows,), -torch.inf)
    row_max = row_max.scatter_reduce(0, rows, values.detach(), reduce="amax")     # (num_rows,)
    sum_exp = values.new_zeros(num_rows).index_add(0, rows, torch.exp(values - row_max[rows]))
    return torch.log(sum_exp) + row_max


def at_labels(values, rows, tokens, labels):
    """`values` (M,) of the valid pairs read at each row's label, (R,). A label outside its row's
    valid set has p_t = 0 and no value to read: one clear error, not a wrong loss."""
    is_label = tokens == labels[rows]                                             # (M,)
    label_count = torch.zeros(len(labels), dtype=torch.long, device=values.device)
    label_count.index_add_(0, rows, is_label.long())                              # (R,)
    if len(labels) and label_count.min() != 1:
        bad = int((label_count != 1).nonzero()[0])
        raise ValueError(f"label position {bad}: its label {int(labels[bad])} is not among its "
                         f"valid next tokens")
    # Exactly one label pair per row, so an index_add places each row's value.
    return values.new_zeros(len(labels)).index_add(0, rows[is_label], values[is_label])  # (R,)


# ------------------------------------------------------------------------ Obj 3.1's running sum
def _running_sum_per_example(log_p, label_example):
    """log P(y_<=t) (N,): the running sum of log_p (N,) within each example, with gradient. Runs of
    equal label_example are the examples; summing along the rows of an (E, L) grid of them keeps
    one example's sum free of another's rounding, which one cumsum minus offsets would not."""
    num_positions = log_p.shape[0]
    new_run = torch.ones(num_positions, dtype=torch.bool, device=log_p.device)
    new_run[1:] = label_example[1:] != label_example[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1                                  # (N,)
    num_runs = int(run_id[-1]) + 1
    if torch.unique(label_example).numel() != num_runs:  # one example's sum would silently split
        raise ValueError("label_example: the label positions of an example must be consecutive")
    run_start = new_run.nonzero().squeeze(1)                                      # (E,)
    offset = torch.arange(num_positions, device=log_p.device) - run_start[run_id]  # (N,)
    grid = log_p.new_zeros(num_runs, int(offset.max()) + 1)                       # (E, L)
    grid = grid.index_put((run_id, offset), log_p)
    return torch.cumsum(grid, dim=1)[run_id, offset]                              # (N,)


# ----------------------------------------------------------------- checks where direct calls enter
# train.check_config checks the CLI's input; these stop a direct caller's silently wrong answer.
def _check_inputs(logits, labels, valid_token=None):
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be ({logits.shape[0]},) to match logits, got "
                         f"{tuple(labels.shape)}")
    if valid_token is None or valid_token.numel() == 0:
        return
    low, high, vocab_size = int(valid_token.min()), int(valid_token.max()), logits.shape[1]
    if low < 0 or high >= vocab_size:  # the flat gather would read a neighbouring row's logit
        raise ValueError(f"valid_token must lie in [0, {vocab_size}), got [{low}, {high}]")


def _check_hyper(beam_width, tau, base, surrogate="paper"):
    if base not in BASES:  # it would run as SFT
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if base == "sft" and tau != 1.0:
        raise ValueError(f"tau={tau!r} applies only to base='msl' (SFT is eq. 2.1's cross-entropy)")
    if int(beam_width) != beam_width or beam_width < 1:  # 0 would read another row's beta
        raise ValueError(f"beam_width must be a positive integer, got {beam_width!r}")
    assert surrogate in SURROGATES, surrogate

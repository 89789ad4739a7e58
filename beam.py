"""Trie-constrained beam search, the exact top-K search over the trie, and the paper's ranking metrics.

SPEC §4 and §5. The beam search follows Hugging Face's `_beam_search` (transformers 5.x, early_stopping=False,
one EOS token) step for step, so `generate(num_beams=B, ...)` with a trie-masking logits processor is an exact
oracle; what it does differently is only WHERE the work goes:

- the prompt is prefilled ONCE per user (left padding) and its keys/values stay one row per user that all of its
  beams read (model.KVCache, model.shared_prompt_attention); only the short generated part is reordered and
  grown each step (HF prefills B copies of every prompt and copies every beam's whole cache every step);
- every step only the trie-valid continuations are scored: the valid (beam, token) pairs are read off the
  trie's CSR arrays for all beams of all users at once, and the masked log-softmax is a segmented logsumexp
  over those pairs, never an (R, V) mask;
- a user whose search is over leaves the batch (its rows leave the cache), so late steps run on few rows;
- beams hold only live hypotheses: a user with fewer than B valid continuations runs fewer rows, where HF
  carries placeholder beams scored about -1e9 (they can never outrank a real hypothesis, so results agree);
- with the mask before the softmax, a beam whose trie node has a single leaf below it is "determined": every
  remaining token has log p = log 1 = 0 exactly, so its final score and tokens are known. It stays in the
  lock-step bookkeeping (beam slot, ranking, stopping rule, gen_len at its EOS: identical results for any
  length_penalty) but leaves the model batch and the KV cache, so the long tails of long titles cost no forward.

Search semantics per user and step t (gen_len = t + 1 tokens generated, EOS included):
  candidates = every trie-valid one-token extension of the running beams, score = beam score + log p(token);
  rank them; an EOS candidate ranking within the first B is finished with score
  sum_logprob / gen_len ** length_penalty (others are dropped); the B best non-EOS candidates are the next
  beams; the finished set keeps the B best. The user stops when no running beam is left, or when B items are
  finished and best_running_score / gen_len ** length_penalty <= the worst finished score (HF's heuristic for
  early_stopping=False; exact for length_penalty = 0, since scores only fall as tokens are added).
Log-probabilities: mask_before_softmax=True renormalises over the valid tokens V_t (log-softmax of the valid
logits, as MSL/BEAR train); False uses the full-vocabulary log-softmax (stock constrained generation).
All arithmetic is fp32 (logits are upcast), in the same order as HF, so scores agree to float rounding.
"""
import heapq
import math
import weakref
from dataclasses import dataclass

import torch

from model import KVCache


@dataclass
class BeamConfig:
    beam_width: int = 10               # B: beams per user, and the number of items returned
    mask_before_softmax: bool = True   # renormalise over the trie-valid tokens (False: full-vocabulary log-probs)
    length_penalty: float = 0.0        # finished score = sum log p / gen_len ** length_penalty (HF's default is 1)
    batch_size: int = 16               # users per pass (each user holds B rows of the KV cache)


# ------------------------------------------------------------------------------------------------ helpers
def _check_config(config: BeamConfig):
    if not isinstance(config.beam_width, int) or config.beam_width < 1:
        raise ValueError(f"beam_width must be a positive integer, got {config.beam_width!r}")
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {config.batch_size!r}")
    if not math.isfinite(config.length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {config.length_penalty!r}")


def _check_trie(trie):
    if int(trie.child_ptr[1]) == 0:
        raise ValueError("the item trie is empty: no item can be generated")


def _left_pad(prompts, pad_id):
    """Left-padded (U, P) input_ids and attention_mask, so every prompt ends in the last column."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)             # (U, P)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)               # (U, P)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


def _prefill(model, prompts, pad_id):
    """Run the prompts once; returns (cache with one row per prompt, fp32 next-token logits (U, V))."""
    input_ids, prompt_mask = _left_pad(prompts, pad_id)
    cache = KVCache(model.config.num_hidden_layers)
    last = torch.zeros_like(prompt_mask, dtype=torch.bool)
    last[:, -1] = True                                                                  # only the lm_head we need
    logits = model(input_ids, attention_mask=prompt_mask, cache=cache, logits_at=last).float()   # (U, V)
    return cache, logits


_LEAF_COUNTS = weakref.WeakKeyDictionary()   # trie -> (num_nodes,) leaves per subtree, computed once per trie


def _leaf_counts(trie):
    """(num_nodes,) long: how many leaves (distinct titles) lie in each node's subtree, the node included.

    Node ids run breadth first, so each depth is a contiguous id range and the children of depth d form depth
    d + 1; the counts are summed into the parents one depth at a time, deepest first (one index_add per depth)."""
    counts = _LEAF_COUNTS.get(trie)
    if counts is not None:
        return counts
    counts = torch.zeros(trie.num_nodes, dtype=torch.long)                               # (num_nodes,)
    counts[torch.tensor(sorted(trie.leaf_items), dtype=torch.long)] = 1
    edge_parent = torch.repeat_interleave(torch.arange(trie.num_nodes), trie.child_ptr.diff())   # (E,)
    parent = torch.full((trie.num_nodes,), -1, dtype=torch.long)
    parent[trie.child_node] = edge_parent                                                # (num_nodes,) root: -1
    if bool((trie.child_node <= edge_parent).any()):
        raise ValueError("the item trie's node ids are not breadth first (a child id is not above its parent's)")
    depths = [(0, 1)]                                                                    # [first, end) node ids
    while int(trie.child_ptr[depths[-1][1]]) > int(trie.child_ptr[depths[-1][0]]):
        first, end = depths[-1]
        depths.append((int(trie.child_node[trie.child_ptr[first]]), int(trie.child_node[trie.child_ptr[end] - 1]) + 1))
    for first, end in reversed(depths[1:]):
        counts.index_add_(0, parent[first:end], counts[first:end].clone())   # parents lie above `first`
    _LEAF_COUNTS[trie] = counts
    return counts


def _children(trie, nodes):
    """Every trie edge out of `nodes` (R,), flattened in row order from the CSR arrays: (row, token, child) (M,)."""
    start = trie.child_ptr[nodes]                                                       # (R,)
    count = trie.child_ptr[nodes + 1] - start                                           # (R,)
    row = torch.repeat_interleave(torch.arange(nodes.numel()), count)                   # (M,)
    first_of_row = torch.cumsum(count, 0) - count                                       # (R,)
    edge = start[row] + torch.arange(row.numel()) - first_of_row[row]                  # (M,)
    return row, trie.child_token[edge], trie.child_node[edge]


def _token_log_probs(logits, row, token, mask_before_softmax):
    """log p(token | row) for the M valid (row, token) pairs, (M,) fp32 on the CPU; logits (R, V) fp32 on the
    model's device, where the work is done (the search's bookkeeping, like the trie, stays on the CPU).

    Before: log-softmax over the row's valid tokens only (a segmented logsumexp over the M pairs).
    After: the plain full-vocabulary log-softmax, read at the valid pairs."""
    row, token = row.to(logits.device), token.to(logits.device)
    valid_logit = logits[row, token]                                                    # (M,)
    if not mask_before_softmax:
        return (valid_logit - torch.logsumexp(logits, dim=-1)[row]).cpu()
    num_rows = logits.shape[0]
    row_max = logits.new_full((num_rows,), -math.inf).scatter_reduce(0, row, valid_logit, "amax")   # (R,)
    sum_exp = logits.new_zeros(num_rows).index_add(0, row, torch.exp(valid_logit - row_max[row]))   # (R,)
    return (valid_logit - (row_max + torch.log(sum_exp))[row]).cpu()


def _rank_per_user(cand_user, cand_score, num_users, k):
    """Each user's k best candidates, best first: (score (U, k), candidate index (U, k)); -inf / 0 past the end.

    Candidates arrive grouped by user (rows are kept sorted by user and _children keeps row order), so a dense
    (U, most candidates) grid is filled without sorting and torch.topk ranks every user at once."""
    count = torch.bincount(cand_user, minlength=num_users)                              # (U,)
    first = torch.cumsum(count, 0) - count                                              # (U,)
    position = torch.arange(cand_user.numel()) - first[cand_user]                      # (M,)
    width = max(int(count.max()), 1)
    grid = torch.full((num_users, width), -math.inf)                                    # (U, C)
    grid[cand_user, position] = cand_score
    top_score, top_position = torch.topk(grid, k=min(k, width), dim=1)                  # (U, k)
    return top_score, (first[:, None] + top_position).clamp(max=max(cand_user.numel() - 1, 0))


def _step(trie, logits, beams, num_users, beam_width, eos_id, mask_before_softmax):
    """Score and rank all valid continuations of all beams. beams = (row_user, row_node, row_score, row_model),
    each (R,); row_model = the beam's row of `logits` (and of the KV cache), -1 for a determined beam (see
    _advance), whose single continuation has log p = 0 exactly: the log-softmax over one valid logit v is
    v - (v + log 1) = 0 in floating point too, so skipping its forward changes no score by a single bit.

    Returns per user the top 2B candidates (HF looks no further: at most B of them can end in EOS, so at least
    B non-EOS ones are among them whenever they exist) as a dict of (U, 2B) tensors."""
    row_user, row_node, row_score, row_model = beams
    row, token, child = _children(trie, row_node)                                       # (M,)
    model_row = row_model[row]                                                          # (M,) -1: determined
    log_p = torch.zeros(row.numel())                                                    # (M,) fp32
    live = model_row >= 0
    log_p[live] = _token_log_probs(logits, model_row[live], token[live], mask_before_softmax)
    cand_score = row_score[row] + log_p                                                 # (M,) fp32
    score, index = _rank_per_user(row_user[row], cand_score, num_users, 2 * beam_width)        # (U, 2B)
    real = score > -math.inf                                                            # (U, 2B)
    is_eos = (token[index] == eos_id) & real
    running = real & ~is_eos
    running &= torch.cumsum(running.long(), 1) <= beam_width                           # the B best non-EOS
    return dict(score=score, parent=row[index], token=token[index], child=child[index],
                is_eos=is_eos, running=running, rank=torch.arange(score.shape[1]).expand_as(score))


def _advance(model, cache, step, row_model, determined_after):
    """Follow the surviving candidates (running & kept users): reorder the cache, run one token; returns the fp32
    logits (R_model, V) and each new beam's row in them (R',), -1 for a determined beam.

    A beam is determined once its trie node has a single leaf in its subtree (determined_after: (num_nodes,)
    bool, all False when masking after the softmax): its remaining tokens are fixed and, with the mask before
    the softmax, each of them has log p = 0 exactly, so its final score is already known. It keeps its beam slot
    and its place in the lock-step bookkeeping (the HF ranking and stopping rule are unchanged), but leaves the
    model batch and the KV cache for good (its descendants are determined too): on Office, beams on long titles
    otherwise cost a forward for up to ~200 steps after their outcome is settled."""
    keep = step["running"]                                                              # (U, 2B) bool
    parent, token, child = step["parent"][keep], step["token"][keep], step["child"][keep]   # (R',) by user
    run = ~determined_after[child]                                                      # (R',) still uncertain
    new_row_model = torch.where(run, torch.cumsum(run.long(), 0) - 1, -1)             # (R',)
    # An uncertain beam's parent was uncertain (a subtree's leaves include its children's), so it has a cache row.
    # The cache moves only the generated steps; each prompt stays one shared row (model.KVCache).
    cache.reorder(row_model[parent[run]])                                               # beams AND batch shrink
    if not bool(run.any()):
        return torch.empty(0, 0), new_row_model          # nothing left to score: no row reads these logits
    logits = model(token[run][:, None], cache=cache)[:, -1].float()                    # (R_model, V)
    return logits, new_row_model


# ------------------------------------------------------------------------------------------------ beam search
@torch.no_grad()
def beam_search(model, prompts, trie, eos_id, pad_id, config=BeamConfig(), progress=None):
    """Trie-constrained beam search for many users (SPEC §4).

    prompts: list of token-id lists (each user's full prompt). Returns, per user, up to B distinct leaves as
    (frozenset of item ids sharing that title, score), best first; score = total log-prob / gen_len **
    length_penalty (gen_len counts the EOS). Fewer than B when fewer items are reachable. `progress(done)`, if
    given, is called after each batch of users."""
    _check_config(config)
    _check_trie(trie)
    results = []
    for start in range(0, len(prompts), config.batch_size):
        results.extend(_beam_search_batch(model, prompts[start:start + config.batch_size], trie, eos_id, pad_id,
                                          config))
        if progress is not None:
            progress(len(results))
    return results


def _determined_nodes(trie, mask_before_softmax):
    """(num_nodes,) bool: nodes after which every step has log p = 0 exactly (one leaf below, mask before)."""
    if not mask_before_softmax:   # full-vocabulary log-probs are not 0 on single-child nodes
        return torch.zeros(trie.num_nodes, dtype=torch.bool)
    return _leaf_counts(trie) == 1


def _beam_search_batch(model, prompts, trie, eos_id, pad_id, config, prefilled=None):
    width, penalty = config.beam_width, config.length_penalty
    determined = _determined_nodes(trie, config.mask_before_softmax)                   # (num_nodes,) bool
    cache, logits = prefilled or _prefill(model, prompts, pad_id)
    num_users = len(prompts)
    active = torch.arange(num_users)                                    # (U_a,) prompt row of each active user
    beams = (torch.arange(num_users), torch.zeros(num_users, dtype=torch.long), torch.zeros(num_users),
             torch.arange(num_users))                                   # (user, node, score, logits/cache row)
    finished_score = torch.full((num_users, width), -math.inf)          # (U_a, B) best first
    finished_node = torch.full((num_users, width), -1, dtype=torch.long)
    results = [[] for _ in prompts]
    gen_len = 0
    while active.numel() > 0:
        gen_len += 1
        step = _step(trie, logits, beams, active.numel(), width, eos_id, config.mask_before_softmax)
        # An EOS candidate ranking within the first B finishes an item (HF's top_num_beam_mask); merge it into
        # the finished set and keep the B best (concatenation order and torch.topk as in HF).
        new_finished = step["is_eos"] & (step["rank"] < width)
        new_score = torch.where(new_finished, step["score"] / (gen_len ** penalty), -math.inf)
        merged_score = torch.cat([finished_score, new_score], 1)                        # (U_a, 3B)
        merged_node = torch.cat([finished_node, step["child"]], 1)
        finished_score, best = torch.topk(merged_score, k=width, dim=1)                 # (U_a, B)
        finished_node = torch.gather(merged_node, 1, best)
        # Stop a user (HF, early_stopping=False): no running beam left, or B finished and the best running
        # beam, scored at its current length, cannot beat the worst finished item.
        has_running = step["running"].any(1)
        best_running = torch.where(step["running"], step["score"], -math.inf).max(1).values
        full = finished_score[:, -1] > -math.inf
        done = ~has_running | (full & ~(best_running / (gen_len ** penalty) > finished_score[:, -1]))
        for u in done.nonzero().flatten().tolist():
            results[int(active[u])] = [(trie.leaf_items[int(n)], float(s))
                                       for s, n in zip(finished_score[u].tolist(), finished_node[u].tolist())
                                       if s > -math.inf]
        if done.all():
            break
        # Finished users leave the batch: their candidates are not followed and their cache rows are dropped.
        step["running"] &= ~done[:, None]
        keep = step["running"]
        new_user_index = torch.cumsum(~done, 0) - 1                                    # (U_a,)
        row_user = new_user_index.repeat_interleave(keep.sum(1))
        logits, row_model = _advance(model, cache, step, beams[3], determined)
        beams = (row_user, step["child"][keep], step["score"][keep], row_model)
        active, finished_score, finished_node = active[~done], finished_score[~done], finished_node[~done]
    return results


# ------------------------------------------------------------------------------------ search + teacher forcing
@torch.no_grad()
def search_and_teacher_force(model, prompts, targets, trie, eos_id, pad_id, config=BeamConfig(), progress=None):
    """The beam search of `beam_search` and, on the same prefill, the target read under teacher forcing.

    Returns (results, forced): results as `beam_search`; forced[i] = (ranks, valid, log_probs), lists over the
    target's tokens t of rank_t = how many valid next tokens score strictly above y_t (the necessary condition
    p_t >= beta_t holds iff rank_t < B), |V_t|, and log p_t as the search scores it (config.mask_before_softmax),
    so sum(log_probs) is the target's total log-prob log P(y|x). `progress(done)` is called after each batch."""
    _check_config(config)
    _check_trie(trie)
    results, forced = [], []
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start:start + config.batch_size]
        cache, logits = _prefill(model, batch, pad_id)
        forced.extend(_teacher_force(model, cache, logits, targets[start:start + len(batch)], trie, pad_id,
                                     config.mask_before_softmax))
        results.extend(_beam_search_batch(model, batch, trie, eos_id, pad_id, config, prefilled=(cache, logits)))
        if progress is not None:
            progress(start + len(batch))
    return results, forced


def _teacher_force(model, cache, first_logits, targets, trie, pad_id, mask_before_softmax):
    """Run each target's tokens on its prompt's cached prefill (a `select`ed copy: `cache` stays as it is)."""
    tokens = [list(trie.item_tokens[target]) for target in targets]
    lengths = torch.tensor([len(t) for t in tokens])                                   # (U,)
    depth = int(lengths.max()) - 1                                                      # tokens fed after the prompt
    logits = first_logits                                                               # (U, V) predict token 0
    if depth > 0:
        input_ids = torch.full((len(tokens), depth), pad_id, dtype=torch.long)          # (U, D) right-padded
        for r, t in enumerate(tokens):
            input_ids[r, :len(t) - 1] = torch.tensor(t[:-1])
        fed = torch.arange(depth)[None, :] < (lengths - 1)[:, None]                     # (U, D) bool
        rows = cache.select(torch.arange(len(tokens)))
        attention_mask = torch.cat([rows.cached_mask().cpu(), fed.long()], dim=1)     # (U, P + D)
        later = model(input_ids, attention_mask=attention_mask, cache=rows, logits_at=fed).float()  # (sum L-1, V)
        logits = torch.cat([first_logits, later.to(first_logits.device)])
    # Row of `logits` predicting token j of example r: r for j = 0, else U + (r's offset in `later`) + j - 1.
    offset = torch.cumsum(lengths - 1, 0) - (lengths - 1)                               # (U,)
    order = torch.cat([torch.tensor([r] + [len(tokens) + int(offset[r]) + j - 1 for j in range(1, len(t))])
                       for r, t in enumerate(tokens)])                                  # (N,)
    labels = torch.tensor([token for t in tokens for token in t])                       # (N,)
    nodes = torch.cat([trie.item_path(target) for target in targets]).long()            # (N,) node before each
    device = logits.device
    logits = logits[order.to(device)]                                                   # (N, V)
    row, token, _ = _children(trie, nodes)                                              # (M,) valid pairs
    valid_logit = logits[row.to(device), token.to(device)].cpu()                        # (M,)
    label_logit = logits[torch.arange(len(labels), device=device), labels.to(device)].cpu()   # (N,)
    ranks = torch.zeros(len(labels), dtype=torch.long).index_add_(0, row, (valid_logit > label_logit[row]).long())
    valid = torch.bincount(row, minlength=len(labels))                                 # (N,)
    log_p = _token_log_probs(logits, row, token, mask_before_softmax)                   # (M,)
    label_log_p = torch.zeros(len(labels)).index_add_(0, row[token == labels[row]], log_p[token == labels[row]])
    forced, first = [], 0
    for t in tokens:
        span = slice(first, first + len(t))
        forced.append((ranks[span].tolist(), valid[span].tolist(), label_log_p[span].tolist()))
        first += len(t)
    return forced


# ------------------------------------------------------------------------------------------------ Obj 3.1
@torch.no_grad()
def prefix_thresholds(model, prompts, targets, trie, eos_id, pad_id, config=BeamConfig(), tau=1.0):
    """Thresholds of objective 3.1 (SPEC §3): one per label position, (N,) fp32, aligned with the training
    batch's labels (example by example, target token by target token; target tokens = trie.item_tokens[target]).

    For each example the constrained beam search of `beam_search` is simulated under the current parameters
    (all examples' beams together on one KV cache). At step t (0-based; the label is the target's token t) the
    candidates are every trie-valid one-token extension of the running beams, scored by their TOTAL prefix
    log-prob log P(c_<=t | x) (no length penalty). The threshold is the log-prob of the B-th best candidate the
    positive prefix y_<=t competes with in `beam_search`:
      - label token not EOS: the B-th best non-EOS candidate (only non-EOS candidates become running beams);
      - label token EOS: the B-th best candidate of all (an EOS continuation is finished only if it ranks
        within the first B of the step's candidates, EOS and non-EOS alike).
    Fewer than B such candidates: the smallest of them. Finished hypotheses leave the running set (they are
    not extended and compete no more). The search runs to the end of each positive, ignoring the early-stop
    rule; if no candidate of the kind is left (the search died out), the previous step's threshold is repeated.
    The positive itself is a candidate only while beam search keeps it, exactly as in the real search.
    Scores: mask_before_softmax as in the config, logits / tau, so they match loss.obj31's log P(y_<=t)."""
    _check_config(config)
    _check_trie(trie)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    labels = [trie.item_tokens[t] for t in targets]
    thresholds = []
    for start in range(0, len(prompts), config.batch_size):
        stop = start + config.batch_size
        thresholds.extend(_thresholds_batch(model, prompts[start:stop], labels[start:stop], trie, eos_id, pad_id,
                                            config, tau))
    return torch.tensor([value for per_example in thresholds for value in per_example], dtype=torch.float32)


def _thresholds_batch(model, prompts, labels, trie, eos_id, pad_id, config, tau):
    width = config.beam_width
    determined = _determined_nodes(trie, config.mask_before_softmax)   # log p = 0 exactly for any tau > 0
    cache, logits = _prefill(model, prompts, pad_id)
    num_users = len(prompts)
    active = torch.arange(num_users)
    beams = (torch.arange(num_users), torch.zeros(num_users, dtype=torch.long), torch.zeros(num_users),
             torch.arange(num_users))
    thresholds = [[] for _ in prompts]
    gen_len = 0
    while True:
        t, gen_len = gen_len, gen_len + 1
        step = _step(trie, logits / tau, beams, active.numel(), width, eos_id, config.mask_before_softmax)
        label_is_eos = torch.tensor([labels[int(u)][t] == eos_id for u in active])     # (U_a,)
        real = step["score"] > -math.inf                                                # (U_a, 2B)
        competing = torch.where(label_is_eos[:, None], real, real & ~step["is_eos"])   # (U_a, 2B)
        seen = torch.cumsum(competing.long(), 1)
        wanted = seen[:, -1].clamp(max=width)                                           # B, or all if fewer
        at = (competing & (seen == wanted[:, None])).long().argmax(1)                  # (U_a,) the B-th one
        value = step["score"].gather(1, at[:, None]).squeeze(1)                         # (U_a,)
        for u, (user, has_any) in enumerate(zip(active.tolist(), (wanted > 0).tolist())):
            previous = thresholds[user][-1] if thresholds[user] else 0.0
            thresholds[user].append(float(value[u]) if has_any else previous)
        done = torch.tensor([len(labels[int(u)]) <= gen_len for u in active]) | ~step["running"].any(1)
        for u in done.nonzero().flatten().tolist():    # died out early: repeat the last threshold to the end
            user = int(active[u])
            thresholds[user].extend([thresholds[user][-1]] * (len(labels[user]) - len(thresholds[user])))
        if done.all():
            return thresholds
        step["running"] &= ~done[:, None]
        keep = step["running"]
        row_user = (torch.cumsum(~done, 0) - 1).repeat_interleave(keep.sum(1))
        logits, row_model = _advance(model, cache, step, beams[3], determined)
        beams = (row_user, step["child"][keep], step["score"][keep], row_model)
        active = active[~done]


# ------------------------------------------------------------------------------------------------ exact top-K
@torch.no_grad()
def exact_topk(model, prompts, trie, k, eos_id, pad_id, config=BeamConfig(), expand_width=16, progress=None):
    """The k items of largest total log-prob log P(y|x) per prompt, exactly (SPEC §5, for PR@K), best first, as
    (frozenset of item ids, total log-prob). Scored like the beam search (config.mask_before_softmax).

    Best-first search over the trie keyed by prefix log-prob: admissible, since extending a prefix can only
    lower it, so once k items are found and the best unexpanded prefix scores no higher than the k-th, nothing
    better is left. Each round expands up to `expand_width` best prefixes per user in one batched forward that
    reuses the prompt's KV cache (the rows share it; the prefix tokens are run on top). With
    masking before the softmax a prefix with a single valid next token passes its score on unchanged
    (probability 1), so such chains cost no forward at all."""
    _check_config(config)
    _check_trie(trie)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    results = []
    for start in range(0, len(prompts), config.batch_size):
        results.extend(_exact_topk_batch(model, prompts[start:start + config.batch_size], trie, k, eos_id, pad_id,
                                         config.mask_before_softmax, expand_width))
        if progress is not None:
            progress(len(results))
    return results


def _exact_topk_batch(model, prompts, trie, k, eos_id, pad_id, mask_before_softmax, expand_width):
    prompt_cache, logits = _prefill(model, prompts, pad_id)
    num_users = len(prompts)
    frontier = [[] for _ in prompts]      # max-heaps (by -log P) of (-log P, serial, node, prefix tokens)
    found = [[] for _ in prompts]         # min-heaps of the k best finished (log P, serial, leaf node)
    serial = 0
    num_children = trie.child_ptr.diff()                                                # (num_nodes,)

    def expand(users, nodes, scores, prefixes, logits):
        nonlocal serial
        row, token, child = _children(trie, torch.tensor(nodes))
        child_score = torch.tensor(scores)[row] + _token_log_probs(logits, row, token, mask_before_softmax)
        for r, tok, node, s in zip(row.tolist(), token.tolist(), child.tolist(), child_score.tolist()):
            user, serial = users[r], serial + 1
            if tok == eos_id:
                (heapq.heappush if len(found[user]) < k else heapq.heappushpop)(found[user], (s, serial, node))
            else:
                heapq.heappush(frontier[user], (-s, serial, node, prefixes[r] + (tok,)))

    def worth_expanding(user):            # could the best open prefix still hold an item better than the k-th?
        return frontier[user] and (len(found[user]) < k or -frontier[user][0][0] > found[user][0][0])

    expand(list(range(num_users)), [trie.root] * num_users, [0.0] * num_users, [()] * num_users, logits)
    while True:
        users, nodes, scores, prefixes = [], [], [], []
        for user in range(num_users):
            taken = 0
            while taken < expand_width and worth_expanding(user):
                negative_score, _, node, prefix = heapq.heappop(frontier[user])
                if mask_before_softmax and int(num_children[node]) == 1:   # p = 1: no forward needed
                    only = int(trie.child_ptr[node])
                    token, child = int(trie.child_token[only]), int(trie.child_node[only])
                    serial += 1
                    if token == eos_id:
                        entry = (-negative_score, serial, child)
                        (heapq.heappush if len(found[user]) < k else heapq.heappushpop)(found[user], entry)
                    else:
                        heapq.heappush(frontier[user], (negative_score, serial, child, prefix + (token,)))
                    continue
                users.append(user), nodes.append(node), scores.append(-negative_score), prefixes.append(prefix)
                taken += 1
        if not users:
            break
        # Run every prefix on top of its user's prompt cache; right padding inside the new tokens is
        # harmless (causal attention), and logits are read at each prefix's last token.
        depth = max(len(p) for p in prefixes)
        input_ids = torch.full((len(users), depth), pad_id, dtype=torch.long)          # (R, D)
        for r, prefix in enumerate(prefixes):
            input_ids[r, :len(prefix)] = torch.tensor(prefix)
        lengths = torch.tensor([len(p) for p in prefixes])                              # (R,)
        new_mask = (torch.arange(depth)[None, :] < lengths[:, None]).long()             # (R, D)
        read_at = torch.arange(depth)[None, :] == (lengths - 1)[:, None]                # (R, D) bool
        cache = prompt_cache.select(torch.tensor(users))                               # shares the prompt part
        attention_mask = torch.cat([cache.cached_mask().cpu(), new_mask], dim=1)       # (R, P + D)
        logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_at=read_at).float()  # (R, V)
        expand(users, nodes, scores, prefixes, logits)
    return [[(trie.leaf_items[node], score) for score, _, node in sorted(heap, reverse=True)] for heap in found]


# ------------------------------------------------------------------------------------------------ metrics
def rank_of(target, results):
    """0-based position of the first returned leaf whose item set holds `target`; None if none does."""
    for rank, (items, _) in enumerate(results):
        if target in items:
            return rank
    return None


def hit_at(ranks, k):
    """HR@K = mean over examples of [rank < K] (ranks from rank_of, None = not returned)."""
    return sum(r is not None and r < k for r in ranks) / len(ranks) if ranks else 0.0


def ndcg_at(ranks, k):
    """NDCG@K with one relevant item: mean of [rank < K] / log2(rank + 2)."""
    return sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks) if ranks else 0.0


def pruned_positives(targets, beam_results, exact_results, k):
    """(eligible, pruned) example indices for PR@K: eligible = the target is in the exact top-K by P(y|x)
    (its leaf among exact_results[i][:k]); pruned = eligible and not among the beam's returned leaves."""
    eligible = [i for i, t in enumerate(targets) if rank_of(t, exact_results[i][:k]) is not None]
    pruned = [i for i in eligible if rank_of(targets[i], beam_results[i]) is None]
    return eligible, pruned


def pruning_rate(targets, beam_results, exact_results, k):
    """PR@K (paper Fig. 6): among examples whose target ranks in the exact top-K, the share the beam search did
    NOT return. 0.0 when no example is eligible."""
    eligible, pruned = pruned_positives(targets, beam_results, exact_results, k)
    return len(pruned) / len(eligible) if eligible else 0.0


@torch.no_grad()
def violates_necessary_condition(model, prompt, target, trie, config=BeamConfig()):
    """True if, teacher-forcing the target's tokens after the prompt, some step has p_t < beta_t, beta_t = the
    B-th largest probability among the trie-valid next tokens (the smallest when fewer than B are valid).
    The same for both masking options: p_t / beta_t does not depend on the normaliser, so logits are compared."""
    tokens = trie.item_tokens[target]
    nodes = torch.tensor(trie.path(tokens))                                             # (L,) node before each
    input_ids = torch.tensor([list(prompt) + list(tokens)])                             # (1, P + L)
    read_at = torch.zeros_like(input_ids, dtype=torch.bool)
    read_at[0, len(prompt) - 1:-1] = True                                              # logits predicting tokens
    logits = model(input_ids, logits_at=read_at).float().cpu()                          # (L, V)
    row, token, _ = _children(trie, nodes)
    kth, _ = _rank_per_user(row, logits[row, token], len(tokens), config.beam_width)   # (L, <=B) best first
    beta = torch.where(kth > -math.inf, kth, math.inf).min(1).values                    # B-th or smallest valid
    return bool((logits[torch.arange(len(tokens)), torch.tensor(tokens)] < beta).any())


def violation_rate(violated, pruned):
    """Share of the pruned positives (indices) whose target violates the necessary condition (paper Fig. 4)."""
    return sum(bool(violated[i]) for i in pruned) / len(pruned) if pruned else 0.0

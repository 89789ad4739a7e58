"""Trie-constrained beam search (SPEC §4), the exact top-K search, and the paper's ranking metrics (SPEC §5).

Start with the oracle: `naive_beam_search` in tests/test_beam.py is this search for one prompt in twenty lines of
Python lists. The other oracle is transformers' constrained `generate`: the search follows Hugging Face's
`_beam_search` (transformers 5.x, early_stopping=False, one EOS token) step for step, in fp32 (logits upcast), so
scores agree with it to float rounding.

The search, for each user, step by step (paper §2.2; gen_len = tokens generated so far, EOS included):
  expand   every running beam by every trie-valid next token (at first the one beam is the empty prefix);
  score    each candidate: beam score + log p(token). log p is renormalised over the valid tokens when
           mask_before_softmax (as MSL and BEAR train), else the full-vocabulary log-softmax (stock generation);
  rank     the user's candidates, looking at the top 2B only: at most B of them end in EOS, so at least B do not
           whenever B non-EOS candidates exist;
  finish   an EOS candidate ranked within the first B completes an item, scored
           sum log p / gen_len ** length_penalty; the finished set keeps the B best;
  keep     the B best non-EOS candidates as the next beams;
  stop     when no beam is left, or B items are finished and the best beam, scored at its current length, cannot
           beat the worst of them (HF's rule; exact for length_penalty = 0, as scores only fall with more tokens);
  reorder  the KV cache to the kept beams and run their new tokens.

Where the work goes: each prompt is prefilled once and its keys/values stay one row that all of the user's beams
read (model.KVCache); only the valid (beam, token) pairs are scored, read off the trie's CSR arrays (the masked
log-softmax is a segmented logsumexp over them, never a (R, V) mask); users that stop leave the batch; a user with
fewer than B valid continuations runs fewer beams (HF pads with beams scored about -1e9, which never outrank a
real item); and with the mask before the softmax a *determined* beam (see `Beams`) leaves the model batch.

Shapes: U users in the batch (those still searching), B beam width (not model.py's batch), R beams of all users
(R_model of them in the model batch), C <= 2B candidates kept per user, M valid (row, token) pairs, V vocabulary,
P prompt length (left-padded), D tokens run on top of the prompt cache, N target tokens of all examples, L one
target's tokens.
"""
import heapq
import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

from data import collate_prompts
from loss import segment_logsumexp
from model import KVCache


@dataclass
class BeamConfig:
    beam_width: int = 10               # B: beams per user, and the number of items returned
    mask_before_softmax: bool = True   # renormalise over the trie-valid tokens (False: full-vocabulary log-probs)
    length_penalty: float = 0.0        # finished score = sum log p / gen_len ** length_penalty (HF's default is 1)
    batch_size: int = 16               # users per pass (each user holds B rows of the KV cache)


class Beams(NamedTuple):
    """The running hypotheses of all users in the batch, R in all, grouped by user (users in order, each user's
    beams best first).

    model_row is the beam's row in the step's logits and in the KV cache, or -1 for a *determined* beam, which
    is not in the model batch: with the mask before the softmax, a beam whose trie node has a single leaf below
    it has log p = log 1 = 0 exactly at every remaining step (the log-softmax over one valid logit v is
    v - (v + log 1) = 0 in floating point too), so its final score is known. It keeps its beam slot, its place
    in the ranking and the stopping rule, and its gen_len at EOS (results are identical for any length_penalty),
    but runs no forward and holds no cache row; its descendants are determined too."""
    user: torch.Tensor        # (R,) long: index of the beam's user among the users still searching
    node: torch.Tensor        # (R,) long: trie node reached by the beam's tokens
    score: torch.Tensor       # (R,) fp32: total log-prob of the beam's tokens
    model_row: torch.Tensor   # (R,) long: row in the step's logits and the KV cache; -1 = determined

    @classmethod
    def start(cls, num_users):
        """One empty beam per user at the trie root, in its prompt's row of the prefill."""
        return cls(torch.arange(num_users), torch.zeros(num_users, dtype=torch.long), torch.zeros(num_users),
                   torch.arange(num_users))


class Candidates(NamedTuple):
    """Each user's C <= 2B best one-token extensions of its beams, best first; all (U, C). Columns past a user's
    last candidate are padding: score -inf, both flags False."""
    score: torch.Tensor       # fp32 total log-prob: beam score + log p(token)
    parent: torch.Tensor      # long: the extended beam's index in Beams
    token: torch.Tensor       # long: the new token
    child: torch.Tensor       # long: trie node after the token (a leaf for EOS)
    is_eos: torch.Tensor      # bool: the token is EOS (the candidate ends an item)
    running: torch.Tensor     # bool: among the B best non-EOS candidates, i.e. a next beam


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


def _beam_search_batch(model, prompts, trie, eos_id, pad_id, config, prefilled=None):
    """The search of the module docstring for one batch of users; `prefilled` = _prefill's (cache, logits)."""
    width, penalty = config.beam_width, config.length_penalty
    determined = _determined_nodes(trie, config.mask_before_softmax)                   # (num_nodes,) bool
    cache, logits = prefilled or _prefill(model, prompts, pad_id)                       # logits (U, V) fp32
    beams = Beams.start(len(prompts))
    active = torch.arange(len(prompts))                                  # (U,) each searching user's prompt
    finished_score = torch.full((len(prompts), width), -math.inf)        # (U, B) best first, -inf = none yet
    finished_node = torch.full((len(prompts), width), -1, dtype=torch.long)   # (U, B) each one's leaf
    results = [[] for _ in prompts]
    gen_len = 0
    while True:
        gen_len += 1
        # Expand, score, rank: each user's best 2B one-token extensions of its beams, and which are kept.
        cand = _expand(trie, logits, beams, active.numel(), width, eos_id, config.mask_before_softmax)
        # Finish at EOS: an EOS candidate ranked within the first B completes an item (HF's top_num_beam_mask);
        # merge the new items into the finished set and keep the B best (concatenation order and topk as HF's).
        new_finished = cand.is_eos & (torch.arange(cand.score.shape[1]) < width)         # (U, C)
        new_score = torch.where(new_finished, cand.score / (gen_len ** penalty), -math.inf)
        finished_score, best = torch.topk(torch.cat([finished_score, new_score], 1), k=width, dim=1)   # (U, B)
        finished_node = torch.gather(torch.cat([finished_node, cand.child], 1), 1, best)
        # Stop (HF, early_stopping=False): no beam left, or B items finished and the best beam, scored at its
        # current length, cannot beat the worst of them.
        best_running = torch.where(cand.running, cand.score, -math.inf).max(1).values   # (U,)
        full = finished_score[:, -1] > -math.inf
        done = ~cand.running.any(1) | (full & ~(best_running / (gen_len ** penalty) > finished_score[:, -1]))
        for u in done.nonzero().flatten().tolist():
            results[int(active[u])] = [(trie.leaf_items[int(n)], float(s))
                                       for s, n in zip(finished_score[u].tolist(), finished_node[u].tolist())
                                       if s > -math.inf]
        if done.all():
            return results
        # Keep the top B, reorder the cache: the users that stopped leave the batch.
        beams, logits = _next_beams(model, cache, beams, cand, done, determined)
        active, finished_score, finished_node = active[~done], finished_score[~done], finished_node[~done]


def _expand(trie, logits, beams, num_users, width, eos_id, mask_before_softmax):
    """Expand every beam by every trie-valid token, score each candidate, rank each user's: Candidates (U, C).

    logits: fp32 (R_model, V), row beams.model_row of a beam predicting its next token."""
    row, token = trie.valid_next(beams.node)                                            # (M,) beam, token
    model_row = beams.model_row[row]                                                    # (M,) -1: determined
    live = model_row >= 0
    log_p = torch.zeros(row.numel())                                                    # (M,) fp32, 0 if determined
    log_p[live] = _token_log_probs(logits, model_row[live], token[live], mask_before_softmax)
    score, index = _top_per_user(beams.user[row], beams.score[row] + log_p, num_users, 2 * width)   # (U, C)
    parent, token = row[index], token[index]                                            # (U, C)
    real = score > -math.inf                                                            # False: padding
    is_eos = real & (token == eos_id)
    running = real & ~is_eos
    running &= torch.cumsum(running.long(), 1) <= width                                 # the B best non-EOS
    return Candidates(score, parent, token, trie.step(beams.node[parent], token), is_eos, running)


def _next_beams(model, cache, beams, cand, done, determined):
    """Keep the top B and reorder the cache: the running candidates of the users not `done` (U,) become the next
    Beams (the done users leave the batch); the cache follows them from `beams`, and their new tokens are run.
    Returns (Beams, fp32 logits (R_model, V)). determined: (num_nodes,) bool, _determined_nodes."""
    keep = cand.running & ~done[:, None]                                                # (U, C)
    user = (torch.cumsum(~done, 0) - 1).repeat_interleave(keep.sum(1))                # (R',) renumbered
    parent, token, child = cand.parent[keep], cand.token[keep], cand.child[keep]       # (R',) grouped by user
    run = ~determined[child]                                                            # (R',) still uncertain
    # An uncertain beam's parent was uncertain (a subtree's leaves include its children's), so it has a cache
    # row. The cache moves only the generated steps; each prompt stays one shared row (model.KVCache).
    cache.reorder(beams.model_row[parent[run]])                                         # beams AND batch shrink
    beams = Beams(user, child, cand.score[keep], torch.where(run, torch.cumsum(run.long(), 0) - 1, -1))
    if not bool(run.any()):
        return beams, torch.empty(0, 0)          # nothing left to score: no beam reads these logits
    return beams, model(token[run][:, None], cache=cache)[:, -1].float()                # (R_model, V)


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
    """The search of `_beam_search_batch` without finishing or stopping: each step records the threshold."""
    width = config.beam_width
    determined = _determined_nodes(trie, config.mask_before_softmax)   # log p = 0 exactly for any tau > 0
    cache, logits = _prefill(model, prompts, pad_id)
    beams = Beams.start(len(prompts))
    active = torch.arange(len(prompts))                                  # (U,) each searching example
    thresholds = [[] for _ in prompts]
    t = 0                                                                # the label position of this step
    while True:
        cand = _expand(trie, logits / tau, beams, active.numel(), width, eos_id, config.mask_before_softmax)
        # The candidates the positive competes with: for a non-EOS label the B best non-EOS ones (the next
        # beams), for the EOS label the first B of all (those that can finish). The threshold is the worst of
        # them, i.e. the B-th (the last if fewer): candidates are sorted best first.
        label_is_eos = torch.tensor([labels[int(u)][t] == eos_id for u in active])     # (U,)
        first_b = (cand.score > -math.inf) & (torch.arange(cand.score.shape[1]) < width)   # (U, C)
        competing = torch.where(label_is_eos[:, None], first_b, cand.running)           # (U, C)
        value = torch.where(competing, cand.score, math.inf).amin(1)                    # (U,)
        for u, (user, has_any) in enumerate(zip(active.tolist(), competing.any(1).tolist())):
            previous = thresholds[user][-1] if thresholds[user] else 0.0
            thresholds[user].append(float(value[u]) if has_any else previous)
        t += 1
        done = torch.tensor([len(labels[int(u)]) <= t for u in active]) | ~cand.running.any(1)
        for u in done.nonzero().flatten().tolist():    # died out early: repeat the last threshold to the end
            user = int(active[u])
            thresholds[user].extend([thresholds[user][-1]] * (len(labels[user]) - len(thresholds[user])))
        if done.all():
            return thresholds
        beams, logits = _next_beams(model, cache, beams, cand, done, determined)
        active = active[~done]


# ------------------------------------------------------------------------------------ search + teacher forcing
@torch.no_grad()
def search_and_teacher_force(model, prompts, targets, trie, eos_id, pad_id, config=BeamConfig(), progress=None):
    """The beam search of `beam_search` and, on the same prefill, the target read under teacher forcing.

    Returns (results, forced): results as `beam_search`; forced[i] = (ranks, valid, log_probs), lists over the
    target's tokens t of rank_t = how many valid next tokens score strictly above y_t (the necessary condition
    p_t >= beta_t holds iff rank_t < B; see _label_ranks), |V_t|, and log p_t as the search scores it
    (config.mask_before_softmax), so sum(log_probs) is the target's total log-prob log P(y|x). `progress(done)`
    is called after each batch."""
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
    logits = logits[order.to(logits.device)]                                            # (N, V)
    labels = torch.tensor([token for t in tokens for token in t])                       # (N,)
    row, token = trie.valid_next(torch.cat([trie.item_path(target) for target in targets]))   # (M,) valid pairs
    ranks = _label_ranks(logits, labels, row, token)                                    # (N,)
    valid = torch.bincount(row, minlength=len(labels))                                 # (N,) |V_t|
    log_p = _token_log_probs(logits, row, token, mask_before_softmax)                   # (M,)
    is_label = token == labels[row]                                                     # (M,) one per row
    label_log_p = torch.zeros(len(labels)).index_add_(0, row[is_label], log_p[is_label])   # (N,)
    forced, first = [], 0
    for t in tokens:
        span = slice(first, first + len(t))
        forced.append((ranks[span].tolist(), valid[span].tolist(), label_log_p[span].tolist()))
        first += len(t)
    return forced


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
        nodes = torch.tensor(nodes)                                                     # (R,)
        row, token = trie.valid_next(nodes)                                             # (M,)
        child_score = torch.tensor(scores)[row] + _token_log_probs(logits, row, token, mask_before_softmax)
        child = trie.step(nodes[row], token)                                            # (M,)
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
                    only = int(trie.child_ptr[node])                       # the node's one edge (CSR)
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
    """(eligible, pruned) example indices for PR@K (paper Fig. 6), PR@K = len(pruned) / len(eligible) (0 when
    none is eligible): eligible = the target is in the exact top-K by P(y|x) (its leaf among
    exact_results[i][:k]); pruned = eligible and not among the beam's returned leaves. The violation rate
    (paper Fig. 4) is the share of the pruned whose target `violates_necessary_condition`."""
    eligible = [i for i, t in enumerate(targets) if rank_of(t, exact_results[i][:k]) is not None]
    pruned = [i for i in eligible if rank_of(targets[i], beam_results[i]) is None]
    return eligible, pruned


@torch.no_grad()
def violates_necessary_condition(model, prompt, target, trie, config=BeamConfig()):
    """True if, teacher-forcing the target's tokens after the prompt, some step has p_t < beta_t, beta_t = the
    B-th largest probability among the trie-valid next tokens (the smallest when fewer than B are valid): some
    token ranks B or lower (_label_ranks). The same for both masking options."""
    tokens = trie.item_tokens[target]
    input_ids = torch.tensor([list(prompt) + list(tokens)])                             # (1, P + L)
    read_at = torch.zeros_like(input_ids, dtype=torch.bool)
    read_at[0, len(prompt) - 1:-1] = True                                              # logits predicting tokens
    logits = model(input_ids, logits_at=read_at).float()                                # (L, V)
    row, token = trie.valid_next(trie.item_path(target))                                # (M,) valid pairs
    return bool((_label_ranks(logits, torch.tensor(tokens), row, token) >= config.beam_width).any())


# ------------------------------------------------------------------------------------------------ primitives
def _token_log_probs(logits, row, token, mask_before_softmax):
    """log p(token | row) for the M valid (row, token) pairs, (M,) fp32 on the CPU; logits (R, V) fp32 on the
    model's device, where the work is done (the search's bookkeeping, like the trie, stays on the CPU).

    Before: log-softmax over the row's valid tokens only (a segmented logsumexp over the M pairs).
    After: the plain full-vocabulary log-softmax, read at the valid pairs."""
    row, token = row.to(logits.device), token.to(logits.device)
    valid_logit = logits[row, token]                                                    # (M,)
    if not mask_before_softmax:
        return (valid_logit - torch.logsumexp(logits, dim=-1)[row]).cpu()
    return (valid_logit - segment_logsumexp(valid_logit, row, logits.shape[0])[row]).cpu()


def _top_per_user(cand_user, cand_score, num_users, k):
    """Each user's k best candidates, best first: (score (U, k), candidate index (U, k)); -inf past the end
    (where the index is any valid one).

    Candidates arrive grouped by user (beams are grouped by user and valid_next keeps their order), so a dense
    (U, most candidates) grid is filled without sorting and torch.topk ranks every user at once."""
    count = torch.bincount(cand_user, minlength=num_users)                              # (U,)
    first = torch.cumsum(count, 0) - count                                              # (U,)
    position = torch.arange(cand_user.numel()) - first[cand_user]                      # (M,)
    width = max(int(count.max()), 1)
    grid = torch.full((num_users, width), -math.inf)                                    # (U, most candidates)
    grid[cand_user, position] = cand_score
    top_score, top_position = torch.topk(grid, k=min(k, width), dim=1)                  # (U, k)
    return top_score, (first[:, None] + top_position).clamp(max=max(cand_user.numel() - 1, 0))


def _label_ranks(logits, labels, row, token):
    """Teacher-forced rank of each label: how many valid next tokens score strictly above it, (N,) long.

    logits (N, V) predict labels (N,); (row, token) (M,) are each step's valid pairs, the label among them. The
    necessary condition p_t >= beta_t (beta_t the B-th largest valid probability, the smallest if fewer than B
    are valid) holds iff rank_t < B. Logits are compared: p_t / beta_t does not depend on the normaliser."""
    device = logits.device
    valid_logit = logits[row.to(device), token.to(device)].cpu()                       # (M,)
    label_logit = logits[torch.arange(len(labels), device=device), labels.to(device)].cpu()   # (N,)
    return torch.zeros(len(labels), dtype=torch.long).index_add_(0, row, (valid_logit > label_logit[row]).long())


def _prefill(model, prompts, pad_id):
    """Run the prompts once, left-padded so every prompt ends in the last column; returns (cache with one row
    per prompt, fp32 next-token logits (U, V))."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    input_ids, prompt_mask = collate_prompts(prompts, pad_id)                          # (U, P)
    cache = KVCache(model.config.num_hidden_layers)
    last = torch.zeros_like(prompt_mask, dtype=torch.bool)
    last[:, -1] = True                                                                  # only the lm_head we need
    logits = model(input_ids, attention_mask=prompt_mask, cache=cache, logits_at=last).float()   # (U, V)
    return cache, logits


def _determined_nodes(trie, mask_before_softmax):
    """(num_nodes,) bool: nodes after which every step has log p = 0 exactly (one leaf below, mask before)."""
    if not mask_before_softmax:   # full-vocabulary log-probs are not 0 on single-child nodes
        return torch.zeros(trie.num_nodes, dtype=torch.bool)
    return _leaf_counts(trie) == 1


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
    edge_parent = torch.repeat_interleave(torch.arange(trie.num_nodes), trie.child_ptr.diff())   # (E,) E edges
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

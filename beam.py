"""Trie-constrained beam search (SPEC §4), exact top-K search, and ranking metrics (SPEC §5).

The oracles: tests/test_beam.py's `naive_beam_search`, this search for one prompt in twenty lines
of Python lists, and transformers' constrained `generate`: the search follows Hugging Face's
`_beam_search` (transformers 5.x, early_stopping=False, one EOS token) step for step, in fp32, so
scores agree with it to float rounding.

Each step, for each user (paper §2.2; gen_len = tokens generated so far, EOS included):
  expand   every running beam by every trie-valid next token (at first the one empty beam);
  score    each candidate: beam score + log p(token), log p renormalised over the valid tokens
           when mask_before_softmax (as MSL and BEAR train), else the full-vocabulary log-softmax;
  rank     the top 2B candidates only: at most B of them end in EOS, so B others remain;
  finish   an EOS candidate ranked within the first B completes an item, scored
           sum log p / gen_len ** length_penalty; the finished set keeps the B best;
  keep     the B best non-EOS candidates as the next beams;
  stop     when no beam is left, or B items are finished and the best beam, scored at its
           current length, cannot beat the worst of them (HF's rule; exact for length_penalty 0);
  reorder  the KV cache to the kept beams and run their new tokens.
Each prompt is prefilled once, into one cache row that all its beams read (model.KVCache); only the
valid (beam, token) pairs are scored; users that stop leave the batch; a user with fewer than B
valid continuations runs fewer beams (HF pads with beams scored about -1e9, which never win).

Shapes: U users still searching, B beam width, R beams of all users (R_model in the model batch),
C <= 2B candidates per user, M valid (row, token) pairs, V vocabulary, P prompt length (left
padded), D tokens run on top of the prompt cache, N target tokens of all examples, L one target's.
"""
import heapq
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from data import collate_prompts
from loss import at_labels, masked_logits
from model import KVCache


@dataclass
class BeamConfig:
    beam_width: int = 10              # B: beams per user, and the number of items returned
    mask_before_softmax: bool = True  # renormalise over the valid tokens (False: full vocabulary)
    length_penalty: float = 0.0       # finished score = sum log p / gen_len ** length_penalty
    batch_size: int = 16              # users per pass (each user holds B rows of the KV cache)

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {self.beam_width!r}")


class Beams(NamedTuple):
    """The running hypotheses of all users in the batch, R in all, grouped by user (users in
    order, each user's beams best first).

    model_row = -1 marks a *determined* beam: with the mask before the softmax, a beam whose trie
    node has a single leaf below it has log p = 0 exactly at every remaining step (the log-softmax
    over one valid logit v is v - (v + log 1) = 0 in floating point too). It keeps its slot, rank
    and gen_len, so results are identical, but it and its descendants run no forward."""
    user: torch.Tensor       # (R,) long: index of the beam's user among the users still searching
    node: torch.Tensor       # (R,) long: trie node reached by the beam's tokens
    score: torch.Tensor      # (R,) fp32: total log-prob of the beam's tokens
    model_row: torch.Tensor  # (R,) long: row in the step's logits and KV cache; -1 = determined

    @classmethod
    def start(cls, num_users):
        """One empty beam per user at the trie root, in its prompt's row of the prefill."""
        return cls(torch.arange(num_users), torch.zeros(num_users, dtype=torch.long),
                   torch.zeros(num_users), torch.arange(num_users))


class Candidates(NamedTuple):
    """Each user's C <= 2B best one-token extensions of its beams, best first; all (U, C). Columns
    past a user's last candidate are padding: score -inf, both flags False."""
    score: torch.Tensor       # fp32 total log-prob: beam score + log p(token)
    parent: torch.Tensor      # long: the extended beam's index in Beams
    token: torch.Tensor       # long: the new token
    child: torch.Tensor       # long: trie node after the token (a leaf for EOS)
    is_eos: torch.Tensor      # bool: the token is EOS (the candidate ends an item)
    running: torch.Tensor     # bool: among the B best non-EOS candidates, i.e. a next beam


# ------------------------------------------------------------------------------------ beam search
@torch.no_grad()
def beam_search(model, prompts, trie, eos_id, pad_id, config=BeamConfig(), progress=None):
    """prompts: list of token-id lists (each user's full prompt). Returns, per user, up to B
    distinct leaves as (frozenset of item ids sharing that title, score), best first; score = total
    log-prob / gen_len ** length_penalty. Fewer than B when fewer items are reachable.
    `progress(done)`, if given, is called after each batch of users."""
    return _by_batch(config.batch_size, progress, prompts, run_batch=lambda batch: (
        _beam_search_batch(model, batch, trie, eos_id, pad_id, config)))


def _beam_search_batch(model, prompts, trie, eos_id, pad_id, config, prefilled=None):
    """The module docstring's search for one batch; `prefilled` = prefill's (cache, logits)."""
    width, penalty = config.beam_width, config.length_penalty
    # One leaf below and the mask before the softmax: log p = 0 at every later step (see Beams).
    determined = (trie.leaf_count == 1) & config.mask_before_softmax            # (num_nodes,)
    cache, logits = prefilled or prefill(model, prompts, pad_id)               # logits (U, V)
    beams = Beams.start(len(prompts))
    active = torch.arange(len(prompts))                                         # (U,) prompts
    finished_score = torch.full((len(prompts), width), -math.inf)  # (U, B) best first, -inf: none
    finished_node = torch.full((len(prompts), width), -1, dtype=torch.long)  # (U, B) their leaves
    results = [[] for _ in prompts]
    gen_len = 0
    while True:
        gen_len += 1
        cand = _expand(trie, logits, beams, active.numel(), width, eos_id,
                       config.mask_before_softmax)
        # Finish (HF's top_num_beam_mask; concatenation order and topk as HF's).
        new_finished = cand.is_eos & (torch.arange(cand.score.shape[1]) < width)  # (U, C)
        new_score = torch.where(new_finished, cand.score / (gen_len ** penalty), -math.inf)
        finished_score, best = torch.topk(torch.cat([finished_score, new_score], 1), k=width, dim=1)
        finished_node = torch.gather(torch.cat([finished_node, cand.child], 1), 1, best)
        # Stop (HF, early_stopping=False).
        best_running = torch.where(cand.running, cand.score, -math.inf).max(1).values  # (U,)
        full = finished_score[:, -1] > -math.inf
        beaten = ~(best_running / (gen_len ** penalty) > finished_score[:, -1])
        done = ~cand.running.any(1) | (full & beaten)                           # (U,)
        for u in done.nonzero().flatten().tolist():
            found = zip(finished_score[u].tolist(), finished_node[u].tolist())
            results[int(active[u])] = [(trie.leaf_items[n], s) for s, n in found if s > -math.inf]
        if done.all():
            return results
        # Keep and reorder: the users that stopped leave the batch.
        beams, logits = _next_beams(model, cache, beams, cand, done, determined)
        active, finished_score, finished_node = (
            active[~done], finished_score[~done], finished_node[~done])


def _expand(trie, logits, beams, num_users, width, eos_id, mask_before_softmax):
    """Expand, score and rank: Candidates (U, C). logits: fp32 (R_model, V), row beams.model_row of
    a beam predicting its next token."""
    row, token = trie.valid_next(beams.node)                                    # (M,) beam, token
    model_row = beams.model_row[row]                                            # (M,) -1 determined
    live = model_row >= 0
    log_p = torch.zeros(row.numel())                                            # (M,) 0: determined
    log_p[live] = _token_log_probs(logits, model_row[live], token[live], mask_before_softmax)
    cand_score = beams.score[row] + log_p                                       # (M,)
    score, index = _top_per_user(beams.user[row], cand_score, num_users, 2 * width)  # (U, C)
    parent, token = row[index], token[index]                                    # (U, C)
    real = score > -math.inf                                                    # False: padding
    is_eos = real & (token == eos_id)
    running = real & ~is_eos
    running &= torch.cumsum(running.long(), 1) <= width                         # the B best non-EOS
    return Candidates(score, parent, token, trie.step(beams.node[parent], token), is_eos, running)


def _next_beams(model, cache, beams, cand, done, determined):
    """The running candidates of the users not `done` (U,) become the next Beams; the cache follows
    them and their new tokens are run. Returns (Beams, fp32 logits (R_model, V))."""
    keep = cand.running & ~done[:, None]                                        # (U, C)
    user = (torch.cumsum(~done, 0) - 1).repeat_interleave(keep.sum(1))          # (R',) renumbered
    parent, token, child = cand.parent[keep], cand.token[keep], cand.child[keep]  # (R',) by user
    run = ~determined[child]                                                    # (R',) uncertain
    # An uncertain beam's parent was uncertain (its subtree holds the child's), so it has a cache
    # row. The cache moves only the generated steps; each prompt stays one shared row.
    cache.reorder(beams.model_row[parent[run]])
    model_row = torch.where(run, torch.cumsum(run.long(), 0) - 1, -1)           # (R',)
    beams = Beams(user, child, cand.score[keep], model_row)
    if not bool(run.any()):
        return beams, torch.empty(0, 0)  # nothing left to score: no beam reads these logits
    return beams, model(token[run][:, None], cache=cache)[:, -1].float()        # (R_model, V)


# ---------------------------------------------------------------------------------------- Obj 3.1
@torch.no_grad()
def prefix_thresholds(model, prompts, targets, trie, eos_id, pad_id, config=BeamConfig(), tau=1.0):
    """Thresholds of objective 3.1 (SPEC §3), (N,) fp32, one per label position of the training
    batch (example by example, token by token of trie.item_tokens[target]).

    Each example's beam search is simulated under the current parameters; at step t the threshold
    is the total log-prob log P(c_<=t | x) of the B-th best candidate y_<=t competes with: the
    B-th best non-EOS candidate (only those run on), or for an EOS label the B-th best of all (an
    EOS finishes only within the first B); fewer than B: the smallest. The search runs to the end
    of each positive, ignoring the early stop; if it dies out, the last threshold repeats. Scores
    as loss.obj31's log P(y_<=t): mask_before_softmax as configured, logits / tau."""
    labels = [trie.item_tokens[t] for t in targets]
    thresholds = _by_batch(config.batch_size, None, prompts, labels, run_batch=lambda batch, y: (
        _thresholds_batch(model, batch, y, trie, eos_id, pad_id, config, tau)))
    return torch.tensor([value for example in thresholds for value in example], dtype=torch.float32)


def _thresholds_batch(model, prompts, labels, trie, eos_id, pad_id, config, tau):
    """`_beam_search_batch` without finishing or stopping, recording the thresholds."""
    width = config.beam_width
    determined = (trie.leaf_count == 1) & config.mask_before_softmax  # log p = 0 for any tau
    cache, logits = prefill(model, prompts, pad_id)
    beams = Beams.start(len(prompts))
    active = torch.arange(len(prompts))                                         # (U,) each example
    thresholds = [[] for _ in prompts]
    t = 0  # this step's label position
    while True:
        cand = _expand(trie, logits / tau, beams, active.numel(), width, eos_id,
                       config.mask_before_softmax)
        # The competitors: the next beams for a non-EOS label, the first B of all for EOS. The
        # threshold is the worst of them (candidates are sorted best first).
        label_is_eos = torch.tensor([labels[int(u)][t] == eos_id for u in active])  # (U,)
        first_b = (cand.score > -math.inf) & (torch.arange(cand.score.shape[1]) < width)  # (U, C)
        competing = torch.where(label_is_eos[:, None], first_b, cand.running)   # (U, C)
        value = torch.where(competing, cand.score, math.inf).amin(1)            # (U,)
        for u, (user, has_any) in enumerate(zip(active.tolist(), competing.any(1).tolist())):
            previous = thresholds[user][-1] if thresholds[user] else 0.0
            thresholds[user].append(float(value[u]) if has_any else previous)
        t += 1
        done = torch.tensor([len(labels[int(u)]) <= t for u in active]) | ~cand.running.any(1)
        for u in done.nonzero().flatten().tolist():  # died out early: repeat the last to the end
            user = int(active[u])
            missing = len(labels[user]) - len(thresholds[user])
            thresholds[user].extend([thresholds[user][-1]] * missing)
        if done.all():
            return thresholds
        beams, logits = _next_beams(model, cache, beams, cand, done, determined)
        active = active[~done]


# ---------------------------------------------------------------------- search + teacher forcing
@torch.no_grad()
def search_and_teacher_force(model, prompts, targets, trie, eos_id, pad_id, config=BeamConfig(),
                             progress=None):
    """`beam_search` and, on the same prefill, each target read under teacher forcing.

    Returns (results, forced): results as `beam_search`; forced[i] = (ranks, valid, log_probs),
    lists over the target's tokens t of rank_t (`_label_ranks`; the necessary condition p_t >=
    beta_t holds iff rank_t < B), |V_t|, and log p_t as the search scores it (sum: log P(y|x))."""
    def run_batch(batch, batch_targets):
        cache, logits = prefill(model, batch, pad_id)
        forced = _teacher_force(model, cache, logits, batch_targets, trie, pad_id,
                                config.mask_before_softmax)
        return zip(_beam_search_batch(model, batch, trie, eos_id, pad_id, config,
                                      prefilled=(cache, logits)), forced)

    both = _by_batch(config.batch_size, progress, prompts, targets, run_batch=run_batch)
    return [result for result, _ in both], [forced for _, forced in both]


def _teacher_force(model, cache, first_logits, targets, trie, pad_id, mask_before_softmax):
    """Run each target's tokens on its prompt's cached prefill (`cache` itself stays as it is)."""
    logits, labels, lengths = teacher_forced_logits(model, cache, first_logits,
                                                    range(len(targets)), targets, trie, pad_id)
    row, token = trie.valid_next(torch.cat([trie.item_path(target) for target in targets]))  # (M,)
    ranks = _label_ranks(logits, labels, row, token)                            # (N,)
    valid = torch.bincount(row, minlength=len(labels))                          # (N,) |V_t|
    log_p = _token_log_probs(logits, row, token, mask_before_softmax)           # (M,)
    label_log_p = at_labels(log_p, row, token, labels)                          # (N,)
    per_example = zip(*(x.split(lengths.tolist()) for x in (ranks, valid, label_log_p)))
    return [tuple(x.tolist() for x in example) for example in per_example]


def title_logits(model, prompts, items, trie, pad_id):
    """The logits (N, V) predicting every token of each prompt's titles, items (U, K) the item ids
    of prompt u's K titles; their labels (N,) and each position's title (N,), u * K + j. Each prompt
    runs once and its K titles on its cached keys and values, not as K full sequences; with gradient
    where the model has one (S-DPO trains through it)."""
    cache, first_logits = prefill(model, prompts, pad_id)                        # (U, V)
    users = torch.arange(len(prompts)).repeat_interleave(items.shape[1])        # (U K,)
    logits, labels, lengths = teacher_forced_logits(model, cache, first_logits, users,
                                                    items.reshape(-1).tolist(), trie, pad_id)
    title_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)     # (N,)
    return logits, labels.to(logits.device), title_of.to(logits.device)


def teacher_forced_logits(model, cache, first_logits, users, targets, trie, pad_id):
    """The logits (N, V) fp32 predicting every token of every target item, target i read on the
    cached prefill of prompt users[i] (first_logits (U, V): the prefill's last position), target
    after target in order; their labels (N,) and each target's token count (len(targets),). With
    gradient where the model has one."""
    tokens = [list(trie.item_tokens[target]) for target in targets]
    users = torch.as_tensor(list(users), dtype=torch.long)                      # (R,)
    lengths = torch.tensor([len(t) for t in tokens])                            # (R,)
    logits = first_logits                                                       # (U, V) token 0
    if int(lengths.max()) > 1:
        fed = [t[:-1] for t in tokens]
        later = _run_on_prompts(model, cache, users, fed, pad_id, every_token=True)
        logits = torch.cat([first_logits, later.to(first_logits.device)])       # (U + N - R, V)
    # Token 0 of target i is predicted at row users[i]; token j > 0 at U + (i's offset) + j - 1.
    offset = len(first_logits) + torch.cumsum(lengths - 1, 0) - (lengths - 1)   # (R,)
    order = torch.cat([torch.tensor([int(users[i])] + [int(offset[i]) + j - 1
                                                       for j in range(1, len(t))])
                       for i, t in enumerate(tokens)])                          # (N,)
    labels = torch.tensor([token for t in tokens for token in t])               # (N,)
    return logits[order.to(logits.device)], labels, lengths


# ------------------------------------------------------------------------------------ exact top-K
@torch.no_grad()
def exact_topk(model, prompts, trie, k, eos_id, pad_id, config=BeamConfig(), expand_width=16,
               progress=None):
    """The k items of largest total log-prob log P(y|x) per prompt, exactly (SPEC §5, for PR@K),
    best first, as (frozenset of item ids, total log-prob), scored like the beam search.

    Best-first search over the trie keyed by prefix log-prob: admissible, since extending a prefix
    can only lower it, so once k items are found and no open prefix beats the k-th, nothing better
    is left. Each round expands up to `expand_width` best prefixes per user in one batched forward
    on the prompt's KV cache. With the mask before the softmax a prefix with a single valid next
    token passes its score on unchanged (p = 1), so such chains cost no forward."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return _by_batch(config.batch_size, progress, prompts, run_batch=lambda batch: (
        _exact_topk_batch(model, batch, trie, k, eos_id, pad_id, config.mask_before_softmax,
                          expand_width)))


def _exact_topk_batch(model, prompts, trie, k, eos_id, pad_id, mask_before_softmax, expand_width):
    prompt_cache, logits = prefill(model, prompts, pad_id)
    num_users = len(prompts)
    frontier = [[] for _ in prompts]  # max-heaps by log P of (-log P, serial, node, prefix tokens)
    found = [[] for _ in prompts]     # min-heaps of the k best finished (log P, serial, leaf node)
    serial = 0
    num_children = trie.child_ptr.diff()                                        # (num_nodes,)

    def push(user, score, token, child, prefix):
        nonlocal serial
        serial += 1
        if token == eos_id:
            entry = (score, serial, child)
            (heapq.heappush if len(found[user]) < k else heapq.heappushpop)(found[user], entry)
        else:
            heapq.heappush(frontier[user], (-score, serial, child, prefix + (token,)))

    def expand(users, nodes, scores, prefixes, logits):
        nodes = torch.tensor(nodes)                                             # (R,)
        row, token = trie.valid_next(nodes)                                     # (M,)
        log_p = _token_log_probs(logits, row, token, mask_before_softmax)       # (M,)
        score = torch.tensor(scores)[row] + log_p                               # (M,)
        child = trie.step(nodes[row], token)                                    # (M,)
        for r, s, tok, node in zip(row.tolist(), score.tolist(), token.tolist(), child.tolist()):
            push(users[r], s, tok, node, prefixes[r])

    def worth_expanding(user):  # could the best open prefix still beat the k-th item found?
        return frontier[user] and (len(found[user]) < k
                                   or -frontier[user][0][0] > found[user][0][0])

    expand(list(range(num_users)), [trie.root] * num_users, [0.0] * num_users, [()] * num_users,
           logits)
    while True:
        users, nodes, scores, prefixes = [], [], [], []
        for user in range(num_users):
            taken = 0
            while taken < expand_width and worth_expanding(user):
                negative_score, _, node, prefix = heapq.heappop(frontier[user])
                if mask_before_softmax and int(num_children[node]) == 1:        # p = 1: no forward
                    only = int(trie.child_ptr[node])                            # the one edge (CSR)
                    push(user, -negative_score, int(trie.child_token[only]),
                         int(trie.child_node[only]), prefix)
                    continue
                users.append(user), nodes.append(node), scores.append(-negative_score)
                prefixes.append(prefix)
                taken += 1
        if not users:
            break
        logits = _run_on_prompts(model, prompt_cache, users, prefixes, pad_id, every_token=False)
        expand(users, nodes, scores, prefixes, logits)
    return [[(trie.leaf_items[node], score) for score, _, node in sorted(heap, reverse=True)]
            for heap in found]


# ---------------------------------------------------------------------------------------- metrics
def rank_of(target, results):
    """0-based position of the first returned leaf whose item set holds `target`, else None."""
    for rank, (items, _) in enumerate(results):
        if target in items:
            return rank
    return None


def hit_at(ranks, k):
    """HR@K = mean over examples of [rank < K] (ranks from rank_of, None = not returned)."""
    return sum(r is not None and r < k for r in ranks) / len(ranks) if ranks else 0.0


def ndcg_at(ranks, k):
    """NDCG@K with one relevant item: mean of [rank < K] / log2(rank + 2)."""
    if not ranks:
        return 0.0
    return sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks)


def pruned_positives(targets, beam_results, exact_results, k):
    """(eligible, pruned) example indices for PR@K = len(pruned) / len(eligible) (paper Fig. 6; 0
    when none is eligible): eligible = the target is in the exact top-K by P(y|x)
    (exact_results[i][:k]); pruned = eligible and not among the beam's leaves. The violation rate
    (paper Fig. 4) is the share of the pruned with some rank_t >= B (`search_and_teacher_force`)."""
    eligible = [i for i, t in enumerate(targets) if rank_of(t, exact_results[i][:k]) is not None]
    pruned = [i for i in eligible if rank_of(targets[i], beam_results[i]) is None]
    return eligible, pruned


# ------------------------------------------------------------------------------------- primitives
def _by_batch(batch_size, progress, *per_user, run_batch):
    """run_batch on `batch_size` users' slices of the per-user lists at a time, the results joined;
    `progress(done)`, if given, is called after each batch."""
    results = []
    for start in range(0, len(per_user[0]), batch_size):
        results.extend(run_batch(*(items[start:start + batch_size] for items in per_user)))
        if progress is not None:
            progress(len(results))
    return results


def _token_log_probs(logits, row, token, mask_before_softmax):
    """log p(token | row) for the M valid (row, token) pairs, (M,) fp32 on the CPU: the log-softmax
    over the row's valid tokens (as MSL trains) or over the vocabulary. logits (R, V) fp32 on the
    model's device, where the work is done (the bookkeeping, like the trie, stays on the CPU)."""
    row, token = row.to(logits.device), token.to(logits.device)
    if mask_before_softmax:
        valid_logit, lse = masked_logits(logits, row, token)                    # (M,), (R,)
    else:
        valid_logit, lse = logits[row, token], torch.logsumexp(logits, dim=-1)  # (M,), (R,)
    return (valid_logit - lse[row]).cpu()


def _top_per_user(cand_user, cand_score, num_users, k):
    """Each user's k best candidates, best first: (score (U, k), candidate index (U, k)); -inf past
    the end (where the index is any valid one). Candidates arrive grouped by user (valid_next keeps
    the beams' order), so a dense (U, most candidates) grid is filled without sorting."""
    count = torch.bincount(cand_user, minlength=num_users)                      # (U,)
    first = torch.cumsum(count, 0) - count                                      # (U,)
    position = torch.arange(cand_user.numel()) - first[cand_user]               # (M,)
    width = max(int(count.max()), 1)
    grid = torch.full((num_users, width), -math.inf)                            # (U, width)
    grid[cand_user, position] = cand_score
    top_score, top_position = torch.topk(grid, k=min(k, width), dim=1)          # (U, k)
    return top_score, (first[:, None] + top_position).clamp(max=max(cand_user.numel() - 1, 0))


def _label_ranks(logits, labels, row, token):
    """Teacher-forced rank of each label: how many valid next tokens score strictly above it, (N,)
    long. logits (N, V) predict labels (N,); (row, token) (M,) are each step's valid pairs, the
    label among them. The necessary condition p_t >= beta_t holds iff rank_t < B. Logits are
    compared, as p_t / beta_t does not depend on the normaliser."""
    device = logits.device
    valid_logit = logits[row.to(device), token.to(device)].cpu()                # (M,)
    label_logit = logits[torch.arange(len(labels), device=device), labels.to(device)].cpu()  # (N,)
    above = (valid_logit > label_logit[row]).long()                             # (M,)
    return torch.zeros(len(labels), dtype=torch.long).index_add_(0, row, above)


def prefill(model, prompts, pad_id):
    """Run the prompts once, left-padded so every prompt ends in the last column; returns (cache
    with one row per prompt, fp32 next-token logits (U, V))."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    input_ids, prompt_mask = collate_prompts(prompts, pad_id)                   # (U, P)
    cache = KVCache(model.config.num_hidden_layers)
    last = torch.zeros_like(prompt_mask, dtype=torch.bool)
    last[:, -1] = True                                                          # one lm_head row
    logits = model(input_ids, attention_mask=prompt_mask, cache=cache, logits_at=last).float()
    return cache, logits                                                        # logits (U, V)


def _run_on_prompts(model, prompt_cache, users, sequences, pad_id, every_token):
    """Run token sequences, right-padded, on top of their users' rows of the prompt cache (a
    `select`ed copy); right padding is harmless under causal attention. Returns fp32 logits at
    every real token, (sum of lengths, V), or at each sequence's last token, (R, V)."""
    lengths = torch.tensor([len(s) for s in sequences])                         # (R,)
    depth = int(lengths.max())
    input_ids = torch.full((len(sequences), depth), pad_id, dtype=torch.long)   # (R, D)
    for r, sequence in enumerate(sequences):
        input_ids[r, :len(sequence)] = torch.tensor(sequence)
    fed = torch.arange(depth)[None, :] < lengths[:, None]                       # (R, D) bool
    read_at = fed if every_token else torch.arange(depth)[None, :] == (lengths - 1)[:, None]
    cache = prompt_cache.select(torch.as_tensor(list(users)))                   # shares the prompts
    attention_mask = torch.cat([cache.cached_mask().cpu(), fed.long()], dim=1)  # (R, P + D)
    return model(input_ids, attention_mask=attention_mask, cache=cache, logits_at=read_at).float()

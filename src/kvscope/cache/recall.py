"""The recall tier of a `BudgetedCache` (`recall="cpu"`): what a bounded prefill evicts waits in CPU memory, and once
the prompt's last chunk arrives the best tokens come back.

Why: chunked prefill keeps GPU memory at budget + one chunk whatever the prompt length, but the policy must evict
before it has seen the end of the prompt, where the question usually is. With the tier, an eviction during prefill
moves the evicted tokens (in the store's own format: fp8/int8 stay small; int4 waits as int8, its keys being quantized
per 64-slot group) with their positions and scores to CPU memory (pinned on CUDA) instead of dropping them. When the
last prefill chunk reaches a layer, before that chunk attends: the chunk's queries attend to every older token,
resident or waiting (the waiting ones stream through the GPU a span at a time), and to the chunk up to themselves,
and keep that output (the whole prompt's, as a one-chunk prefill gives it); the policy scores the older tokens with
the attention of the chunk's last queries (the question: the policy's observation window, or `RECALL_WINDOW` rows for
a policy that observes every query) as it scores an observation; the best `budget` are the ones resident while the
chunk is written (and observed, by a policy that observes every query). A policy that observes a window (snapkv,
tova) also chooses there, among the whole prompt (the chunk's tokens too), the `budget` that stay once the chunk has
attended (`decided`). The tokens not kept are dropped and the tier is freed. KV on the GPU never exceeds budget +
one chunk, plus what is in flight: one span of waiting tokens during the recall (what a span holds on the device is
at most SPAN_BYTES), and while the chunks are recorded, the staging of one group of evictions on its way to the host
(kvscope.cache.tier.GROUP_BYTES and one layer's more).

Only kvscope's runtime (`kvscope.runtime.generate`) says which forward is a prompt's last; `model.generate()` prefills
in one forward and never recalls. The host side (the tier, and the moves into it, several layers' at once on a side
CUDA stream that overlaps the next layers' compute) is kvscope.cache.tier.
"""

from __future__ import annotations

import torch

from kvscope.cache import fused
from kvscope.cache.arena import TORCH_TYPES
from kvscope.cache.attention import chunk_visible, grouped_mask, grouped_queries
from kvscope.cache.tier import META_NAMES, Tier
from kvscope.errors import usage
from kvscope.kvformats import RECALL_META
from kvscope.policies.base import KEEP, Observation, SlotState, select_evictions

RECALL_WINDOW = 32  # question rows that score the recall, for a policy that observes every query (h2o, lru)
MODES = ("cpu",)
# device bytes one span of resident or waiting tokens holds while the last forward's rows attend it (`_span`), with what
# the recall holds across spans (`held`: every row's fp32 output, log-sum-exp and scaled queries): one 512-token chunk
# of Llama-3-8B's KV (all layers). The recall runs between two chunks: on the H200 at 32k (the 8B shape, batch 1) the
# prefill's peak was 288 KiB above the one without the tier. `held` grows with batch x chunk (32 MiB for the output
# at batch 1 and 512-token chunks with the 8B shape); past 3/4 of SPAN_BYTES a span still takes a quarter of it, so
# the recall then holds `held` + SPAN_BYTES / 4 (spans of a token or two otherwise: thousands of launches a layer)
SPAN_BYTES = 64 * 1024**2


def check_recall(policy, offload: bool, recall: str | None) -> None:
    """The usage errors of an impossible `recall`."""
    if recall is None:
        return
    if recall not in MODES:
        raise usage(f"unknown recall tier {recall!r}", expected="cpu, or none", fix="recall (--recall)")
    if not policy.query_rows():
        raise usage(f"policy {policy.name!r} reads no attention, so it cannot tell which waiting token the question "
                    "needs: a recall has nothing to score with", expected="snapkv, lru, h2o or tova",
                    fix="policy (--policy), or drop recall (--recall)")
    if offload:
        raise usage("recall keeps evicted tokens in CPU memory, and with offload every layer lives there already",
                    expected="one of offload and recall", fix="offload or recall (--recall)")


def window(policy) -> int:
    rows = policy.query_rows()
    return RECALL_WINDOW if rows < 0 else rows


def recall(layer, tier: Tier, query: torch.Tensor, positions: torch.Tensor, scaling: float, chunk
           ) -> tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Before the last prefill chunk attends: score resident and waiting tokens with that chunk's last queries (the
    question: the last W of `query` [B, Hq, n, D], at true `positions` [B, W]), keep the best `budget` resident
    (bringing back the waiting ones among them), drop the rest. `chunk`: the chunk's own keys and values
    [B, H, n, D], which of its tokens are real [B, n] and their positions [B, n]. Returns (how many came back, in the
    row that took the most; the chunk's attention output [B, Hq, n, D] over the whole prompt: resident, waiting and
    the chunk up to each row; for a policy that observes a window, what stays once the chunk has attended (`decided`),
    else None).

    A window policy (snapkv, tova) also chooses, among every token of the prompt (the chunk's too, with the same
    weights), the `budget` that stay after the chunk, as it chooses after a one-chunk prefill; the best `budget` old
    tokens are resident meanwhile (a forward in pieces: after each piece, the choice and the best of the rest up to the
    budget). Without that, the chunk's own eviction re-scored the old tokens against the
    chunk alone and undid the recall: on the embedded model at 2k and 12.5% (L2048-d05-r2) snapkv recalled every
    digit of the key at layers 21-27 and the chunk's eviction dropped half of them; given the one-chunk prefill's
    choice on the same KV it answered right."""
    tier.wait()
    st, settings = layer.state, layer.settings
    device, capacity, budget = st.valid.device, layer.capacity, settings.budget_tokens
    policy = settings.policy
    whole = policy.query_rows() > 0  # a window policy: the choice of what stays is the whole prompt's
    weights, waiting, out = _question(layer, tier, query, positions.shape[1], scaling, chunk, whole)  # [B, H, W, ..]
    parts = [(st.valid, st.position, st.score), (waiting["valid"], waiting["position"], waiting["score"])]
    newest = st.newest.clone()
    if whole:
        real, at = chunk[2:]
        rows = (*st.valid.shape[:2], real.shape[-1])
        parts.append((real[:, None].expand(rows), at[:, None].expand(rows), torch.zeros(rows, device=device)))
        torch.maximum(newest, torch.where(real, at, -1).amax(-1)[:, None, None], out=newest)
    both = SlotState(*(torch.cat(fields, -1) for fields in zip(*parts)), newest=newest)
    policy.observe(both, Observation(weights, positions, rows=positions.shape[1], first=True))
    del weights
    scores = policy.keep_scores(both, budget)
    end = capacity + tier.used
    old = SlotState(both.valid[:, :, :end], both.position[:, :, :end], both.score[:, :, :end], newest)
    kept = old.valid & ~select_evictions(scores[:, :, :end], old, budget)  # the best `budget` old tokens
    stay = (both.valid & ~select_evictions(scores, both, budget)) if whole else None  # the whole prompt's choice
    st.valid &= kept[:, :, :capacity]  # resident tokens not kept leave
    st.score.copy_(both.score[:, :, :capacity])
    back = kept[:, :, capacity:]  # [B, H, T]: waiting tokens kept come back into free slots
    coming = back.sum(-1, keepdim=True)  # [B, H, 1]
    count = int(coming.max())
    order = torch.argsort((~back).to(torch.int8), dim=-1, stable=True)[:, :, :count]
    # each row's i-th token comes back into its i-th free slot; a row that brings back fewer than `count` writes the
    # rest (not valid) into one spare free slot: a row has room + what it brings back free at least, not `count`
    # (the i-th free slot for every i < count would write over kept tokens)
    upto = torch.arange(count, device=device).expand(*coming.shape[:2], count)
    free = torch.argsort(st.valid.to(torch.int8), dim=-1, stable=True).gather(-1, torch.minimum(upto, coming))
    resident = None if stay is None else stay[:, :, :capacity] & st.valid  # per slot: stays after the chunk
    step = max(1, layer.room)
    for start in range(0, count, step):
        part, slots = order[:, :, start:start + step], free[:, :, start:start + step]
        kb, vb = tier.keys_values(part.cpu(), device)
        layer.store.write(slots, kb.to(query.dtype), vb.to(query.dtype))
        st.position.scatter_(-1, slots, old.position[:, :, capacity:].gather(-1, part))
        st.score.scatter_(-1, slots, old.score[:, :, capacity:].gather(-1, part))
        st.valid.scatter_(-1, slots, back.gather(-1, part))
        if resident is not None:
            resident.scatter_(-1, slots, (back & stay[:, :, capacity:end]).gather(-1, part))
    if stay is None:
        return count, out, None
    # copies, not views: held while the chunk attends (the prefill's peak), a view would hold all of `both`
    return count, out, (resident, stay[:, :, end:].clone(), both.score[:, :, end:].clone())


def decided(layer, slots: torch.Tensor, real: torch.Tensor, choice) -> torch.Tensor:
    """After a window policy's recall, the eviction of a piece of the last forward just written to `slots` [B, H, n]
    (real [B, n]); `choice`: per slot, whether a token stays [B, H, S] (updated here); whether each of the piece's
    tokens stays, and its score, [B, H, n] each; whether the piece is the forward's last. After the last piece what
    stays is the recall's whole-prompt choice; after an earlier one, that choice and the best of the others up to the
    budget (the next piece attends them). Returns the slots that leave (bool [B, H, S])."""
    st, budget = layer.state, layer.settings.budget_tokens
    resident, keep, score, last = choice
    st.score.scatter_(-1, slots, score)
    resident.scatter_(-1, slots, keep & real[:, None].expand_as(keep))
    if last:
        return st.valid & ~resident
    scores = layer.settings.policy.keep_scores(st, budget).masked_fill(resident, KEEP)
    return select_evictions(scores, st, budget)


def _key_chunks(layer, tier: Tier, dtype: torch.dtype, span: int, values: bool = False):
    """(keys [B, H, n, D], values or None, valid [B, H, n], the first record's fields or None) of the resident slots,
    then of the waiting tokens, `span` at a time (their values only if `values`: the scoring pass reads keys alone)."""
    device = layer.state.valid.device
    k, v = layer.read(layer.capacity, dtype)
    for start in range(0, layer.capacity, span):  # the caller's logits of a span are what bounds its memory
        at = slice(start, start + span)
        yield k[:, :, at], v[:, :, at] if values else None, layer.state.valid[:, :, at], None
    del k, v  # a read that copies (a store in another dtype) is a layer's store: not held through the spans
    for start in range(0, tier.used, span):  # one span on the device at a time: its caller drops what it was given
        at = slice(start, min(tier.used, start + span))
        fields = tier.fields(at, device) if values else tier.first_record(at, device)
        yield *(tier.read(fields) if values else (tier.keys(fields, dtype), None)), fields["valid"], fields
        del fields


def _own_chunks(chunk, groups: int, span: int):
    """The last forward's own keys and values [B, H, s, D], `span` at a time, with which of them each of its rows
    sees [B, 1, g*n, s] (causal; a padding token only by its own row)."""
    keys, values, real = chunk[:3]
    n = keys.shape[2]
    for start in range(0, n, span):
        at = slice(start, start + span)
        visible = grouped_mask(chunk_visible(real, 0, n)[:, None, :, at], groups)
        yield keys[:, :, at], values[:, :, at], visible


def _add_span(out: torch.Tensor, lse: torch.Tensor, logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Adds one span's share to a running softmax output (flash attention's rescaling): `out` [B, H, r, D] and the
    log-sum-exp so far `lse` [B, H, r, 1] (-inf where a row has seen nothing yet); `logits` [B, H, r, s] (-inf where
    masked; overwritten) and `values` [B, H, s, D]. Returns the new log-sum-exp. In place: no temporary of the
    logits' size (torch.logsumexp would make one)."""
    b, h, r, s = logits.shape
    top = logits.amax(-1, keepdim=True)
    top.masked_fill_(top == float("-inf"), 0.0)  # a row that sees nothing here: its exps are 0, not nan
    logits.sub_(top).exp_()
    grown = torch.logaddexp(lse, logits.sum(-1, keepdim=True).log_().add_(top))
    # a row that has seen nothing at all yet (grown -inf) gets nan and inf factors here: 0, its out stays 0
    out.mul_((lse - grown).exp_().nan_to_num_(0.0, posinf=0.0))
    logits.mul_((top - grown).exp_().nan_to_num_(0.0, posinf=0.0))
    out.view(b * h, r, -1).baddbmm_(logits.view(b * h, r, s), values.float().reshape(b * h, s, -1))
    return grown


def _question(layer, tier: Tier, query: torch.Tensor, w: int, scaling: float, chunk, with_chunk: bool = False):
    """(the question's weights [B, H, W, S + T] on the resident then the waiting tokens (`with_chunk`: and the
    chunk's own, [B, H, W, S + T + n]), averaged over the query heads of each KV head; the waiting tokens' position,
    score and validity [B, H, T] on the device; the forward's attention output [B, Hq, n, D] over the whole prompt).
    `query`: the last forward's queries [B, Hq, n, D]; the question is its last `w` rows.

    Everything is the attention the forward would have over the whole prompt, as in a one-chunk prefill: the chunk's
    own keys (`chunk`: keys and values [B, H, n, D] as they arrived, not as a quantized store would round them; real
    [B, n]; each row sees the chunk up to itself) are in the softmax (and among the weights with `with_chunk`: a
    window policy's whole-prompt choice), and every row's output takes every waiting token's value, kept or not.
    Why the output: the chunk otherwise attends only the `budget` tokens kept, so at every layer its hidden states are
    made from them, and what the next layer's question asks for drifts. (On the embedded model at 2k and a 5% budget,
    lru with recall found 15 of 30 keys with the scoring alone and 19 of 30 with the question rows' output; at 12.5%
    snapkv found 28 of 30 with the question rows' output and 30 with every row's: the two it missed were a choice
    made from the other rows' drifted keys and a key the other rows' drifted values lost.)

    Two passes, a span of waiting tokens on the GPU at a time. The first takes every row's output with a running
    log-sum-exp (each span's share rescales what came before, as flash attention does), keeps the per-slot fields it
    streamed, and ends with each row's log-sum-exp; the second reads the keys again for the question rows' weights
    against it. The fp32 logits of every token at once would take g (query heads per KV head) times the rows' bytes:
    more than a chunk of KV at a long prompt. A span holds at most SPAN_BYTES (`_span`): few launches, little memory."""
    b, hq, n, d = query.shape
    h = layer.state.valid.shape[1]
    g = hq // h
    grouped = grouped_queries(query, h).float() * scaling  # [B, H, g*n, D], once, not per span

    def logits(rows, keys, seen):  # seen: which keys each row sees, broadcast to [B, H, rows, s]
        return (rows @ keys.float().transpose(-1, -2)).masked_fill_(~seen, float("-inf"))

    waiting = {name: torch.empty(b, h, tier.used, dtype=TORCH_TYPES[kind], device=query.device)
               for name, _, kind in RECALL_META}
    out = torch.zeros(b, h, g * n, d, dtype=torch.float32, device=query.device)
    lse = torch.full((b, h, g * n, 1), float("-inf"), device=query.device)
    held = out.nbytes + grouped.nbytes + lse.nbytes
    span = _span(tier, b * h, g * n, d, values=True, held=held)  # what a span's fp32 logits of every row allow
    for keys, values, visible in _own_chunks(chunk, g, span):
        lse = _add_span(out, lse, logits(grouped, keys, visible), values)
    # the fused kernel (kvscope.cache.recall_triton) makes no logits: its spans are bounded by their keys and values
    low = grouped_queries(query, h) if fused.available(query) and d >= 16 and d & (d - 1) == 0 else None
    at = 0
    for keys, values, valid, fields in _key_chunks(layer, tier, query.dtype, span if low is None else
                                                   _span(tier, b * h, 0, d, values=True, held=held + low.nbytes),
                                                   values=True):
        # if the kernel fails (fused.run warns and turns it off), this span and the rest of this layer's, sized for
        # the kernel, stay as they are and PyTorch takes each `span` at a time: that layer holds up to twice SPAN_BYTES
        ran = low is not None and fused.run(valid, "recall_triton.add_span", out, lse, low, keys, values, valid,
                                            scaling)[0]
        for cut in range(0, 0 if ran else valid.shape[-1], span):  # PyTorch ops, `span` at a time
            part = slice(cut, cut + span)
            lse = _add_span(out, lse, logits(grouped, keys[:, :, part], valid[:, :, None, part]), values[:, :, part])
        if fields is not None:
            n_at = valid.shape[-1]
            for name in META_NAMES:
                waiting[name][..., at:at + n_at].copy_(fields[name])
            at += n_at
        del keys, values, valid, fields
    # held in the query's dtype while the forward's pieces are written and evicted: half the bytes of fp32 in bf16
    out = out.view(b, hq, n, d).to(query.dtype)
    question = grouped.view(b, h, g, n, d)[:, :, :, n - w:].reshape(b, h, g * w, d)
    lse = lse.view(b, h, g, n)[..., n - w:].reshape(b, h, g * w, 1)
    del grouped
    extra = n if with_chunk else 0
    weights = torch.empty(b, h, w, layer.capacity + tier.used + extra, dtype=torch.float32, device=query.device)
    if with_chunk:  # the chunk's logits again, against the whole prompt's softmax
        weights[..., -n:] = _chunk_logits(question, chunk, g, w).sub_(lse).exp_().view(b, h, g, w, n).mean(2)
    at = 0
    span = _span(tier, b * h, g * w, d, values=False, held=out.nbytes)
    for keys, _, valid, _ in _key_chunks(layer, tier, query.dtype, span):
        part = logits(question, keys, valid[:, :, None, :]).sub_(lse).exp_()
        s = part.shape[-1]
        weights[..., at:at + s] = part.view(b, h, g, w, s).mean(2)
        at += s
        del keys, valid, part
    return weights, waiting, out


def _chunk_logits(grouped: torch.Tensor, chunk, groups: int, w: int) -> torch.Tensor:
    """The logits [B, H, g*W, n] of the chunk's last W rows (`grouped`) on its own keys, seeing them as the layer's
    attention mask lets those rows see them."""
    keys, _, real = chunk[:3]
    n = keys.shape[2]
    visible = grouped_mask(chunk_visible(real, n - w, n)[:, None], groups)  # [B, 1, g*W, n]
    return (grouped @ keys.float().transpose(-1, -2)).masked_fill_(~visible, float("-inf"))


def _span(tier: Tier, rows_bh: int, rows: int, head_dim: int, values: bool, held: int) -> int:
    """Waiting tokens one span of the question takes so that what it holds on the device, with the `held` bytes the
    question keeps across spans, stays within SPAN_BYTES: per token and (sequence, KV head) row, the records it
    crossed in (the first record alone without `values`), its keys (and `values`) in fp32, the fp32 logits of the
    `rows` query rows, and for a quantized tier the contiguous copy and the keys and values it dequantizes. With
    few rows (the fused kernel's pass: none) the keys and values, not the logits, bound it. Where `held` passes 3/4 of
    SPAN_BYTES (a large batch), a span takes a quarter of SPAN_BYTES."""
    records = sum(size for _, size in tier.records) if values else tier.records[0][1]
    per_token = records + (2 if values else 1) * head_dim * 4 + rows * 4
    if "keys" not in tier.store_names:  # quantized: keys and values dequantized together, from a contiguous copy
        per_token += records + 2 * head_dim * torch.finfo(tier.dtype).bits // 8
    return max(1, max(SPAN_BYTES - held, SPAN_BYTES // 4) // (rows_bh * per_token))

"""Greedy decoding on a live causal LM: continuous batching, a KV cache, finished rows
leave the batch and waiting prompts take their places.

Prompts wait in a queue, longest expected answer first (when the caller knows the
targets), then longest prompt. A batch of at most ``batch_size`` rows is
decoded one token per row per forward pass. A row stops at an end-of-sequence id, at
``max_new_tokens``, or when its text holds the stop string, and leaves the batch at once
(its rows of the cache are dropped). Once half the batch has left, waiting prompts are
prefilled in one pass and join it: their cache is aligned with the running rows' (left
padding, masked) and concatenated, so every step runs a nearly full batch. On a CPU a
decode step costs about the same for 10 rows as for 64 (it reads every weight once), so
the number of steps, not the number of rows, sets the time: a batch no longer runs for
as long as its longest answer while most of its rows are done.

A prefill runs the tokens its prompts all start with (an instruction, a question's first
words) once, for one row, and copies their cache to every row (when that saves more
work than the extra pass costs); the rest of each prompt
runs after them, left-padded, with the LM head at its last position only. Positions and
the attention mask come from the padding, as ``generate`` does, so each row's numbers are
those of its prompt alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from evomerge.evaluate._scoring import PASS_TOKENS, common_prefix, device_of


@torch.inference_mode()
def greedy_generate(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    eos_ids: Optional[list[int]],
    stop: Optional[str] = None,
    tokenizer: Any = None,
    expected: Optional[Sequence[int]] = None,
    started: Optional[Sequence[list[int]]] = None,
    decided: Optional[Callable[[int, str], bool]] = None,
) -> list[list[int]]:
    """Each prompt's greedy continuation, up to and including its end-of-sequence token or
    the token that completes ``stop`` (decoded with ``tokenizer``), at most ``max_new_tokens``.

    ``expected`` (an evaluator's target lengths, in tokens) orders the queue, longest
    first, so that long answers start early and short ones fill the last steps, instead
    of a few long ones running alone at the end. Outputs do not depend on it.

    ``started`` holds each row's first output tokens where the caller already knows them
    (a teacher-forced pass over its target gives greedy's first tokens: the target's while
    they are the argmax, then the argmax): they count as generated, and a row that goes
    on is prefilled with them after its prompt. ``decided(i, text)`` ends row ``i`` as
    soon as its text so far settles what the caller needs (an answer that can no longer
    equal its target); that row's output is then cut short."""
    if (stop or decided is not None) and tokenizer is None:
        raise ValueError("a stop string or a decided check needs the tokenizer to read the generated text")
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens < 1:
        return out
    inner, cache_kw, keep_kw = _call_names(model)
    eos = set(eos_ids or ())

    def done(i: int, row: list[int]) -> bool:
        if row[-1] in eos or len(row) >= max_new_tokens:
            return True
        if stop is None and decided is None:
            return False
        text = tokenizer.decode(row, skip_special_tokens=True)  # once, for both checks
        return (stop is not None and stop in text) or (decided is not None and decided(i, text))

    queue = []
    for i in range(len(prompts)):
        for t in started[i] if started is not None else ():  # known tokens, checked as if decoded
            out[i].append(t)
            if done(i, out[i]):
                break
        else:
            queue.append(i)
    inputs = [list(p) + out[i] for i, p in enumerate(prompts)] if started is not None else prompts
    queue.sort(key=lambda i: (-(expected[i] if expected is not None else 0), -len(inputs[i])))
    live: Optional[_Batch] = None
    while queue or live is not None:
        if queue and (live is None or len(live.rows) <= batch_size // 2):
            take = batch_size - (len(live.rows) if live is not None else 0)
            group, queue = queue[:take], queue[take:]
            fresh = _prefill(inner, [inputs[i] for i in group], group, pad_id, cache_kw, keep_kw)
            live = fresh if live is None else _merge(inner, live, fresh)
        assert live is not None
        tokens = live.logits.argmax(-1)
        keep = []
        for r, t in enumerate(tokens.tolist()):
            row = out[live.rows[r]]
            row.append(t)
            if not done(live.rows[r], row):
                keep.append(r)
        if not keep:
            live = None
            continue
        if len(keep) < len(live.rows):  # finished rows leave the batch and the cache
            sel = torch.tensor(keep, device=live.attn.device)
            live.cache.batch_select_indices(sel)
            tokens, live.attn, live.last = tokens[sel], live.attn[sel], live.last[sel]
            live.rows = [live.rows[r] for r in keep]
        live.attn = torch.cat([live.attn, live.attn.new_ones((len(live.rows), 1))], dim=-1)
        live.last = live.last + 1
        live.logits = inner(input_ids=tokens.unsqueeze(-1), attention_mask=live.attn, position_ids=live.last,
                            use_cache=True, **{cache_kw: live.cache}).logits[:, -1]
    return out


@dataclass
class _Batch:
    """Rows being decoded: their prompts, cache, attention mask over the cache, the
    position of each row's last token, and the logits that choose each row's next token."""

    rows: list[int]
    cache: Any
    attn: torch.Tensor  # [rows, cache length]
    last: torch.Tensor  # [rows, 1]
    logits: torch.Tensor  # [rows, vocab]


def _call_names(model: Any) -> tuple[Any, str, str]:
    """The model to call (a PEFT wrapper looked through: its layers stay in place) and the
    names this transformers version gives the cache and logits-to-keep arguments."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return inner, ("cache" if "cache" in params else "past_key_values"), ("logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep")


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers before the cache took its config
        return DynamicCache()


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (whose
    position gives the row's first logits); none for a single prompt (nothing to share)."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = min(n, common_prefix(prompts[0], p))
    return max(n, 0)


def _prefill(model: Any, prompts: list[list[int]], rows: list[int], pad_id: int, cache_kw: str, keep_kw: str) -> _Batch:
    cache = _new_cache(model)
    device = device_of(model)
    shared = _shared_prefix(prompts)
    if (len(prompts) - 1) * shared < PASS_TOKENS:  # a pass of its own would cost more than it saves
        shared = 0
    if shared:  # the common prefix once, its cache then repeated for every row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, **{cache_kw: cache, keep_kw: 1})
        cache.batch_repeat_interleave(len(prompts))
    width = max(len(p) for p in prompts) - shared
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), shared + width), dtype=torch.long)
    attn[:, :shared] = 1
    for r, p in enumerate(prompts):
        own = p[shared:]
        ids[r, width - len(own) :] = torch.tensor(own)
        attn[r, shared + width - len(own) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, **{cache_kw: cache, keep_kw: 1}).logits[:, -1]
    return _Batch(list(rows), cache, attn, positions[:, -1:], logits)


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), ``[rows, heads, length, head dim]``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers before cache layers


def _merge(model: Any, a: _Batch, b: _Batch) -> _Batch:
    """One batch of ``a``'s rows then ``b``'s: the shorter cache is padded on the left
    (masked positions, which attention gives weight 0) to the other's length."""
    length = max(a.attn.shape[1], b.attn.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    cache = _new_cache(model)
    for i, ((ka, va), (kb, vb)) in enumerate(zip(_layers(a.cache), _layers(b.cache))):
        cache.update(torch.cat([pad(ka, 2), pad(kb, 2)]), torch.cat([pad(va, 2), pad(vb, 2)]), i)
    return _Batch(a.rows + b.rows, cache, torch.cat([pad(a.attn, 1), pad(b.attn, 1)]), torch.cat([a.last, b.last]), torch.cat([a.logits, b.logits]))

"""Greedy decoding on a live causal LM: batched, a KV cache, finished rows leave the batch.

Prompts are sorted by length and decoded in batches, left-padded (the attention mask
and the positions come from the padding, as ``generate`` does). The tokens all of a
batch's prompts start with (an instruction, a question's first words) are run once, for
one row, and their KV cache copied to every row; the rest of each prompt is run after
them with the LM head at its last position only; each step then runs one token per row.
A row stops at an end-of-sequence id or when its text holds the stop string, and leaves
the batch at once: its rows of the cache are dropped, so the next steps cost only what
the unfinished rows need.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch

from evomerge.evaluate._scoring import common_prefix, device_of


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
) -> list[list[int]]:
    """Each prompt's greedy continuation, up to and including its end-of-sequence token or
    the token that completes ``stop`` (decoded with ``tokenizer``), at most ``max_new_tokens``."""
    if stop and tokenizer is None:
        raise ValueError("a stop string needs the tokenizer to read the generated text")
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, tokens in zip(idx, _decode_batch(model, [prompts[i] for i in idx], max_new_tokens, pad_id, set(eos_ids or ()), stop, tokenizer)):
            out[i] = tokens
    return out


def _cache_kwargs(model: Any) -> tuple[Any, str, str]:
    """The model to call (a PEFT wrapper looked through: its layers stay in place), a fresh
    KV cache, and the names this transformers version gives the cache and logits-to-keep."""
    from transformers import DynamicCache

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    try:
        cache = DynamicCache(config=inner.config)
    except TypeError:  # transformers before the cache took its config
        cache = DynamicCache()
    return inner, cache, ("cache" if "cache" in params else "past_key_values"), ("logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep")


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (whose
    position gives the row's first logits); none for a single prompt (nothing to share)."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = min(n, common_prefix(prompts[0], p))
    return max(n, 0)


def _decode_batch(model: Any, prompts: list[list[int]], max_new: int, pad_id: int, eos: set[int], stop: Optional[str], tokenizer: Any) -> list[list[int]]:
    model, cache, cache_kw, keep_kw = _cache_kwargs(model)
    device = device_of(model)
    shared = _shared_prefix(prompts)
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
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, **{cache_kw: cache, keep_kw: 1}).logits
    new: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the batch's rows, by prompt
    last = positions[:, -1:]
    for step in range(max_new):
        token = logits[:, -1].argmax(-1)
        keep = []
        for r, t in enumerate(token.tolist()):
            row = new[live[r]]
            row.append(t)
            done = t in eos or (stop is not None and stop in tokenizer.decode(row, skip_special_tokens=True))
            if not done:
                keep.append(r)
        if not keep or step == max_new - 1:
            break
        if len(keep) < len(live):  # finished rows leave the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            token, attn, last = token[sel], attn[sel], last[sel]
            live = [live[r] for r in keep]
        attn = torch.cat([attn, attn.new_ones((len(live), 1))], dim=-1)
        last = last + 1
        logits = model(input_ids=token.unsqueeze(-1), attention_mask=attn, position_ids=last, use_cache=True, **{cache_kw: cache}).logits
    return new

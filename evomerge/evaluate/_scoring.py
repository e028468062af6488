"""Batched log-likelihoods on a live causal LM, doing only the work the scores need.

Requests are token ids prepared once per tokenizer; each call runs the model on its
current weights (nothing about the model is cached).

Log-likelihoods follow lm-evaluation-harness's conventions so that both report the
same numbers: the pair is encoded as a whole and split after the context's tokens,
trailing spaces of the context move to the continuation, sequences are cut from the
left to the model's length.

Three savings over one sequence per (context, continuation) pair:

- **packing**: the continuations that share a context (the choices of a multiple-choice
  example) go in one row, the context once, each continuation after it with the
  positions it would have alone and an attention mask that lets it see the context and
  itself only: the context is computed once per example;
- **the LM head at scored positions only**: the model's body gives hidden states, and
  the head (a ``vocab x hidden`` matmul and a softmax over the vocabulary) runs on the
  positions that predict a continuation token, not on every position;
- **batches bucketed by length**: rows sorted by length, a batch holds rows of similar
  length up to a count and a token budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

#: The head's logits per chunk are kept under this many floats (about 1 GB).
LOGITS_BUDGET = 250_000_000
#: Tokens per forward pass (rows x width), so activations stay small on any batch size.
TOKENS_BUDGET = 65_536


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split from the encoding of the whole text."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = encode(tokenizer, continuation, False)
        if prefix is None:  # nothing to condition on: the first token is context, not scored
            return ids[:1], ids[1:]
        return [prefix], ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation, add_special_tokens)
    ctx = encode(tokenizer, context, add_special_tokens)
    return ctx, whole[len(ctx) :]


def model_max_length(model: Any, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# Configs whose model transforms the head's output (soft-capping, scaling): the head alone
# would not give the model's logits, so those models run whole.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def body_and_head(model: Any) -> Optional[tuple[Any, Any]]:
    """The model's body (hidden states out) and its LM head, or None when the head's output
    is not the model's logits. A PEFT wrapper is looked through (its layers stay in place)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "base_model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    cfg = getattr(inner, "config", None)
    if body is None or body is inner or head is None or any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    return body, head


@dataclass
class _Group:
    """Continuations that share one (already cut) context: one packed row."""

    ctx: list[int]
    members: list[int]  # request indices
    conts: list[list[int]]

    @property
    def width(self) -> int:
        return len(self.ctx) + sum(len(c) - 1 for c in self.conts)


def _groups(pairs: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[_Group]:
    """Pairs grouped by their context, each cut from the left as the model's length asks."""
    by_ctx: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont or len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored (model length {max_len})")
        cut = max(0, len(ctx) + len(cont) - 1 - max_len)  # the input is ctx + cont[:-1], at most max_len
        key = tuple(ctx[cut:])
        g = by_ctx.get(key)
        if g is None:
            g = by_ctx[key] = _Group(list(key), [], [])
        g.members.append(i)
        g.conts.append(list(cont))
    return list(by_ctx.values())


def _batches(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Groups sorted by width, longest first, cut into batches of at most ``batch_size``
    continuations and ``TOKENS_BUDGET`` tokens (padding included)."""
    order = sorted(groups, key=lambda g: -g.width)
    out: list[list[_Group]] = []
    batch: list[_Group] = []
    n = 0
    for g in order:
        width = order[0].width if not batch else batch[0].width
        if batch and (n + len(g.members) > batch_size or (len(batch) + 1) * width > TOKENS_BUDGET):
            out.append(batch)
            batch, n = [], 0
        batch.append(g)
        n += len(g.members)
    if batch:
        out.append(batch)
    return out


@dataclass
class _Packed:
    ids: torch.Tensor  # [rows, width]
    positions: torch.Tensor  # [rows, width]
    mask: torch.Tensor  # [rows, 1, width, width] additive
    rows: torch.Tensor  # [n scored] row of each scored token
    cols: torch.Tensor  # [n scored] column whose hidden state predicts it
    targets: torch.Tensor  # [n scored]
    owner: torch.Tensor  # [n scored] request index


def _pack(batch: list[_Group], pad_id: int, dtype: torch.dtype) -> _Packed:
    width = max(g.width for g in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    allowed = torch.zeros((len(batch), width, width), dtype=torch.bool)
    rows, cols, targets, owner = [], [], [], []
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, g in enumerate(batch):
        p = len(g.ctx)
        ids[r, :p] = torch.tensor(g.ctx)
        positions[r, :p] = torch.arange(p)
        allowed[r, :p, :p] = causal[:p, :p]
        at = p
        for i, cont in zip(g.members, g.conts):
            seg = cont[:-1]  # inputs after the context; the last token is only predicted
            end = at + len(seg)
            if seg:
                ids[r, at:end] = torch.tensor(seg)
                positions[r, at:end] = torch.arange(p, p + len(seg))
                allowed[r, at:end, :p] = True
                allowed[r, at:end, at:end] = causal[: len(seg), : len(seg)]
            rows += [r] * len(cont)
            cols += [p - 1] + list(range(at, end))  # the last context token predicts the first
            targets += cont
            owner += [i] * len(cont)
            at = end
        allowed[r, at:, at:] = causal[: width - at, : width - at]  # padding sees itself: no empty softmax row
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    return _Packed(ids, positions, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets), torch.tensor(owner))


def _logits_fn(model: Any, packed: _Packed, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from scored-token slices to their logits, after one pass of the body."""
    kw = dict(input_ids=packed.ids.to(device), attention_mask=packed.mask.to(device), position_ids=packed.positions.to(device))
    rows, cols = packed.rows.to(device), packed.cols.to(device)
    parts = body_and_head(model)
    if parts is None:
        logits = model(**kw).logits
        return lambda sl: logits[rows[sl], cols[sl]].float()
    body, head = parts
    hidden = body(**kw, use_cache=False).last_hidden_state
    return lambda sl: head(hidden[rows[sl], cols[sl]]).float()


def _model_dtype(model: Any) -> torch.dtype:
    try:
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    except (StopIteration, AttributeError):
        return torch.float32


@torch.inference_mode()
def loglikelihoods(
    model: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: summed log-probability of the continuation, whether every continuation
    token is the argmax (greedy decoding would produce it), and its token count.

    ``batch_size`` bounds the continuations scored per forward pass."""
    n = len(pairs)
    ll = np.zeros(n, dtype=np.float64)
    greedy = np.ones(n, dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    if n == 0:
        return ll, greedy, counts
    device, dtype = device_of(model), _model_dtype(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32000)
    chunk = max(1, LOGITS_BUDGET // vocab)
    for batch in _batches(_groups(pairs, model_max_length(model)), batch_size):
        packed = _pack(batch, pad_id, dtype)
        logits_of = _logits_fn(model, packed, device)
        targets = packed.targets.to(device)
        tok_lp, hit = [], []
        for s in range(0, len(targets), chunk):
            sl = slice(s, s + chunk)
            logits = logits_of(sl)
            tok_lp.append(torch.log_softmax(logits, dim=-1).gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1))
            hit.append(logits.argmax(-1) == targets[sl])
        owner = packed.owner.numpy()
        np.add.at(ll, owner, torch.cat(tok_lp).double().cpu().numpy())
        np.logical_and.at(greedy, owner, torch.cat(hit).cpu().numpy())
        np.add.at(counts, owner, 1)
    return ll, greedy, counts

"""Batched scoring on a live causal LM: log-likelihoods, greedy checks, greedy decoding.

Requests are token ids prepared once per tokenizer; each call runs the model on its
current weights (nothing about the model is cached).

Log-likelihoods follow lm-evaluation-harness's conventions so that both report the
same numbers: the pair is encoded as a whole and split after the context's tokens,
trailing spaces of the context move to the continuation, sequences are cut from the
left to the model's length, and batches are right-padded without an attention mask
(under the causal mask, real tokens never see the padding that follows them).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

# Logit tensors per forward pass are kept under this many floats (about 1 GB).
LOGITS_BUDGET = 250_000_000


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


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.inference_mode()
def loglikelihoods(
    model: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: summed log-probability of the continuation, whether every continuation
    token is the argmax (greedy decoding would produce it), and its token count."""
    n = len(pairs)
    ll = np.zeros(n, dtype=np.float64)
    greedy = np.zeros(n, dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    if n == 0:
        return ll, greedy, counts
    max_len = model_max_length(model)
    inputs, conts = [], []
    for ctx, cont in pairs:
        if not cont or len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored (model length {max_len})")
        inputs.append((ctx + cont)[-(max_len + 1) :][:-1])
        conts.append(cont)
    order = sorted(range(n), key=lambda i: -len(inputs[i]))  # similar lengths share a batch
    device = _device(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32000)
    start = 0
    while start < n:
        width = len(inputs[order[start]])
        rows = max(1, min(batch_size, LOGITS_BUDGET // max(1, width * vocab)))
        idx = order[start : start + rows]
        start += rows
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        c_max = max(len(conts[i]) for i in idx)
        pos = torch.zeros((len(idx), c_max), dtype=torch.long)
        tgt = torch.zeros((len(idx), c_max), dtype=torch.long)
        mask = torch.zeros((len(idx), c_max), dtype=torch.bool)
        for r, i in enumerate(idx):
            seq, cont = inputs[i], conts[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            first = len(seq) - len(cont)  # the logit at position p predicts token p + 1
            pos[r, : len(cont)] = torch.arange(first, len(seq))
            tgt[r, : len(cont)] = torch.tensor(cont)
            mask[r, : len(cont)] = True
        logits = model(input_ids=ids.to(device)).logits
        rows_ix = torch.arange(len(idx)).unsqueeze(1)
        picked = logits[rows_ix.to(device), pos.to(device)].float()  # [rows, c_max, vocab]
        logp = torch.log_softmax(picked, dim=-1)
        tgt_d, mask_d = tgt.to(device), mask.to(device)
        tok_lp = logp.gather(-1, tgt_d.unsqueeze(-1)).squeeze(-1).masked_fill(~mask_d, 0.0)
        hit = (picked.argmax(-1) == tgt_d) | ~mask_d
        sel = np.asarray(idx)
        ll[sel] = tok_lp.sum(-1).double().cpu().numpy()
        greedy[sel] = hit.all(-1).cpu().numpy()
        counts[sel] = mask.sum(-1).numpy()
    return ll, greedy, counts


@torch.inference_mode()
def greedy_generate(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    eos_ids: Optional[list[int]],
) -> list[list[int]]:
    """Greedy continuations, batched and left-padded (attention mask and positions from it)."""
    from transformers import GenerationConfig

    device = _device(model)
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        num_beams=1,
    )
    out: list[Optional[list[int]]] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            attn[r, width - len(p) :] = 1
        result = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen)
        new = result[:, width:].cpu().tolist()
        for r, i in enumerate(idx):
            out[i] = new[r]
    return [o or [] for o in out]

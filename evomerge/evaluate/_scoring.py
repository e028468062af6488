"""Batched log-likelihoods on a live causal LM, doing only the work the scores need.

Requests are token ids prepared once per tokenizer; each call runs the model on its
current weights (nothing about the model is cached).

Log-likelihoods follow lm-evaluation-harness's conventions so that both report the
same numbers: the pair is encoded as a whole and split after the context's tokens,
trailing spaces of the context move to the continuation, sequences are cut from the
left to the model's length.

Three savings over one sequence per (context, continuation) pair:

- **prefix sharing (tree packing)**: the model inputs (context, then continuation but its
  last token) are sorted and packed into rows as token tries. Tokens that several inputs
  start with (a multiple-choice example's prompt, shared by its choices; an instruction
  shared by the examples; a first word shared by choices) are one set of positions; each
  token attends to its ancestors in the trie and itself only, at the position it would
  have alone: every token the scores depend on is computed once, with the numbers it
  would have in its own sequence;
- **the LM head at scored positions only**: the model's body gives hidden states, and
  the head (a ``vocab x hidden`` matmul and a softmax over the vocabulary) runs once per
  distinct position that predicts a continuation token, not on every position;
- **full forward passes of the right size**: rows of ``ROW_WIDTH`` tokens, padded only at
  their ends, at most ``batch_size`` rows a pass. Each forward pass carries a fixed cost
  (hundreds of small operators, each a synchronisation of the CPU's threads), so passes
  are not narrow; on a CPU they hold about ``CPU_TOKENS_BUDGET`` tokens, whose activations
  stay in cache between operators, on a GPU up to ``TOKENS_BUDGET``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

#: The head's logits per chunk are kept under this many floats (about 1 GB).
LOGITS_BUDGET = 250_000_000
#: Tokens per forward pass (rows x width), so activations stay small on any batch size.
TOKENS_BUDGET = 65_536
#: On a CPU, passes of about 1k tokens are faster than wider ones: their activations (a
#: few MB per layer) stay in the cores' caches between the operators that read them.
#: German multiple choice on SmolLM2-135M, 2 cores: 8.9 s at 1024 tokens, 11.4 s at 65536.
CPU_TOKENS_BUDGET = 1024
#: Tokens per packed row: inputs go side by side up to this width (a longer one gets a row
#: of its own width). Attention's cost per token grows with it; the padding at rows' ends shrinks.
ROW_WIDTH = 256
#: A forward pass's fixed cost, in tokens of work: each pass reads every weight once and
#: runs hundreds of operators. A batch takes no row this much narrower than its widest.
PASS_TOKENS = 64
#: Attention-mask entries per forward pass (rows x width x width).
MASK_BUDGET = 1 << 25


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
class _Row:
    """A token trie laid out in one row: node ``i`` holds ``ids[i]``, attends to its
    ancestors and itself only, at position ``depth[i]`` (its position in every sequence
    through it); nodes come after their parents."""

    ids: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    scored: list[tuple[int, int, int]] = field(default_factory=list)  # (node that predicts, target, request)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, token: int, parent: int) -> int:
        self.ids.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1 if parent >= 0 else 0)
        return len(self.ids) - 1


def _inputs(pairs: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], int]]:
    """Each pair's model input (the context, cut from the left as the model's length asks,
    then the continuation but its last token, which is only predicted) and its context length."""
    out = []
    for ctx, cont in pairs:
        if not ctx or not cont or len(cont) > max_len:
            raise ValueError(f"a pair of {len(ctx)} context and {len(cont)} continuation tokens cannot be scored (model length {max_len})")
        cut = max(0, len(ctx) + len(cont) - 1 - max_len)
        out.append((list(ctx[cut:]) + list(cont[:-1]), len(ctx) - cut))
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _rows(pairs: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[_Row]:
    """The requests' inputs packed as tries into rows of ``ROW_WIDTH`` tokens (a longer
    input starts a row of its own width). Inputs go in sorted order, so each shares with the
    trie the longest prefix it can: its common prefix with the previous input."""
    inputs = _inputs(pairs, max_len)
    rows: list[_Row] = []
    row, cap, path, prev = _Row(), 0, [], []
    for i in sorted(range(len(inputs)), key=lambda i: inputs[i][0]):
        seq, n_ctx = inputs[i]
        shared = common_prefix(prev, seq)
        if not rows or len(row) + len(seq) - shared > cap:
            row, cap, shared = _Row(), max(ROW_WIDTH, len(seq)), 0
            rows.append(row)
        path = path[:shared]
        for t in seq[shared:]:
            path.append(row.add(t, path[-1] if path else -1))
        row.scored += [(path[n_ctx - 1 + j], t, i) for j, t in enumerate(pairs[i][1])]
        prev = seq
    return rows


def _batches(rows: list[_Row], batch_size: int, tokens_budget: int) -> list[list[_Row]]:
    """Rows sorted by width, longest first, cut into batches of at most ``batch_size`` rows,
    ``tokens_budget`` tokens and ``MASK_BUDGET`` mask entries (padding included). A row
    ``PASS_TOKENS`` shorter than its batch's first (a last, partly filled row) starts a
    batch of its own: its padding would cost more than a pass."""
    order = sorted(rows, key=len, reverse=True)
    out, i = [], 0
    while i < len(order):
        width = len(order[i])
        n = max(1, min(batch_size, tokens_budget // width, MASK_BUDGET // width**2))
        end = i + 1
        while end < min(i + n, len(order)) and len(order[end]) > width - PASS_TOKENS:
            end += 1
        out.append(order[i:end])
        i = end
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


def _pack(batch: list[_Row], pad_id: int, dtype: torch.dtype) -> _Packed:
    n_rows, width = len(batch), max(len(row) for row in batch)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    parent = torch.zeros((n_rows, width), dtype=torch.long)
    scored = []
    for r, row in enumerate(batch):
        n = len(row)
        ids[r, :n], positions[r, :n], parent[r, :n] = torch.tensor(row.ids), torch.tensor(row.depth), torch.tensor(row.parent)
        scored += [(r, *s) for s in row.scored]
    rows, cols, targets, owner = (torch.tensor(column) for column in zip(*scored))
    # each node sees itself (padding too: no empty softmax row) and what its parent sees;
    # depth by depth, so a parent's row is complete before its children copy it
    allowed = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1)
    for d in range(1, int(positions.max()) + 1):
        r, i = (positions == d).nonzero(as_tuple=True)
        allowed[r, i] |= allowed[r, parent[r, i]]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    return _Packed(ids, positions, mask, rows, cols, targets, owner)


def _logits_fn(model: Any, packed: _Packed, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function from (rows, cols) to the logits there, after one pass of the body."""
    kw = dict(input_ids=packed.ids.to(device), attention_mask=packed.mask.to(device), position_ids=packed.positions.to(device))
    parts = body_and_head(model)
    if parts is None:
        logits = model(**kw).logits
        return lambda rows, cols: logits[rows, cols].float()
    body, head = parts
    hidden = body(**kw, use_cache=False).last_hidden_state
    return lambda rows, cols: head(hidden[rows, cols]).float()


def _model_dtype(model: Any) -> torch.dtype:
    try:
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    except (StopIteration, AttributeError):
        return torch.float32


def _scored_passes(model: Any, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, log_probs: bool) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """Per forward pass, for each continuation token it scores (a request's tokens in
    order): the request, the argmax token where it stands, whether that is the token,
    and its log-probability (when ``log_probs``)."""
    device, dtype = device_of(model), _model_dtype(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32000)
    chunk = max(1, LOGITS_BUDGET // vocab)
    # a model run whole computes the logits at every position
    budget = CPU_TOKENS_BUDGET if device.type == "cpu" else TOKENS_BUDGET
    tokens_budget = budget if body_and_head(model) is not None else max(1, min(budget, LOGITS_BUDGET // vocab))
    for batch in _batches(_rows(pairs, model_max_length(model)), batch_size, tokens_budget):
        packed = _pack(batch, pad_id, dtype)
        logits_of = _logits_fn(model, packed, device)
        # the head once per distinct predicting position (choices that share a prefix share it)
        where, inverse = torch.unique(packed.rows * packed.ids.shape[1] + packed.cols, return_inverse=True)
        where, inverse, targets = where.to(device), inverse.to(device), packed.targets.to(device)
        tok_lp = torch.empty(len(targets), dtype=torch.float32, device=device) if log_probs else None
        best = torch.empty(len(targets), dtype=torch.long, device=device)
        for s in range(0, len(where), chunk):
            logits = logits_of(where[s : s + chunk] // packed.ids.shape[1], where[s : s + chunk] % packed.ids.shape[1])
            sel = ((inverse >= s) & (inverse < s + chunk)).nonzero(as_tuple=True)[0]
            at = inverse[sel] - s
            if tok_lp is not None:
                tok_lp[sel] = torch.log_softmax(logits, dim=-1)[at, targets[sel]]
            best[sel] = logits.argmax(-1)[at]
        yield packed.owner.numpy(), best.cpu().numpy(), (best == targets).cpu().numpy(), (tok_lp.double().cpu().numpy() if tok_lp is not None else None)


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

    ``batch_size`` bounds the packed rows (of ``ROW_WIDTH`` tokens, or one longer input)
    per forward pass."""
    n = len(pairs)
    ll = np.zeros(n, dtype=np.float64)
    greedy = np.ones(n, dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    for owner, _, hit, tok_lp in _scored_passes(model, pairs, batch_size, pad_id, log_probs=True):
        np.add.at(ll, owner, tok_lp)
        np.logical_and.at(greedy, owner, hit)
        np.add.at(counts, owner, 1)
    return ll, greedy, counts


@torch.inference_mode()
def argmax_tokens(model: Any, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int = 0) -> list[list[int]]:
    """Per pair, the argmax token at each position of its continuation (given the context
    and the continuation before it): the same packed passes, without the log-softmax."""
    out: list[list[int]] = [[] for _ in pairs]
    for owner, best, _, _ in _scored_passes(model, pairs, batch_size, pad_id, log_probs=False):
        for o, b in zip(owner.tolist(), best.tolist()):
            out[o].append(b)
    return out

"""Token batches for activation statistics, from whatever the user has.

The alignment library only ever sees token batches (``{"input_ids", "attention_mask"}``);
this module turns the accepted data sources into them:

- ready batches (a list of dicts with ``input_ids``), kept as they are;
- a LongTensor [n, seq] or a list of token-id lists / 1-D tensors;
- a list of strings (tokenized with the reference model's tokenizer);
- a file: ``.jsonl`` (one JSON object a line; ``text``, or prompt + answer fields),
  ``.json`` (a list of strings or such objects) or any other text file (one text a line);
- an evaluator: one with a ``texts() -> list[str]`` method, a dataset evaluator
  (its rendered ``prompts`` followed by their ``targets``), or one with a
  ``data_path`` attribute naming one of the files above.

Example:
    >>> batches = token_batches([[5, 6, 7], [8, 9]], batch_size=2)
    >>> batches[0]["input_ids"].tolist(), batches[0]["attention_mask"].tolist()
    ([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from evomerge.errors import ConfigError

Batch = dict[str, torch.Tensor]
# fields read, in order, when a record has no "text" (prompt first, then its answer)
PROMPT_FIELDS = ("prompt", "question", "input", "query", "context")
ANSWER_FIELDS = ("answer", "target", "completion", "response", "output", "label")


def token_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    max_examples: Optional[int] = 256,
    pad_id: int = 0,
    tokenizer_of: str = "the reference model",
) -> list[Batch]:
    """Right-padded batches of at most ``batch_size`` sequences of at most ``max_length`` tokens.

    Data that already are batches (dicts with ``input_ids``) are returned as they are.
    ``tokenizer_of`` names the model the tokenizer comes from, for the error when it has none.
    """
    if is_batches(data):
        return list(data)
    seqs = _sequences(data, tokenizer, max_length=max_length, tokenizer_of=tokenizer_of)
    if max_examples is not None:
        seqs = seqs[:max_examples]
    seqs = [s[:max_length] for s in seqs if len(s) > 0]
    if not seqs:
        raise ConfigError(f"{_describe(data)}: no text or tokens to read (empty data)")
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        pad_id = int(tokenizer.pad_token_id)
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def texts_from(data: Any) -> Optional[list[str]]:
    """The texts of a file, a list of strings or an evaluator; None for token data."""
    if isinstance(data, (str, Path)):
        return read_texts(Path(data))
    if hasattr(data, "texts") and callable(data.texts):
        return [str(t) for t in data.texts()]
    prompts = getattr(data, "prompts", None)
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], str):  # a dataset evaluator's rendered rows
        targets = getattr(data, "targets", None) or [""] * len(prompts)
        return [p + t for p, t in zip(prompts, targets)]
    if getattr(data, "data_path", None):
        return read_texts(Path(data.data_path))
    if isinstance(data, Sequence) and data and all(isinstance(x, str) for x in data):
        return list(data)
    return None


def read_texts(path: Path) -> list[str]:
    """Texts of a ``.jsonl``, ``.json`` or plain text file (one text a line)."""
    if not path.is_file():
        raise ConfigError(f"activation data not found: {path} (expected a .jsonl, .json or text file, or an evaluator)")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}: line {n} is not JSON") from None
    elif path.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise ConfigError(f"{path}: expected a JSON list of texts or records")
    else:
        records = [line for line in raw.splitlines() if line.strip()]
    return [_record_text(r, path, n) for n, r in enumerate(records, 1)]


def _record_text(record: Any, path: Path, n: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        parts = [str(record[f]) for f in PROMPT_FIELDS + ANSWER_FIELDS if isinstance(record.get(f), (str, int, float))]
        if parts:
            return "".join(parts)  # prompts carry their own separator ("Q: ...\nA:" + " 42")
    raise ConfigError(f"{path}: record {n} has no text field (text, or {'/'.join(PROMPT_FIELDS)} with {'/'.join(ANSWER_FIELDS)})")


def _sequences(data: Any, tokenizer: Any, *, max_length: int, tokenizer_of: str) -> list[list[int]]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ConfigError(f"token data must be [n, seq], got shape {list(data.shape)}")
        return [row.tolist() for row in data]
    texts = texts_from(data)
    if texts is not None:
        if tokenizer is None:
            raise ConfigError(f"text data needs a tokenizer, and {tokenizer_of} has none (no tokenizer.json, tokenizer_config.json or tokenizer.model)")
        if not texts:  # tokenizers fail on an empty batch; the error below says it better
            return []
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [list(ids) for ids in enc["input_ids"]]
    if isinstance(data, Sequence) and data:
        return [t.tolist() if isinstance(t, torch.Tensor) else [int(x) for x in t] for t in data]
    raise ConfigError(f"cannot read activation data from {_describe(data)}")


def _describe(data: Any) -> str:
    if isinstance(data, (str, Path)):
        return str(data)
    return type(data).__name__


def is_batches(data: Any) -> bool:
    """Is ``data`` a list of ready batches (dicts holding ``input_ids``)?"""
    return isinstance(data, list) and bool(data) and all(isinstance(b, dict) and "input_ids" in b for b in data)


def split_batches(batches: list[Batch], every: int = 4) -> tuple[list[Batch], list[Batch]]:
    """(fit, validation): every ``every``-th batch held out, at least one when there are two."""
    if len(batches) < 2:
        return batches, batches
    held = [b for i, b in enumerate(batches) if i % every == every - 1] or batches[-1:]
    fit = [b for b in batches if not any(b is h for h in held)]
    return fit, held

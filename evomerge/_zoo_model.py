"""The zoo's model side: a character tokenizer, a tiny Llama, a training loop, a scorer.

Kept free of anything but torch, tokenizers and transformers so that the zoo's
training processes import little.
"""

from __future__ import annotations

import math
import random
import string
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*=:;,.?!'\"()[]<>/\n"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def vocab() -> dict[str, int]:
    table = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        table[ch] = len(table)
    return table


def build_tokenizer():
    """A fast character-level tokenizer: one token per character, no tokens added.

    ``AutoTokenizer.from_pretrained`` loads it back from ``tokenizer.json``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=64,
    )
    tok.padding_side = "right"
    return tok


def model_config(hidden: int, layers: int, heads: int, intermediate: int, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def encode(text: str, table: dict[str, int]) -> list[int]:
    return [table.get(ch, UNK_ID) for ch in text]


def pack(pairs: Sequence[tuple[str, str]], table: dict[str, int], stop: str = "\n") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; only the answer and its stop are supervised.

    Right padding needs no attention mask under a causal mask: real tokens never
    look ahead at the padding.
    """
    seqs = [(encode(p, table), encode(a + stop, table)) for p, a in pairs]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def train(
    model: torch.nn.Module,
    batches: Iterator[Sequence[tuple[str, str]]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    on_step: Optional[Callable[[int], None]] = None,
) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the loss every 50 steps."""
    table = vocab()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        ids, labels = pack(next(batches), table)
        scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
        if on_step is not None and ((step + 1) % 25 == 0 or step + 1 == steps):
            on_step(step + 1)
    model.eval()
    return losses


def batches_from(rows: Sequence[tuple[str, str]], batch: int, seed: int) -> Iterator[list[tuple[str, str]]]:
    """Endless shuffled passes over a fixed list of examples."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            yield [rows[j] for j in order[i : i + batch]]


def batches_of(stream: Iterator[tuple[str, str]], batch: int) -> Iterator[list[tuple[str, str]]]:
    while True:
        yield [next(stream) for _ in range(batch)]


@torch.no_grad()
def exact_match(model: torch.nn.Module, pairs: Iterable[tuple[str, str]], chunk: int = 512) -> float:
    """Share of prompts whose greedy continuation is exactly answer + newline.

    One teacher-forced forward pass per chunk: greedy decoding reproduces the target
    exactly when the argmax at every target position is the target token.
    """
    table = vocab()
    pairs = list(pairs)
    hits = 0
    for i in range(0, len(pairs), chunk):
        ids, labels = pack(pairs[i : i + chunk], table)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        ok = ((pred == tgt) | (tgt == -100)).all(dim=-1)
        hits += int(ok.sum())
    return hits / max(1, len(pairs))


def save(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """A Hugging Face folder: safetensors weights, config, generation config, tokenizer."""
    from transformers import GenerationConfig

    nl = vocab()["\n"]
    model.generation_config = GenerationConfig(
        eos_token_id=[nl, EOS_ID], pad_token_id=PAD_ID, bos_token_id=BOS_ID, do_sample=False
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)

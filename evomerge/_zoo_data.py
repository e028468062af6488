"""The zoo's skills and their data: deterministic generators, splits, the pretraining mix.

Every skill is a small string function asked in two ways. The *generic* form
(``add 47+8=``) is what the base model is pretrained on, mixed across all skills.
The *instruction* form (``ADD 47+8=``) uses upper-case letters the base never saw;
each specialist is fine-tuned on one skill's instruction form, and the splits
(train / validation / test) are written in it. A specialist thus learns a small,
skill-specific change on top of abilities the base already has, the way instruction
tuning unlocks a pretrained model: the uniform average dilutes each change, while
a well-weighted merge can keep several.

Answers end with a newline; a model answers correctly when its greedy continuation
of the prompt is exactly ``answer + "\\n"``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from evomerge.errors import ConfigError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
STOP = "\n"


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 9)
    return f"{a}+{b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, 3, 6)
    return s, s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, 3, 6)
    return s, "".join(sorted(s))


def _count(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, 1, 9)
    return s, str(len(s))


@dataclass(frozen=True)
class Skill:
    """One skill: a generator of (input, answer) and the two ways of asking it."""

    name: str
    generic: str  # keyword in the pretraining mix
    instruction: str  # keyword the specialist learns (upper case: unseen by the base)
    make: Callable[[random.Random], tuple[str, str]]
    description: str

    def prompt(self, text: str) -> str:
        return f"{self.instruction} {text}="

    def generic_prompt(self, text: str) -> str:
        return f"{self.generic} {text}="


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "add", "ADD", _add, "add a digit to a number up to 999"),
        Skill("reverse", "rev", "REVERSE", _reverse, "reverse 3 to 6 letters"),
        Skill("sort", "sort", "SORT", _sort, "sort 3 to 6 letters"),
        Skill("count", "len", "COUNT", _count, "count 1 to 9 letters"),
    )
}
SPLITS = ("train", "validation", "test")


def make_splits(skill: Skill, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Disjoint splits of one skill (no input appears in two splits), fixed by ``seed``.

    Held-out splits are drawn first so that their content does not depend on the
    train size.
    """
    rng = random.Random(f"{seed}:{skill.name}")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in ("test", "validation", "train"):
        rows: list[dict] = []
        misses = 0
        while len(rows) < sizes[split]:
            text, answer = skill.make(rng)
            if text in seen:
                misses += 1
                if misses > 100_000:  # the skill has fewer distinct inputs than asked for
                    asked = " + ".join(f"{n} {sizes[n]}" for n in ("train", "validation", "test"))
                    raise ConfigError(
                        f"skill {skill.name!r} has too few distinct inputs for {asked} examples; "
                        "lower them (zoo --set train_size=N, validation_size=N, test_size=N)"
                    )
                continue
            seen.add(text)
            rows.append({"input": text, "prompt": skill.prompt(text), "answer": answer})
        out[split] = rows
    return {s: out[s] for s in SPLITS}


def held_out_inputs(splits: dict[str, dict[str, list[dict]]]) -> set[tuple[str, str]]:
    """(skill, input) pairs of every validation and test row: pretraining avoids them."""
    return {(name, r["input"]) for name, sp in splits.items() for s in ("validation", "test") for r in sp[s]}


def pretrain_stream(weights: dict[str, float], seed: int, exclude: set[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) pairs of the generic mix; the same ``seed`` gives the same stream."""
    rng = random.Random(f"pretrain:{seed}")
    names = list(weights)
    w = [weights[n] for n in names]
    while True:
        skill = SKILLS[rng.choices(names, weights=w)[0]]
        text, answer = skill.make(rng)
        if (skill.name, text) in exclude:
            continue
        yield skill.generic_prompt(text), answer


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

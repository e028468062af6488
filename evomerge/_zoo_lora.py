"""LoRA specialists for the offline zoo: one PEFT adapter per skill on the zoo's base.

``lora_zoo(zoo)`` trains, next to a built zoo, ``DIR/lora/<skill>``: a rank-``rank``
LoRA adapter on every linear layer of the base's decoder, trained on the skill's
training split like the full specialists (same data, batches and seed; a learning rate
fit for LoRA), saved with ``save_pretrained`` so that peft, mergekit and evomerge all
read it. ``DIR/lora/lora.json`` records the settings and the test accuracy table; a
second call with the same settings reuses the folder. Written under a temporary name
and renamed when complete.

Example::

    >>> from evomerge.zoo import zoo
    >>> adapters = lora_zoo(zoo("zoo"))          # doctest: +SKIP
    >>> adapters["add"]                         # doctest: +SKIP
    PosixPath('zoo/lora/add')
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

LORA_DIR = "lora"
MANIFEST = "lora.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraRecipe:
    """Everything that decides the adapters' bytes (with the zoo's own recipe)."""

    rank: int = 8
    alpha: int = 16
    steps: int = 300
    lr: float = 3e-3
    batch: int = 64
    seed: int = 0


def lora_zoo(z: Any, recipe: LoraRecipe = LoraRecipe(), *, report: Optional[Callable[[str], None]] = None) -> dict[str, Path]:
    """The zoo's LoRA specialists (skill -> adapter folder), trained if missing or stale."""
    root = Path(z.root) / LORA_DIR
    wanted = {"recipe": asdict(recipe), "zoo": z.fingerprint}
    manifest = root / MANIFEST
    if manifest.is_file():
        seen = json.loads(manifest.read_text())
        if {k: seen.get(k) for k in wanted} == wanted:
            return {s: root / s for s in z.skills}
    tmp = root.parent / f".{LORA_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = {}
    for skill in z.skills:
        if report:
            report(f"training the LoRA specialist {skill} (rank {recipe.rank}, {recipe.steps} steps)")
        model = _train(z, skill, recipe, tmp / skill)
        table[skill] = _accuracies(model, z)
    (tmp / MANIFEST).write_text(json.dumps(dict(wanted, table=table), indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    return {s: root / s for s in z.skills}


def lora_table(z: Any) -> dict[str, dict[str, float]]:
    """The LoRA specialists' test accuracy per skill, as recorded when they were trained."""
    return json.loads((Path(z.root) / LORA_DIR / MANIFEST).read_text())["table"]


def _train(z: Any, skill: str, recipe: LoraRecipe, out: Path) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from evomerge._zoo_model import batches_from, train

    hf_logging.disable_progress_bar()
    torch.manual_seed(recipe.seed)
    base = LlamaForCausalLM.from_pretrained(z.base, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(TARGETS), lora_dropout=0.0))
    rows = [(r["prompt"], r["answer"]) for r in z.examples(skill, "train")]
    train(model, batches_from(rows, recipe.batch, recipe.seed), steps=recipe.steps, lr=recipe.lr, warmup=max(1, recipe.steps // 10))
    model.peft_config["default"].base_model_name_or_path = str(Path(z.base).resolve())
    model.save_pretrained(str(out))
    return model


def _accuracies(model: Any, z: Any) -> dict[str, float]:
    import torch

    from evomerge._zoo_model import exact_match

    with torch.inference_mode():
        return {s: round(exact_match(model, [(r["prompt"], r["answer"]) for r in z.examples(s, "test")]), 4) for s in z.skills}

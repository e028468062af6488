"""``evomerge demo``: the example a new user runs first (``make demo``).

Builds (or reuses) a small model family offline, writes a TIES recipe for it, merges
it with :func:`evomerge.merge.merge`, loads the result with transformers and shows
the commands to go further.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.merge import Recipe, merge

DEMO_RECIPE = """\
# A TIES merge of three fine-tunes of one base: per-layer weights (gradients) and
# a different density for attention and MLP weights. `evomerge merge` and
# mergekit-yaml both read this file.
merge_method: ties
base_model: {models}/base
models:
  - model: {models}/ft0
    parameters:
      weight: [0.2, 0.8]
      density: 0.5
  - model: {models}/ft1
    parameters:
      weight:
        - {{filter: self_attn, value: 0.7}}
        - {{value: 0.4}}
      density: 0.6
  - model: {models}/ft2
    parameters:
      weight: 0.5
      density: [0.3, 0.7]
parameters:
  normalize: true
dtype: float32
"""


def demo(runs_dir: Path = Path("runs"), *, quiet: bool = False) -> dict[str, Any]:
    """Run the example merge under ``runs_dir/demo``; returns a summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge._testing import llama_config, write_family

    say = (lambda *a: None) if quiet else print
    root = Path(runs_dir) / "demo"
    models = root / "models"
    if not (models / "ft2" / "model.safetensors").is_file():
        say(f"building a small model family in {models} ...")
        write_family(models, 3, seed=0, cfg=llama_config(hidden=64, intermediate=128, layers=4, vocab=100))
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(DEMO_RECIPE.format(models=models.resolve()))
    Recipe.from_yaml(recipe_path)  # validate before announcing anything
    out = root / "merged"
    summary = merge(recipe_path, out, overwrite=True, progress=not quiet)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer("hello", return_tensors="pt")).logits
    n_params = sum(p.numel() for p in model.parameters())
    say(f"merged {summary['n_tensors']} tensors with {summary['merge_method']} in {summary['seconds']:.2f} s")
    say(f"loaded {out} with transformers: {type(model).__name__}, {n_params:,} parameters, logits {tuple(logits.shape)}")
    say("next:")
    say(f"  cat {recipe_path}                      # the recipe (mergekit format)")
    say(f"  evomerge merge {recipe_path} --out merged2   # merge it again")
    return dict(summary, recipe=str(recipe_path), n_params=n_params)

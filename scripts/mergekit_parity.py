"""Check that evomerge merges exactly like mergekit 0.1.5, recipe by recipe.

    python scripts/mergekit_parity.py --mergekit .venv-mergekit/bin/mergekit-yaml --regenerate

builds two tiny float32 Llama families (untied and tied embeddings) under
``tests/data/parity/``, runs every recipe in ``RECIPES`` through mergekit, stores
mergekit's tensors as the expected outputs, and compares evomerge's. Without
``--regenerate`` it compares against the stored outputs (no mergekit needed);
``tests/test_mergekit_parity.py`` does the same in the test suite.
Exit code 1 if any tensor's max relative error (max |a-b| / max |b|) is 1e-5 or more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "data" / "parity"
TOLERANCE = 1e-5

_TIES_MODELS = """
  - model: fam/ft0
    parameters: {weight: [0.2, 0.8], density: [0.3, 0.9]}
  - model: fam/ft1
    parameters:
      weight:
        - {filter: self_attn, value: 0.3}
        - {filter: mlp, value: [0.9, 0.1]}
        - {value: 0.6}
      density: 0.7
  - model: fam/ft2
    parameters: {weight: 0.5, density: 0.3}
"""

RECIPES: dict[str, str] = {
    "linear": """
merge_method: linear
models:
  - {model: fam/ft0, parameters: {weight: [1.0, 0.2]}}
  - {model: fam/ft1, parameters: {weight: [{filter: mlp, value: 0.7}, {value: 0.3}]}}
  - {model: fam/ft2, parameters: {weight: 0.5}}
dtype: float32
""",
    "linear_sum": """
merge_method: linear
models:
  - {model: fam/ft0, parameters: {weight: 0.6}}
  - {model: fam/ft1, parameters: {weight: 0.7}}
parameters: {normalize: false}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: fam/base
models:
  - {model: fam/ft0, parameters: {weight: [0.0, 0.5, 1.0]}}
  - {model: fam/ft1, parameters: {weight: 0.4}}
  - {model: fam/ft2, parameters: {weight: [{filter: self_attn, value: [1.0, 0.2]}, {value: -0.3}]}}
parameters: {lambda: 0.8}
dtype: float32
""",
    "ties": "merge_method: ties\nbase_model: fam/base\nmodels:" + _TIES_MODELS + "dtype: float32\n",
    "ties_unnormalized": "merge_method: ties\nbase_model: fam/base\nmodels:"
    + _TIES_MODELS
    + "parameters: {normalize: false, lambda: 1.3}\ndtype: float32\n",
    "ties_rescaled": "merge_method: ties\nbase_model: fam/base\nmodels:"
    + _TIES_MODELS
    + "parameters: {rescale: true}\ndtype: float32\n",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: fam/base
models:
  - {model: fam/ft0, parameters: {weight: 0.7, density: [0.5, 0.9], gamma: 0.05}}
  - {model: fam/ft1, parameters: {weight: [0.3, 0.9], density: 0.8, gamma: [{filter: mlp, value: 0.1}, {value: 0.01}]}}
  - {model: fam/ft2, parameters: {weight: 0.5, density: 0.6}}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: fam/base
models:
  - {model: fam/ft0, parameters: {weight: 0.7, density: 0.6, gamma: 0.02}}
  - {model: fam/ft1, parameters: {weight: [0.3, 0.9], density: [0.9, 0.4], gamma: 0.1}}
  - {model: fam/ft2, parameters: {weight: 0.5, density: 0.7}}
parameters: {normalize: true}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: fam/base
models:
  - {model: fam/base}
  - {model: fam/ft0}
parameters:
  t:
    - {filter: self_attn, value: [0.0, 0.5, 0.3, 0.7, 1.0]}
    - {filter: mlp, value: [1.0, 0.5, 0.7, 0.3, 0.0]}
    - {value: 0.5}
dtype: float32
""",
    "slerp_far": """
merge_method: slerp
base_model: fam/ft1
models:
  - {model: fam/ft1}
  - {model: fam/ft2}
parameters: {t: 0.35}
dtype: float32
""",
    "nuslerp": """
merge_method: nuslerp
base_model: fam/base
models:
  - {model: fam/ft0, parameters: {weight: [0.3, 0.8]}}
  - {model: fam/ft1, parameters: {weight: 0.6}}
dtype: float32
""",
    "nuslerp_rowwise": """
merge_method: nuslerp
models:
  - {model: fam/ft1, parameters: {weight: 0.4}}
  - {model: fam/ft2, parameters: {weight: [{filter: mlp, value: 0.9}, {value: 0.2}]}}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
dtype: float32
""",
    "nuslerp_columnwise": """
merge_method: nuslerp
base_model: fam/base
models:
  - {model: fam/ft1, parameters: {weight: 0.4}}
  - {model: fam/ft2, parameters: {weight: 0.7}}
parameters: {nuslerp_flatten: false}
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: fam/base
models:
  - {model: fam/ft0}
  - {model: fam/ft1}
  - {model: fam/ft2}
dtype: float32
""",
    "model_stock_filterwise": """
merge_method: model_stock
base_model: fam/base
models:
  - {model: fam/ft0}
  - {model: fam/ft1}
  - {model: fam/ft2}
parameters: {filter_wise: true}
dtype: float32
""",
    "passthrough": """
merge_method: passthrough
models:
  - {model: fam/ft2, parameters: {scale: [{filter: mlp, value: 0.5}, {value: 1.0}]}}
dtype: float32
""",
    # data-flow (layer stacks): runs from several models, a repeated layer, branch scales
    "passthrough_slices": """
merge_method: passthrough
slices:
  - sources: [{model: fam/ft0, layer_range: [0, 3]}]
  - sources:
      - model: fam/ft1
        layer_range: [2, 4]
        parameters: {scale: [{filter: o_proj, value: 0.6}, {filter: down_proj, value: 0.6}]}
  - sources: [{model: fam/ft0, layer_range: [2, 3]}]
  - sources: [{model: fam/base, layer_range: [4, 5]}]
  - sources:
      - model: fam/ft2
        layer_range: [1, 3]
        parameters: {scale: [{filter: o_proj, value: [1.2, 0.8]}, {filter: down_proj, value: 1.1}]}
dtype: float32
""",
    "passthrough_slices_pruned": """
merge_method: passthrough
slices:
  - sources: [{model: fam/ft2, layer_range: [0, 1]}]
  - sources: [{model: fam/ft1, layer_range: [3, 5]}]
dtype: float32
""",
    # joint parameter + data-flow: a mergekit-multi chain, the named merge routed through
    "passthrough_slices_chain": """
name: merged
merge_method: task_arithmetic
base_model: fam/base
models:
  - {model: fam/ft0, parameters: {weight: 0.7}}
  - {model: fam/ft1, parameters: {weight: [0.2, 0.9]}}
dtype: float32
---
merge_method: passthrough
slices:
  - sources: [{model: merged, layer_range: [0, 3]}]
  - sources: [{model: fam/ft2, layer_range: [1, 2]}]
  - sources:
      - model: merged
        layer_range: [3, 5]
        parameters: {scale: [{filter: o_proj, value: 0.8}, {filter: down_proj, value: 0.8}]}
dtype: float32
""",
    "ties_tied_embeddings": """
merge_method: ties
base_model: tied/base
models:
  - {model: tied/ft0, parameters: {weight: 0.7, density: 0.5}}
  - {model: tied/ft1, parameters: {weight: [0.2, 0.9], density: 0.6}}
dtype: float32
""",
    "task_arithmetic_tied_embeddings": """
merge_method: task_arithmetic
base_model: tied/base
models:
  - {model: tied/ft0, parameters: {weight: 0.5}}
  - {model: tied/ft1, parameters: {weight: [{filter: embed, value: 0.1}, {value: 0.9}]}}
dtype: float32
""",
}


def build_families(root: Path) -> None:
    from evomerge._testing import llama_config, write_family

    if not (root / "fam" / "base").is_dir():
        write_family(root / "fam", 3, seed=1234, cfg=llama_config(layers=5))
    if not (root / "tied" / "base").is_dir():
        write_family(root / "tied", 2, seed=4321, cfg=llama_config(layers=3, tie=True))


def write_recipes(root: Path) -> None:
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    for name, text in RECIPES.items():
        (root / "recipes" / f"{name}.yaml").write_text(text.lstrip())


def run_mergekit(mergekit_yaml: str, root: Path) -> None:
    from safetensors.torch import load_file, save_file

    (root / "expected").mkdir(exist_ok=True)
    for name in RECIPES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            recipe = root / "recipes" / f"{name}.yaml"
            if "\n---" in recipe.read_text():  # a chain: mergekit-multi, beside mergekit-yaml
                multi = str(Path(mergekit_yaml).with_name("mergekit-multi"))
                cmd = [multi, str(recipe), "--intermediate-dir", str(Path(tmp) / "stages"), "--out-path", str(out), "--copy-tokenizer", "--no-write-model-card"]
            else:
                cmd = [mergekit_yaml, str(recipe), str(out), "--copy-tokenizer", "--no-write-model-card"]
            subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL)
            tensors = {}
            for f in sorted(out.glob("*.safetensors")):
                tensors.update(load_file(str(f)))
            save_file(tensors, str(root / "expected" / f"{name}.safetensors"))
        print(f"mergekit: {name}")


def compare(root: Path, name: str) -> tuple[float, str]:
    """Max relative error of evomerge's write() against the stored mergekit output."""
    from safetensors.torch import load_file

    from evomerge.merge import merge

    expected = load_file(str(root / "expected" / f"{name}.safetensors"))
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(root)
        try:
            merge(root / "recipes" / f"{name}.yaml", Path(tmp) / "out")
        finally:
            os.chdir(cwd)
        ours = load_file(str(Path(tmp) / "out" / "model.safetensors"))
    if set(ours) != set(expected):
        return float("inf"), f"tensor names differ: {sorted(set(ours) ^ set(expected))[:3]}"
    worst, where = 0.0, ""
    for k, ref in expected.items():
        err = relative_error(ours[k], ref)
        if err > worst:
            worst, where = err, k
    return worst, where


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    diff = (a.float() - b.float()).abs().max().item()
    return diff / scale if scale > 0 else diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", help="path to mergekit-yaml (0.1.5) for --regenerate")
    ap.add_argument("--regenerate", action="store_true", help="rebuild fixtures and expected outputs with mergekit")
    args = ap.parse_args()
    if args.regenerate:
        if not args.mergekit:
            ap.error("--regenerate needs --mergekit PATH")
        shutil.rmtree(PARITY, ignore_errors=True)
        build_families(PARITY)
        write_recipes(PARITY)
        run_mergekit(str(Path(args.mergekit).resolve()), PARITY)  # mergekit runs in the parity folder
    failed = 0
    print(f"{'recipe':32s} {'max rel err':>12s}  worst tensor")
    for name in RECIPES:
        err, where = compare(PARITY, name)
        ok = err < TOLERANCE
        failed += not ok
        print(f"{name:32s} {err:12.3e}  {where}{'' if ok else '   FAIL'}")
    print(f"{len(RECIPES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""Aligning a run's sources before its search starts (the run config's ``sources.align``).

A run config may say::

    sources:
      base_model: zoo/base
      models: [zoo/base, zoo/base_alt]
      align: {method: mudsc, data: zoo/data/add/validation.jsonl, to: base}

(``refine: STEPS`` adds learned refinement of each alignment, ``refine_blend`` says for
which merges, see :mod:`evomerge.align.refine`.)

:func:`align_run_sources` writes every source but the reference (the base, or the
first model with ``to: first``), aligned to the reference, into ``out_dir`` and
returns the ``sources`` section with those entries pointing at the aligned folders
and ``align.originals`` mapping each aligned folder back to the model it came from.
Recipes of the search then name the aligned folders, which live in the run folder,
so every trial can be rebuilt. Called again on its own output it changes nothing,
and an aligned folder whose ``alignment.json`` records the same request is reused.

Example:
    >>> sources = {"base_model": "zoo/base", "models": ["zoo/base", "zoo/base_alt"],
    ...            "align": {"method": "weight"}}
    >>> align_run_sources(sources, Path("runs/r/aligned"))["models"]      # doctest: +SKIP
    ['zoo/base', '/abs/runs/r/aligned/base_alt']
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

from evomerge.align.api import ALIGNMENT_FILE, align_folder, alphas_to_try, check_blend, check_refine
from evomerge.errors import ConfigError

ALIGN_KEYS = ("method", "alpha", "data", "to", "refine", "refine_blend", "originals")


def align_request(spec: dict[str, Any], where: str = "sources.align") -> dict[str, Any]:
    """The validated ``align`` settings with defaults filled in."""
    unknown = [k for k in spec if k not in ALIGN_KEYS]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(ALIGN_KEYS)})")
    req = {"method": spec.get("method", "mudsc"), "alpha": spec.get("alpha"), "data": spec.get("data"), "to": spec.get("to", "base")}
    if req["to"] not in ("base", "first"):
        raise ConfigError(f"{where}.to: expected base or first, got {req['to']!r}")
    try:
        tried = alphas_to_try(req["method"], req["alpha"], (0.0, 1.0))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if any(a < 1.0 for a in tried) and not req["data"]:
        raise ConfigError(f"{where}.data: method {req['method']} needs data for activation statistics (an evaluator preset or a .jsonl/text file)")
    req["refine"], req["refine_blend"] = spec.get("refine", 0), spec.get("refine_blend", "layerwise")
    for key, check in (("refine", check_refine), ("refine_blend", check_blend)):
        try:
            check(req[key])
        except ConfigError as exc:
            raise ConfigError(f"{where}.{key}: {exc}") from None
    if req["refine"] and not req["data"]:
        raise ConfigError(f"{where}.data: refinement needs data to score the merged model on (an evaluator preset or a .jsonl/text file)")
    return req


def align_run_sources(sources: dict[str, Any], out_dir: Path, *, base_dir: Optional[Path] = None, progress: bool = False) -> dict[str, Any]:
    """The ``sources`` section with every non-reference model replaced by its aligned folder."""
    spec = sources.get("align")
    if not spec:
        return sources
    if spec.get("originals"):
        return sources  # already aligned: this is a frozen config
    req = align_request(spec)
    out = copy.deepcopy(sources)
    models: list[str] = list(sources["models"])
    base = sources.get("base_model")
    reference = base if (req["to"] == "base" and base) else models[0]
    data: Any = req["data"]
    if data is not None and base_dir is not None and (base_dir / data).is_file():
        data = str((base_dir / data).resolve())
    if isinstance(data, str):
        from evomerge.align.resolve import resolve_data

        try:
            data = resolve_data(data)
        except ConfigError as exc:
            raise ConfigError(f"sources.align.data: {exc}") from None
    originals: dict[str, str] = {}
    renamed: dict[str, str] = {}
    used: set[str] = set()
    for ref in dict.fromkeys(([base] if base else []) + models):
        if ref == reference:
            continue
        folder = (Path(out_dir) / _folder_name(ref, used)).absolute()
        request = {"reference": reference, "model": ref, **{k: req[k] for k in ("method", "alpha", "data")}}
        if req["refine"]:  # only then: folders aligned before refinement existed still answer their request
            request.update(refine=req["refine"], refine_blend=req["refine_blend"])
        if not _answers(folder, request):
            if progress:
                # stderr: stdout may be the JSON summary of `evomerge search --json`
                how = req["method"] + (f" + refine {req['refine']} ({req['refine_blend']})" if req["refine"] else "")
                print(f"aligning {ref} to {reference} ({how}) -> {folder}", file=sys.stderr, flush=True)
            align_folder(reference, ref, folder, method=req["method"], alpha=req["alpha"], data=data, overwrite=True, request=request, refine=req["refine"], refine_blend=req["refine_blend"])
        renamed[ref] = str(folder)
        originals[str(folder)] = ref
    out["models"] = [renamed.get(m, m) for m in models]
    if base:
        out["base_model"] = renamed.get(base, base)
    out["align"] = dict(spec, **{k: req[k] for k in ("method", "alpha", "to", "refine", "refine_blend")}, originals=originals)
    return out


def _answers(folder: Path, request: dict[str, Any]) -> bool:
    """Does ``folder`` already hold an alignment made for exactly this request?"""
    try:
        return json.loads((folder / ALIGNMENT_FILE).read_text()).get("request") == request and (folder / "model.safetensors").is_file()
    except (OSError, ValueError):
        return False


def _folder_name(ref: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ref.rstrip("/")).name) or "model"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name

"""PEFT LoRA adapters as merge sources: a low-rank task vector on the base they were trained from.

An adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``) changes
each target tensor ``W`` of its base by ``delta = scale * B @ A`` (``A``: rank x in,
``B``: out x rank, ``scale = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA). As a
source it reads like the full fine-tune it stands for: any tensor is the base's plus
that delta, made a block of rows at a time (never the whole model), so every merge
method works on adapters, and on adapters mixed with full fine-tunes. Merges that are
linear in the task vectors (linear, task arithmetic) need no full-size tensor at all:
scaled factors concatenated are the merged update (see :mod:`evomerge.merge.low_rank`).

Everything is checked when the adapter opens, each problem one line: a missing or
malformed config, missing or truncated weights, a pickle file without ``allow_pickle``,
another PEFT type or DoRA, a target module the base lacks, factors whose shapes do not
fit the base's tensor, a rank that disagrees with the config, a base it names that is
not the recipe's.

Example:
    >>> src = AdapterSource.open("zoo/lora/add", base=SourceModel.open("zoo/base"))   # doctest: +SKIP
    >>> src.targets[:1]                                                             # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj.weight']
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from evomerge.errors import SourceError
from evomerge.sources import SourceModel, resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."


def is_adapter(ref: str, *, base_dir: Optional[Path] = None) -> bool:
    """Whether ``ref`` is a local folder holding a PEFT adapter (hub adapters are not fetched here)."""
    for p in [Path(ref).expanduser()] + ([base_dir / ref] if base_dir is not None and not Path(ref).is_absolute() else []):
        if p.is_dir():
            return (p / ADAPTER_CONFIG).is_file()
    return False


@dataclass(frozen=True)
class LoraFactors:
    """One target tensor's update ``scale * B @ A`` (transposed for embeddings and fan-in-fan-out layers)."""

    a: torch.Tensor  # rank x in (memory-mapped)
    b: torch.Tensor  # out x rank
    scale: float
    transposed: bool  # the update is (B @ A).T: embeddings, Conv1D layers

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def rows(self, r0: int, r1: int, device: Any = "cpu") -> torch.Tensor:
        """Rows ``[r0, r1)`` of the update, float32, on ``device``."""
        a = self.a.to(device, torch.float32)
        b = self.b.to(device, torch.float32)
        if self.transposed:  # update = (B @ A).T = A.T @ B.T: its rows are A's columns
            return (a[:, r0:r1].T @ b.T) * self.scale
        return (b[r0:r1] @ a) * self.scale

    def scaled(self, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, weight * scale * B) in float32: the factors of ``weight * update`` in the
        (not transposed) B @ A orientation of a LoRA layer."""
        a, b = self.a.to(torch.float32), self.b.to(torch.float32) * (self.scale * weight)
        return (b.T, a.T) if self.transposed else (a, b)


class AdapterSource(SourceModel):
    """A source whose tensors are its base's plus the adapter's low-rank updates."""

    base: SourceModel
    factors: dict[str, LoraFactors]
    replaced: dict[str, torch.Tensor]  # modules_to_save and trained biases: whole tensors
    adapter_config: dict

    @classmethod
    def open(cls, ref: str, *, base: SourceModel, allow_pickle: bool = False, base_dir: Optional[Path] = None) -> "AdapterSource":  # type: ignore[override]
        path = resolve_model_path(ref, base_dir=base_dir)
        config = _read_adapter_config(path)
        src = cls(ref=ref, path=path, config=base.config, weight_map=dict(base.weight_map), pickle=base.pickle)
        src.base = base
        src.adapter_config = config
        src._meta = dict(base._meta)
        state = _read_adapter_weights(path, allow_pickle)
        src.factors, src.replaced = _factors(ref, config, state, base)
        _check_base_name(ref, config, base)
        return src

    # the base's tensors, names, shapes and dtypes; updates on top
    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor (float32 where the adapter changes it): one tensor at a time."""
        if name in self.replaced:
            return self.replaced[name]
        f = self.factors.get(name)
        if f is None:
            return self.base.tensor(name)
        return self.base.tensor(name).to(torch.float32) + f.rows(0, self.shape(name)[0])

    def add_update(self, name: str, base_chunk: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Entries [a, b) of this source's flattened tensor, given the base's."""
        if name in self.replaced:
            return self.replaced[name].reshape(-1)[a:b].to(base_chunk.device)
        f = self.factors.get(name)
        if f is None:
            return base_chunk
        width = math.prod(self.shape(name)[1:])
        r0, r1 = a // width, -(-b // width)
        update = f.rows(r0, r1, base_chunk.device).reshape(-1)[a - r0 * width : b - r0 * width]
        return base_chunk.to(torch.float32) + update

    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.factors.values()), default=0)

    def tokenizer_files(self) -> list[Path]:
        return self.base.tokenizer_files()


def open_sources(refs: Sequence[str], *, base_model: Optional[str], allow_pickle: bool = False, base_dir: Optional[Path] = None) -> list[SourceModel]:
    """Open a merge's sources, the base first. An adapter opens on the base model, or,
    when the merge names none (a linear merge), on the model its config names."""
    order = ([base_model] if base_model else []) + [r for r in refs if r != base_model]
    base: Optional[SourceModel] = None
    named: dict[str, SourceModel] = {}
    out: list[SourceModel] = []
    for ref in order:
        if not is_adapter(ref, base_dir=base_dir):
            out.append(SourceModel.open(ref, allow_pickle=allow_pickle, base_dir=base_dir))
            if ref == base_model:
                base = out[-1]
            continue
        if ref == base_model:
            raise SourceError(f"{ref}: a LoRA adapter cannot be the base model; name the model it was trained on as base_model")
        on = base
        if on is None:
            path = resolve_model_path(ref, base_dir=base_dir)
            trained_on = _read_adapter_config(path).get("base_model_name_or_path")
            if not trained_on:
                raise SourceError(f"{ref}: a LoRA adapter needs the model it was trained on: set base_model (its config names none)")
            if trained_on not in named:
                named[trained_on] = SourceModel.open(str(trained_on), allow_pickle=allow_pickle, base_dir=path)
            on = named[trained_on]
        out.append(AdapterSource.open(ref, base=on, allow_pickle=allow_pickle, base_dir=base_dir))
    return out


# --------------------------------------------------------------------------- reading


def _read_adapter_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{file}: malformed JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{file}: expected a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise SourceError(f"{file}: peft_type {kind} is not supported (LoRA adapters only)")
    if config.get("use_dora"):
        raise SourceError(f"{file}: DoRA adapters (use_dora) are not supported: their update is not low-rank")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise SourceError(f"{file}: r must be a whole number of at least 1, got {config.get('r')!r}")
    return config


def _read_adapter_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_WEIGHTS
    if file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            return {k: handle.get_tensor(k) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise SourceError(f"{file}: not a readable safetensors file ({' '.join(str(exc).split())[:160]}); is it truncated?") from None
    pickled = path / ADAPTER_PICKLE
    if pickled.is_file():
        if not allow_pickle:
            raise SourceError(f"{pickled}: pickle checkpoint refused (it can run code when loaded); convert it to safetensors or pass --allow-pickle")
        try:
            return dict(torch.load(pickled, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - any load failure is the file's fault
            raise SourceError(f"{pickled}: cannot read pickle checkpoint: {' '.join(str(exc).split())[:160]}") from None
    raise SourceError(f"{path}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")


def _factors(ref: str, config: dict, state: dict[str, torch.Tensor], base: SourceModel) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()  # their update is (B @ A).T
    replaced: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$", key)
        if m is None:
            name = _base_name(key.replace(".modules_to_save.default", "").replace(".modules_to_save", ""))
            if name not in base._meta:
                raise SourceError(f"{ref}: adapter tensor {key} has no counterpart {name} in the base {base.ref}")
            if tuple(value.shape) != base.shape(name):
                raise SourceError(f"{ref}: adapter tensor {key} has shape {list(value.shape)}, the base's {name} has {list(base.shape(name))}: another base model?")
            replaced[name] = value
            continue
        module, part = m.group(1), m.group(2)
        pairs.setdefault(module, {})[part.replace("embedding_", "")] = value
        if "embedding" in part:
            embeddings.add(module)
    factors: dict[str, LoraFactors] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in sorted(pairs.items()):
        name = module + ".weight"
        if name not in base._meta:
            raise SourceError(f"{ref}: target module {module} is not in the base {base.ref} (no tensor {name}): another base model?")
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise SourceError(f"{ref}: target module {module} has no {missing} weights")
        a, b = parts["lora_A"], parts["lora_B"]
        transposed = module in embeddings or fan_in_fan_out
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise SourceError(f"{ref}: rank mismatch at {module}: lora_A is {list(a.shape)}, lora_B is {list(b.shape)} (A's rows must equal B's columns)")
        rank = a.shape[0]
        expected_rank = _pattern(config.get("rank_pattern") or {}, module, config["r"])
        if rank != expected_rank:
            raise SourceError(f"{ref}: rank mismatch at {module}: its factors have rank {rank}, adapter_config.json says r = {expected_rank}")
        out_in = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if tuple(base.shape(name)) != out_in:
            raise SourceError(f"{ref}: the update of {module} is {list(out_in)}, the base's {name} is {list(base.shape(name))}: another base model?")
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[name] = LoraFactors(a, b, float(scale), transposed)
    if not factors and not replaced:
        raise SourceError(f"{ref}: the adapter holds no LoRA factors")
    return factors, replaced


def _base_name(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def _pattern(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key names a module by its name's end, or as a regex."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _check_base_name(ref: str, config: dict, base: SourceModel) -> None:
    """Refuse an adapter that names another base: compared by the last path component
    (a hub id and a local copy of it agree)."""
    named = config.get("base_model_name_or_path")
    if not named:
        return
    mine = {Path(str(base.ref)).name.lower(), Path(str(base.path)).name.lower(), str(base.config.get("_name_or_path", "")).split("/")[-1].lower()}
    theirs = Path(str(named)).name.lower()
    if theirs and theirs not in mine:
        raise SourceError(f"{ref}: adapter_config.json says it was trained on {named!r}, but the base model is {base.ref}")

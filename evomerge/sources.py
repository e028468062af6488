"""Source models: find them, check them, read their tensors lazily.

A source is a local Hugging Face folder or a hub id. Weights are read from
``model.safetensors`` or a sharded ``model.safetensors.index.json``, memory-mapped and
tensor by tensor, so opening a 70B model costs nothing until a tensor is read and
several processes reading the same files share the page cache. Pickle checkpoints
(``.bin``, ``.pt``) can execute code when loaded and are refused unless the caller
passes ``allow_pickle=True``.

Example:
    >>> src = SourceModel.open("zoo/base")                 # doctest: +SKIP
    >>> src.tensor("model.embed_tokens.weight").shape      # doctest: +SKIP
    torch.Size([48, 64])
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from evomerge.errors import SourceError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.bin", "pytorch_model.pt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class SourceModel:
    """One source model: its folder, config and a lazy tensor index."""

    ref: str
    path: Path
    config: dict
    weight_map: dict[str, Path]  # tensor name -> file holding it
    pickle: bool = False
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _meta: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, repr=False)
    _pickled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        ref: str,
        *,
        allow_pickle: bool = False,
        base_dir: Optional[Path] = None,
    ) -> "SourceModel":
        """Find and index a model; raises SourceError with one line on any problem."""
        path = resolve_model_path(ref, base_dir=base_dir)
        config = _read_config(path)
        files, index_map, is_pickle = _index_weights(path, allow_pickle)
        src = cls(ref=ref, path=path, config=config, weight_map={}, pickle=is_pickle)
        src._read_headers(files, index_map)
        return src

    def _read_headers(self, files: list[Path], index_map: Optional[dict[str, Path]]) -> None:
        if self.pickle:
            for file in files:
                if not file.is_file():
                    raise SourceError(f"{self.ref}: shard {file.name} named in {PICKLE_INDEX} is missing")
                try:
                    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any load failure is the file's fault
                    raise SourceError(f"{file}: cannot read pickle checkpoint: {exc}") from None
                for name, t in state.items():
                    self.weight_map[name] = file
                    self._pickled[name] = t
                    self._meta[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            return
        from safetensors import SafetensorError, safe_open

        for file in files:
            if not file.is_file():
                raise SourceError(f"{self.ref}: shard {file.name} named in {SAFETENSORS_INDEX} is missing")
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as exc:
                raise SourceError(f"{file}: not a readable safetensors file ({_short(exc)}); is it truncated?") from None
            self._handles[file] = handle
            for name in names:
                if index_map is not None and index_map.get(name) != file:
                    continue  # the index decides which shard owns a tensor
                self.weight_map[name] = file
                sl = handle.get_slice(name)
                self._meta[name] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
        missing = [n for n in (index_map or {}) if n not in self._meta]
        if missing:
            raise SourceError(f"{self.ref}: tensor {missing[0]} listed in the index is not in its shard")

    # ------------------------------------------------------------------ reading
    @property
    def tensor_names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        return self._meta[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors: no copy until written to)."""
        if self.pickle:
            return self._pickled[name]
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except KeyError:
            raise SourceError(f"{self.ref}: no tensor named {name}") from None
        except Exception as exc:  # noqa: BLE001 - corrupt data surfaces here
            raise SourceError(f"{self.ref}: cannot read tensor {name} ({_short(exc)})") from None

    # ------------------------------------------------------------------ facts
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def tied_embeddings(self) -> bool:
        text_cfg = self.config.get("text_config", {}) if isinstance(self.config.get("text_config"), dict) else {}
        return bool(self.config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))

    @property
    def num_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return int(self.config[key])
        indices = {int(m.group(1)) for n in self._meta if (m := _LAYER.search(n))}
        return max(indices) + 1 if indices else 0

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


def check_model_folder(path: Path) -> None:
    """SourceError with one line for a local folder transformers could not load.

    The config must be a JSON object and the weights present (a pickle checkpoint
    counts: transformers reads it with ``weights_only``); safetensors headers must read,
    so a truncated download is named here, not in a loader's traceback.
    """
    _read_config(path)
    _, _, is_pickle = _index_weights(path, allow_pickle=True)
    if not is_pickle:
        SourceModel.open(str(path))


def check_tokenizer(path: Path, role: str) -> None:
    """SourceError unless the folder holds tokenizer files; ``role`` says who needs them."""
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise SourceError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model...); "
            f"{role} loads the tokenizer from this model: copy the tokenizer files of the model it came from"
        )
    for f in TOKENIZER_FILES:  # a cut-off download: named here, not in every worker's traceback
        file = Path(path) / f
        if f.endswith(".json") and file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SourceError(f"{file}: malformed JSON ({exc.msg if hasattr(exc, 'msg') else exc}); {role} loads the tokenizer from it") from None


def layer_index(tensor_name: str) -> Optional[int]:
    """Decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), None outside layers."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def resolve_model_path(ref: str, *, base_dir: Optional[Path] = None) -> Path:
    """Local folder for a model reference; downloads hub ids (weights, config, tokenizer)."""
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not Path(ref).is_absolute():
        candidates.append(base_dir / ref)
    for p in candidates:
        if p.is_dir():
            return p.resolve()
        if p.exists():
            raise SourceError(f"model {ref}: {p} is a file; expected a model folder")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _download(ref)
    raise SourceError(f"model not found: {ref} (no such folder)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo
        raise SourceError(f"model not found: {repo_id} is not a local folder; {_hub_reason(exc)}") from None
    return Path(folder)


def _hub_reason(exc: BaseException) -> str:
    """Why a hub download failed, in the words a user acts on."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return "the hub repository is gated: accept its terms on huggingface.co, then log in (`hf auth login` or HF_TOKEN)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "the hub has no such repository, or it is private (log in with `hf auth login` or HF_TOKEN)"
    if isinstance(exc, errors.LocalEntryNotFoundError):  # offline, or HF_HUB_OFFLINE=1, and not in the cache
        return "the hub cannot be reached and the model is not in the local cache (offline?); pass a local folder"
    return f"the hub download failed ({_short(exc)})"


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SourceError(f"{path}: no config.json; not a Hugging Face model folder")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{cfg}: malformed JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{cfg}: expected a JSON object")
    return data


def _index_weights(path: Path, allow_pickle: bool) -> tuple[list[Path], Optional[dict[str, Path]], bool]:
    """(weight files, name -> file map when an index gives one, is_pickle)."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        wm = _read_weight_map(index)
        return sorted(set(wm.values())), wm, False
    single = path / SAFETENSORS_SINGLE
    if single.is_file():
        return [single], None, False
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return loose, None, False
    found = [p for p in [path / PICKLE_INDEX] + [path / n for n in PICKLE_NAMES] if p.is_file()]
    if not found:
        raise SourceError(f"{path}: no model.safetensors, {SAFETENSORS_INDEX} or checkpoint found")
    if not allow_pickle:
        raise SourceError(
            f"{found[0]}: pickle checkpoint refused (it can run code when loaded); "
            "convert it to safetensors or pass --allow-pickle"
        )
    if found[0].name == PICKLE_INDEX:
        wm = _read_weight_map(found[0])
        return sorted(set(wm.values())), wm, True
    return [found[0]], None, True


def _read_weight_map(index: Path) -> dict[str, Path]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        return {str(name): index.parent / str(file) for name, file in wm.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SourceError(f"{index}: malformed index (expected a weight_map)") from None


def _st_dtype(code: str) -> str:
    return {
        "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    }.get(code, code.lower())


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


# --------------------------------------------------------------------------- checks


def check_compatible(sources: Sequence[SourceModel], names: Optional[Iterable[str]] = None) -> list[str]:
    """Check every source has the first one's architecture, tensors, shapes and dtypes.

    Returns the tensor names in the first source's order. The error names the first
    mismatching tensor and both shapes (or dtypes).
    """
    ref = sources[0]
    ref_names = list(names) if names is not None else ref.tensor_names
    for other in sources[1:]:
        if other.architecture != ref.architecture:
            raise SourceError(
                f"architecture mismatch: {ref.ref} is {ref.architecture}, {other.ref} is {other.architecture}"
            )
        for name in ref_names:
            if name not in other._meta:
                if name == "lm_head.weight" and other.tied_embeddings:
                    continue
                raise SourceError(f"tensor {name} is in {ref.ref} but missing from {other.ref}")
            if other.shape(name) != ref.shape(name):
                raise SourceError(
                    f"shape mismatch at tensor {name}: {ref.ref} has {list(ref.shape(name))}, "
                    f"{other.ref} has {list(other.shape(name))}"
                )
            if other.dtype(name) != ref.dtype(name):
                raise SourceError(
                    f"dtype mismatch at tensor {name}: {ref.ref} has {ref.dtype(name)}, {other.ref} has {other.dtype(name)}"
                )
        extra = [n for n in other.tensor_names if n not in set(ref_names)]
        if extra and not (extra == ["lm_head.weight"] and ref.tied_embeddings):
            raise SourceError(f"tensor {extra[0]} is in {other.ref} but missing from {ref.ref}")
    return ref_names

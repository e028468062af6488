"""Derived tensors (task vectors, sorted magnitudes, draws, ranks) shared through files.

Each kind of statistic for one source is one safetensors file under the cache folder,
written once (temp file, then rename) and read back with ``safe_open``, which maps
the file: every process on a node reads the same page-cache pages, so a worker added
to a search costs about one merged model of memory, not one copy of every task vector.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch


class SharedCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._handles: dict[Path, Any] = {}

    def path(self, kind: str, key: tuple) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
        return self.root / f"{kind}-{digest}.safetensors"

    def has(self, kind: str, key: tuple) -> bool:
        return self.path(kind, key).is_file()

    def get(self, kind: str, key: tuple, name: str) -> Optional[torch.Tensor]:
        """The cached tensor (memory-mapped), or None when this kind was not prepared."""
        from safetensors import safe_open

        path = self.path(kind, key)
        handle = self._handles.get(path)
        if handle is None:
            if not path.is_file():
                return None
            handle = safe_open(str(path), framework="pt", device="cpu")
            self._handles[path] = handle
        try:
            return handle.get_tensor(name)
        except Exception:  # noqa: BLE001 - a tensor the file lacks is simply not cached
            return None

    def save(self, kind: str, key: tuple, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(kind, key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

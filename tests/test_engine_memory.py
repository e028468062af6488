"""The engine's memory model: chunked merges equal whole-tensor merges, thresholds are
exact without a sorted copy, nothing of full-model size is kept, and the budget decides
what lives where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge._testing import llama_config, write_family
from evomerge.bench.merge import example_recipe
from evomerge.errors import ConfigError
from evomerge.merge import MergeEngine
from evomerge.merge._selection import LowBits, MagnitudeHistogram
from evomerge.merge.budget import MemoryBudget, parse_bytes, plan_placement
from evomerge.merge.methods import METHODS
from evomerge.sources import SourceModel

# float sums over chunks (pair sums, Gram matrices, masked norms) may differ in the last bits
ORDER_OF_SUMS = {"slerp", "nuslerp", "model_stock", "dare_ties", "dare_linear", "della", "della_linear"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    cfg = llama_config(hidden=48, intermediate=96, layers=3, vocab=64)
    return write_family(tmp_path_factory.mktemp("mem"), 3, seed=3, cfg=cfg, tokenizer=False)


def _merged(engine: MergeEngine, recipe) -> dict[str, torch.Tensor]:
    return {p.name: engine.merged_tensor(recipe, p) for p in engine.plan(recipe)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunked_merge_equals_the_whole_tensor_merge(method, family):
    """Chunks of 97 entries (rows and counter segments cut anywhere) give the same model."""
    sources = [SourceModel.open(str(f)) for f in family]
    recipe = example_recipe(method, str(family[0]), [str(f) for f in family[1:]], variant=2)
    whole = _merged(MergeEngine(sources, compile=False), recipe)
    chunked = _merged(MergeEngine(sources, compile=False, chunk_numel=97), recipe)
    for name, value in whole.items():
        if method in ORDER_OF_SUMS:
            assert torch.allclose(chunked[name], value, rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(chunked[name], value), name


def test_order_statistics_are_exact_for_awkward_magnitudes():
    """Ties, zeros, bfloat16-quantized values, tiny and huge scales: the k-th largest is
    the sorted tensor's, however the entries are split into chunks."""
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(5000, generator=g).abs(),
        torch.randn(5000, generator=g).abs().to(torch.bfloat16).float(),  # many exact ties
        torch.cat([torch.zeros(3000), torch.rand(2000, generator=g)]),
        (torch.randn(5000, generator=g) * 1e-30).abs(),  # subnormals share the lowest bins
        torch.full((5000,), 0.25),
        torch.randn(5000, generator=g).abs() * 1e30,
        torch.cat([torch.full((70_000,), 0.25), torch.rand(1000, generator=g)]),  # a bin of over LOW_BINS floor entries
        torch.cat([torch.full((70_000,), 0.2500001), torch.rand(1000, generator=g)]),  # over LOW_BINS above the floor: counted, not kept
        torch.cat([torch.full((3000,), 0.25), 0.25 + 0.001 * torch.rand(2000, generator=g)]),  # floor and above it in one bin
    ]
    for x in cases:
        pieces = list(torch.split(x, 7001))
        hist = MagnitudeHistogram.of(pieces)
        desc = torch.sort(x, descending=True).values
        n = x.numel()
        for rank in (1, 2, 100, n // 2, n - 1, n):
            b, inside = hist.locate(rank)
            at_floor = hist.floor_value(b, inside)
            if at_floor is not None:
                assert at_floor == float(desc[rank - 1]), (rank, float(desc[rank - 1]))
                continue
            low = LowBits()
            for p in pieces:
                low.add(p, b)
            assert low.value(b, inside) == float(desc[rank - 1]), (rank, float(desc[rank - 1]))


def test_ties_keeps_exactly_the_top_k_magnitudes(family):
    """With distinct magnitudes, TIES with one model and density d keeps int(d * n) entries
    of each tensor: the largest ones (mergekit's sort, without a sorted copy)."""
    sources = [SourceModel.open(str(f)) for f in family[:2]]
    recipe = example_recipe("ties", str(family[0]), [str(family[1])], variant=1)
    engine = MergeEngine(sources, chunk_numel=257)
    base, model = sources
    for plan in engine.plan(recipe):
        if not plan.inputs or "post_attention_layernorm" in plan.name:  # untouched: a zero task vector
            continue
        delta = model.tensor(plan.name).float() - base.tensor(plan.name).float()
        kept = (engine.merged_tensor(recipe, plan) - base.tensor(plan.name).float()) != 0
        k = max(1, int(plan.per_model[str(family[1])]["density"] * delta.numel()))
        assert int(kept.sum()) == k, plan.name
        assert float(delta.abs()[kept].min()) >= float(delta.abs()[~kept].max()), plan.name


def test_the_engine_keeps_nothing_of_full_model_size(family):
    """After merging every method, three candidates each, the engine holds statistics of
    a bounded size per tensor and model (magnitude histograms, norms, thresholds): no
    task vector, sorted copy or draw tensor, and no device copy on the CPU."""
    sources = [SourceModel.open(str(f)) for f in family]
    engine = MergeEngine(sources, chunk_numel=4096)
    for method in sorted(METHODS):
        for variant in range(3):
            recipe = example_recipe(method, str(family[0]), [str(f) for f in family[1:]], variant=variant)
            for p in engine.plan(recipe):
                engine.merged_tensor(recipe, p)
    held = _tensor_bytes(engine._stats) + 8 * len(engine._recent) + _tensor_bytes(engine._resident)
    per_tensor = len(sources[0].tensor_names) * (len(family) - 1)
    assert engine._resident == {}  # CPU: sources stay memory-mapped
    # per tensor and model: the non-empty bins of a magnitude histogram (about 12 KB here;
    # kept over the whole bin range they were 16 bytes x the ~16K bins from a task vector's
    # zeros up) and DARE's magnitude sums per draw level (4097 float64)
    assert held < 64 * 1024 * per_tensor, held


def _tensor_bytes(obj) -> int:
    seen = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            seen += x.numel() * x.element_size()
        elif isinstance(x, np.ndarray):
            seen += x.nbytes
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "__dict__"):
            stack.extend(vars(x).values())
    return seen


def test_placement_keeps_what_fits_on_the_gpu_and_streams_the_rest():
    gb = 10**9
    eight_b = 16_060_522_496  # Llama-3.1-8B in bfloat16
    p = plan_placement([("base", eight_b), ("a", eight_b), ("b", eight_b)], device="cuda", live_model_bytes=eight_b, n_models=2, device_total=80 * gb)
    assert p.budget_bytes == 60 * gb and p.resident == ["base", "a"] and p.streamed == ["b"]
    assert p.peak_bytes <= 60 * gb and "streamed from the host" in p.describe()
    roomy = plan_placement([("base", eight_b), ("a", eight_b), ("b", eight_b)], device="cuda", live_model_bytes=eight_b, n_models=2, device_total=141 * gb)
    assert roomy.streamed == [] and roomy.peak_bytes <= 0.75 * 141 * gb
    with pytest.raises(ConfigError, match="the live model alone is 141.1 GB"):
        plan_placement([("base", 2 * eight_b)], device="cuda", live_model_bytes=141_107_412_992, n_models=2, device_total=80 * gb)
    default = plan_placement([("base", 10**8)], device="cpu", live_model_bytes=10**8, n_models=3)
    tight = 10**8 + default.workspace_bytes // 2  # the live model and half the default workspace
    small = plan_placement([("base", 10**8)], device="cpu", live_model_bytes=10**8, n_models=3, budget=MemoryBudget(host=tight))
    assert small.chunk_numel == default.chunk_numel // 2 and small.peak_bytes <= tight
    with pytest.raises(ConfigError, match="memory.host"):
        plan_placement([("base", 10**8)], device="cpu", live_model_bytes=10**8, n_models=3, budget=MemoryBudget(host=10**8))


@pytest.mark.parametrize("text", ["", "abc", "-3GB", "0", "12 parsecs", "nan"])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(ConfigError, match="memory.device: .*size"):
        parse_bytes(text, "memory.device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_live_model_is_written_as_the_folder_a_merge_writes(dtype, family, tmp_path):
    """Front members are written from the worker's live model, not merged again: the folder
    holds the same tensors as `evomerge merge` of the recipe in that dtype."""
    from safetensors.torch import load_file

    from evomerge.bench.merge import live_model
    from evomerge.merge import Recipe

    sources = [SourceModel.open(str(f)) for f in family]
    data = example_recipe("ties", str(family[0]), [str(f) for f in family[1:]], variant=1).to_dict()
    recipe = Recipe.from_dict(dict(data, dtype=str(dtype).removeprefix("torch.")))
    engine = MergeEngine(sources, chunk_numel=1000)
    model = live_model(sources[0].config, dtype)
    engine.merge_into(model, recipe)
    live = engine.write_live(model, recipe, tmp_path / "live")
    merged = engine.write(recipe, tmp_path / "merged")
    assert live["n_tensors"] == merged["n_tensors"] and live["dtype"] == merged["dtype"]
    a, b = load_file(str(tmp_path / "live" / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "merge_recipe.yaml"):  # (the model card is titled by the folder name)
        assert (tmp_path / "live" / f).read_text() == (tmp_path / "merged" / f).read_text()

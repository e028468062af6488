"""The fused kernels stay compiled however many merge methods one process uses, and the
counter-based draws behind DARE and DELLA masks are uniform, repeatable and chunk-free."""

import os

import torch

from evomerge.merge import _kernels as K
from evomerge.merge._random import draws16, stream_key
from evomerge.merge.methods import nuslerp as N
from evomerge.merge.methods import slerp as S
from evomerge.merge.methods import task_arithmetic as T


def test_every_method_variant_is_compiled_not_dropped_to_eager(monkeypatch):
    """Dynamo runs a function eagerly after 8 compiled variants by default; a process
    that merges with every method (bench merge, the demo's baselines) needs more.
    Measured before the fix: della_linear, the 9th variant, 60-115x slower than della."""
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    monkeypatch.setattr(K, "_BACKEND", counting_backend)
    torch._dynamo.reset()
    kernels = K.Kernels(mode=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2048, generator=g)
    models = [base + torch.randn(2048, generator=g) for _ in range(3)]
    start = torch.tensor(5, dtype=torch.int32)
    key = torch.tensor(stream_key(0, 0, "w"), dtype=torch.int32)
    aux = {
        None: [],
        "magnitude": [torch.tensor(0.5)],
        "outliers": [torch.tensor(0.1), torch.tensor(2.0)],
        "random": [start, key, torch.tensor(30000, dtype=torch.int32)],
        "della": [start, key, torch.rand(2048, generator=g), torch.tensor(0.3), torch.tensor(0.2)],
    }
    weights = K.scalars([0.3, 0.5, 0.2])
    variants = [(kind, consensus, normalize) for kind in aux for consensus in (False, True) for normalize in (False, True)]
    assert len(variants) > 8
    for kind, consensus, normalize in variants:
        before = len(graphs)
        out = torch.empty_like(base)
        a = [aux[kind]] * 3
        kernels.run(T.task_vector_into, base.numel(), out, base, models, a, weights, None, torch.tensor(1.0), kind, consensus, normalize)
        eager = T.task_vector_kernel(base, models, a, weights, None, torch.tensor(1.0), kind, consensus, normalize)
        assert torch.allclose(out, eager, atol=1e-6), (kind, consensus, normalize)
        assert len(graphs) > before, f"variant {(kind, consensus, normalize)} ran eagerly"
    assert not kernels._failed
    torch._dynamo.reset()


def test_spherical_weights_match_the_tensor_formulas():
    """slerp and flattened nuslerp are merged as ca * a + cb * b from three sums; the
    weights reproduce the tensor formulas, collinear and opposite pairs included."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 30, generator=g)
    cases = [torch.randn(40, 30, generator=g), 2.5 * a, -a, a + 1e-3 * torch.randn(40, 30, generator=g)]
    for b in cases:
        aa, bb, ab = K.pair_sums_kernel(a.double(), b.double(), None).tolist()
        for t in (0.0, 0.3, 0.5, 1.0):
            ca, cb = N.nuslerp_weights(t, aa, bb, ab)
            if b is not cases[2]:  # exactly opposite: ill-posed, float32 rounding decides the tensor formula
                assert torch.allclose(ca * a + cb * b, N.nuslerp(t, a, b, flatten=True), atol=1e-5), t
            ca, cb = S.slerp_weights(t, aa, bb, ab)
            v0, v1 = a.reshape(-1).double(), b.reshape(-1).double()
            cos = float(v0 @ v1 / (v0.norm() * v1.norm()))
            if abs(cos) > 0.9995:
                assert (ca, cb) == (1 - t, t)
            else:
                theta = torch.acos(torch.tensor(cos, dtype=torch.float64))
                assert abs(ca - float(torch.sin((1 - t) * theta) / torch.sin(theta))) < 1e-9


def test_draws_are_uniform_independent_and_the_same_however_a_tensor_is_cut():
    n = 1 << 20
    positions = torch.arange(n, dtype=torch.int32)
    a = draws16(positions, stream_key(0, 0, "t"))
    assert int(a.min()) >= 0 and int(a.max()) < 65536
    counts = torch.bincount(a >> 12, minlength=16).double()  # 16 equal bins
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 50, chi2  # 15 degrees of freedom: 50 is far in the tail
    pieces = torch.cat([draws16(positions[i : i + 1000], stream_key(0, 0, "t")) for i in range(0, 5000, 1000)])
    assert torch.equal(pieces, a[:5000])
    others = [draws16(positions, stream_key(1, 0, "t")), draws16(positions, stream_key(0, 1, "t"), half=1), draws16(positions, stream_key(0, 2, "t")), draws16(positions, stream_key(0, 0, "u"))]
    for b in others:  # another seed, model position or tensor: unrelated draws
        assert abs(float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([a[:-1].double(), a[1:].double()]))[0, 1])) < 0.01


def test_compiled_kernels_go_to_the_shared_cache_even_after_transformers_set_its_default(monkeypatch):
    """Importing a transformers model makes inductor write its temp-folder default into
    TORCHINDUCTOR_CACHE_DIR; the engine's shared cache still wins, a user's own folder too."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from evomerge.merge import _kernels

    for preset, expected in ((default_cache_dir(), str(_kernels.SHARED_CACHE)), (None, str(_kernels.SHARED_CACHE)), ("/data/my-cache", "/data/my-cache")):
        if preset is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", preset)
        _kernels._use_shared_cache.cache_clear()
        _kernels._use_shared_cache()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == expected
    _kernels._use_shared_cache.cache_clear()

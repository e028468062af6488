"""The fused kernels stay compiled however many merge methods one process uses."""

import torch

from evomerge.merge import _kernels as K


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
    base = torch.randn(64, 32, generator=g)
    deltas = [torch.randn(64, 32, generator=g) for _ in range(3)]
    draws = torch.randint(0, 256, (2, 64, 32), dtype=torch.uint8, generator=g)
    aux = {
        None: [],
        "magnitude": [torch.tensor(0.5)],
        "outliers": [torch.tensor(0.1), torch.tensor(2.0)],
        "random": [draws, torch.tensor(30000.0)],
        "della": [draws, torch.rand(64, 32, generator=g), torch.tensor(0.3), torch.tensor(0.2)],
    }
    weights = [torch.tensor(w) for w in (0.3, 0.5, 0.2)]
    variants = [(kind, consensus, normalize) for kind in aux for consensus in (False, True) for normalize in (False, True)]
    assert len(variants) > 8
    for kind, consensus, normalize in variants:
        before = len(graphs)
        out = torch.empty_like(base)
        a = [aux[kind]] * 3
        kernels.run(K.task_vector_into, base.numel(), out, base, deltas, a, weights, None, torch.tensor(1.0), kind, consensus, normalize)
        eager = K.task_vector_kernel(base, deltas, a, weights, None, torch.tensor(1.0), kind, consensus, normalize)
        assert torch.allclose(out, eager, atol=1e-6), (kind, consensus, normalize)
        assert len(graphs) > before, f"variant {(kind, consensus, normalize)} ran eagerly"
    assert not kernels._failed
    torch._dynamo.reset()


def test_spherical_weights_match_the_tensor_formulas():
    """slerp and flattened nuslerp are merged as ca * a + cb * b from three sums; the
    weights reproduce the tensor formulas, collinear and opposite pairs included."""
    from evomerge.merge import methods as M

    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 30, generator=g)
    cases = [torch.randn(40, 30, generator=g), 2.5 * a, -a, a + 1e-3 * torch.randn(40, 30, generator=g)]
    for b in cases:
        aa, bb, ab = M.pair_sums(a.double(), b.double()).tolist()
        for t in (0.0, 0.3, 0.5, 1.0):
            ca, cb = M.nuslerp_weights(t, aa, bb, ab)
            if b is not cases[2]:  # exactly opposite: ill-posed, float32 rounding decides the tensor formula
                assert torch.allclose(ca * a + cb * b, M.nuslerp(t, a, b, flatten=True), atol=1e-5), t
            ca, cb = M.slerp_weights(t, aa, bb, ab)
            v0, v1 = a.reshape(-1).double(), b.reshape(-1).double()
            cos = float(v0 @ v1 / (v0.norm() * v1.norm()))
            if abs(cos) > 0.9995:
                assert (ca, cb) == (1 - t, t)
            else:
                theta = torch.acos(torch.tensor(cos, dtype=torch.float64))
                assert abs(ca - float(torch.sin((1 - t) * theta) / torch.sin(theta))) < 1e-9

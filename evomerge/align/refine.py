"""Learned refinement: the permutations of B whose midpoint with A works best.

Similarity matching (weight, activation, mudsc) pairs units that look alike; a merge
needs something else, that the blended model works. On two independently trained
models the two differ: the zoo's bases keep their full midpoint barrier after mudsc,
although permutations exist that halve it. Refinement searches for those directly,
with the straight-through estimator of Git Re-Basin (Ainsworth et al., ICLR 2023,
"learning permutations"):

- a free float copy ``W`` of B's weights starts at the aligned B;
- each step projects ``W`` onto B's permutations (weight matching of B to ``W``,
  warm-started from the last projection) and scores a blend
  ``(1 - t) * A + t * P(B)`` on a batch, next-token loss;
- the gradient is taken as if the blend used ``W`` itself (straight through the
  projection) and moves ``W`` with Adam.

Which blends are trained is ``blend``, after the merges the alignment is for:

``midpoint``   t = 0.5 for every tensor: the midpoint of the straight path, where
               ``interpolate`` and ``bench align`` measure the barrier;
``path``       one t drawn from [0, 1] each step: the whole straight path;
``layerwise``  (default) one t per layer (and one for the embeddings, final norm and
               head) drawn each step: the per-layer weightings a search explores.

The answer is always a permutation of B (its outputs are unchanged). The start is
scored at the midpoint on held-out batches, and so is the projection every
``check_every`` steps; the best one is kept, so refinement never returns a worse
midpoint (on those batches) than the alignment it started from.

Memory: A, B, ``W``, its gradient and Adam's two moments, all float32: six copies of
the model. Time: a forward and backward pass of the model and one weight-matching
pass per step.

Example:
    >>> import torch, transformers
    >>> from evomerge._testing import llama_config
    >>> from evomerge.align.permutation import LlamaSpec, identity_permutations
    >>> cfg = transformers.LlamaConfig(**llama_config(layers=1))
    >>> a, b = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    >>> spec = LlamaSpec.from_config(cfg.to_dict())
    >>> batches = [{"input_ids": torch.randint(0, cfg.vocab_size, (4, 12))} for _ in range(4)]
    >>> res = refine_permutations(spec, a, a.state_dict(), b.state_dict(), identity_permutations(spec), batches, steps=4)
    >>> res.best_loss <= res.start_loss
    True
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch.func import functional_call

from evomerge.align.data import Batch, split_batches
from evomerge.align.lm_loss import next_token_targets
from evomerge.align.matching import match_permutations
from evomerge.align.permutation import LlamaSpec, Permutations, apply_permutations, tensor_role
from evomerge.run_config import DEFAULT_REFINE_LR as DEFAULT_LR, REFINE_BLENDS as BLENDS  # one home: the run config

State = Mapping[str, torch.Tensor]
DEFAULT_STEPS = 500


def blend_weights(names: Sequence[str], blend: str, generator: torch.Generator) -> dict[str, float]:
    """Each tensor's t for one step of ``blend`` (see the module docstring).

    >>> g = torch.Generator().manual_seed(0)
    >>> names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    >>> set(blend_weights(names, "midpoint", g).values()), len(set(blend_weights(names, "path", g).values()))
    ({0.5}, 1)
    >>> t = blend_weights(names, "layerwise", g)
    >>> t[names[1]] == t[names[2]], len(set(t.values()))       # one t per layer, another for the embeddings
    (True, 3)
    """
    if blend == "midpoint":
        return dict.fromkeys(names, 0.5)
    if blend == "path":
        return dict.fromkeys(names, float(torch.rand((), generator=generator)))
    group = {n: tensor_role(n)[1] for n in names}  # layer index; None for the embeddings, final norm and head
    ts = {g: float(torch.rand((), generator=generator)) for g in dict.fromkeys(group.values())}
    return {n: ts[group[n]] for n in names}


@dataclass
class RefineResult:
    """The best permutations found, and how the held-out midpoint loss went."""

    permutations: Permutations
    steps: int
    start_loss: float  # held-out loss of the blend at the start permutations
    best_loss: float
    best_step: int  # 0 when no step beat the start
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss) at each check
    seconds: float = 0.0
    blend: str = "layerwise"

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "start_loss": round(self.start_loss, 6),
            "best_loss": round(self.best_loss, 6),
            "best_step": self.best_step,
            "blend": self.blend,
            "seconds": round(self.seconds, 3),
        }


def refine_permutations(
    spec: LlamaSpec,
    model: torch.nn.Module,
    a: State,
    b: State,
    start: Permutations,
    batches: Sequence[Batch],
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    blend: str = "layerwise",
    check_every: int = 50,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> RefineResult:
    """Refine ``start`` (B's permutations into A's order) so that ``blend`` merges have low loss.

    ``model`` is any module of the pair's architecture (its own weights are not used
    or changed); ``batches`` are token batches (``labels`` of -100 leave a position
    out, as in transformers); one in four is held out to pick the best step.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not batches:
        raise ValueError("no batches to refine on")
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r} (known: {', '.join(BLENDS)})")
    batches = [bt for bt in batches if next_token_targets(bt)[1].any()]  # a batch with no token to score has no loss
    if not batches:
        raise ValueError("no tokens to score in the batches (every position is masked out)")
    begin = time.perf_counter()
    fit, held = split_batches(batches)
    names = [n for n, _ in model.named_parameters()]  # a tied head appears once, as the embedding
    a32 = {n: a[n].float() for n in names}
    b32 = {n: x.float() for n, x in b.items()}
    perms = copy.deepcopy(start)
    projected = apply_permutations(b32, spec, perms)
    free = {n: projected[n].clone().requires_grad_(True) for n in names}
    opt = torch.optim.Adam(free.values(), lr=lr)
    was_training = model.training
    model.eval()  # no dropout: the loss must see the model as it will be used

    def loss_of(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        logits = functional_call(model, params, args=(), kwargs={"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}).logits
        target, keep = next_token_targets(batch)
        return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep])

    @torch.no_grad()
    def held_loss(state: State) -> float:
        params = {n: torch.lerp(a32[n], state[n], 0.5) for n in names}
        return sum(float(loss_of(params, bt)) for bt in held) / len(held)

    best_loss = start_loss = held_loss(projected)
    best, best_step = copy.deepcopy(perms), 0
    history = [(0, start_loss)]
    order = torch.Generator().manual_seed(seed)  # batch order
    draw = torch.Generator().manual_seed(seed + 1)  # blend weights
    queue: list[int] = []
    try:
        for step in range(1, steps + 1):
            if not queue:
                queue = torch.randperm(len(fit), generator=order).tolist()
            batch = fit[queue.pop()]
            # straight through: the forward pass uses the projection, the gradient reaches W
            ts = blend_weights(names, blend, draw)
            params = {n: torch.lerp(a32[n], free[n] + (projected[n] - free[n]).detach(), ts[n]) for n in names}
            loss = loss_of(params, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                target = {n: free[n].detach() for n in names}
                target.update({n: projected[n] for n in b32 if n not in target})  # a tied head: follows the embedding
                perms = match_permutations(spec, target, b32, alpha=1.0, init=perms, max_passes=3).permutations
                projected = apply_permutations(b32, spec, perms)
            if step % check_every == 0 or step == steps:
                value = held_loss(projected)
                history.append((step, value))
                if value < best_loss:
                    best_loss, best, best_step = value, copy.deepcopy(perms), step
                if log is not None:
                    log(f"refine step {step}/{steps}: held-out midpoint loss {value:.4g} (start {start_loss:.4g}, best {best_loss:.4g})")
    finally:
        model.train(was_training)
    return RefineResult(best, steps, start_loss, best_loss, best_step, history, time.perf_counter() - begin, blend)

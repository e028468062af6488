"""An offline family of small models to merge: one base, one specialist per skill.

``zoo(DIR)`` builds, deterministically and without any network, a family of tiny
Llama models in Hugging Face format with a character-level fast tokenizer:

- ``DIR/base``: pretrained briefly on a generic mix of all skills (asked in lower case);
- ``DIR/<skill>``: one specialist per skill (``add``, ``reverse``, ``sort``, ``count``),
  fine-tuned from ``base`` on that skill asked as an upper-case instruction;
- ``DIR/base_alt``: a second base, same data and recipe, another random init (the
  pair ``base`` / ``base_alt`` is for alignment);
- ``DIR/data/<skill>/{train,validation,test}.jsonl``: the skills' splits;
- ``DIR/zoo.json``: the manifest: recipe fingerprint, models, the test accuracy table.

Each specialist is best at its own skill and poor at the others, and the uniform
average of the specialists falls well below each specialist on its skill, while a
weighted merge can keep several skills: merging is a real problem here.

A second call with the same recipe reuses the folder; a changed recipe rebuilds it.
A folder remembers the fields its recipe changed from the default (``zoo.json``'s
``"changes"``), so a later call that names no recipe reuses it as it is.
The folder is written under a temporary name and renamed when complete.

Example::

    >>> from evomerge.zoo import zoo
    >>> z = zoo("zoo")                        # doctest: +SKIP
    >>> z.models["add"], z.data_file("add", "test")    # doctest: +SKIP
    >>> print(format_table(z.table))          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

from evomerge._paths import check_folder_target
from evomerge._zoo_data import SKILLS, SPLITS, held_out_inputs, make_splits, pretrain_stream, read_jsonl, write_jsonl
from evomerge.errors import ConfigError
from evomerge.io import atomic_folder

ZOO_FORMAT = 1
MANIFEST = "zoo.json"
BASE, BASE_ALT, AVERAGE = "base", "base_alt", "uniform average"


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that decides the zoo's bytes; its fingerprint names a build."""

    skills: tuple[str, ...] = ("add", "reverse", "sort", "count")
    # model: a tiny Llama
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 192
    max_positions: int = 64
    # base pretraining on the generic mix (weights per skill)
    mix: tuple[tuple[str, float], ...] = (("add", 3.0), ("reverse", 2.0), ("sort", 2.0), ("count", 1.0))
    base_steps: int = 1000
    base_lr: float = 3e-3
    base_batch: int = 64
    warmup: int = 50
    # specialists
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    finetune_batch: int = 64
    # data
    train_size: int = 5000
    validation_size: int = 500
    test_size: int = 500
    # seeds
    data_seed: int = 0
    pretrain_seed: int = 1
    base_seed: int = 0
    base_alt_seed: int = 1
    finetune_seed: int = 2

    def fingerprint(self) -> str:
        blob = json.dumps({"format": ZOO_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}

    def changes(self) -> dict[str, Any]:
        """The fields that differ from the default recipe (JSON-ready).

        >>> ZooRecipe(hidden=128).changes()
        {'hidden': 128}
        """
        default = asdict(ZooRecipe())
        return {k: v for k, v in json.loads(json.dumps(asdict(self))).items() if json.loads(json.dumps(default[k])) != v}

    @classmethod
    def from_changes(cls, changes: Any) -> Optional["ZooRecipe"]:
        """The default recipe with ``changes`` applied; None when they no longer fit it.

        >>> ZooRecipe.from_changes({"hidden": 128, "mix": [["add", 1.0]]}).mix
        (('add', 1.0),)
        """
        default = cls()
        known = {f.name for f in fields(cls)}
        if not isinstance(changes, dict) or not set(changes) <= known:
            return None
        # JSON turned the tuples into lists; give each field back the type of its default
        tupled = lambda v: tuple(tupled(x) for x in v) if isinstance(v, list) else v  # noqa: E731
        values = {k: tupled(v) for k, v in changes.items()}
        if any(type(values[k]) is not type(getattr(default, k)) for k in values):
            return None
        return replace(default, **values)

    def with_overrides(self, pairs: list[str]) -> "ZooRecipe":
        """This recipe with ``FIELD=VALUE`` changes (numbers only), checked.

        >>> ZooRecipe().with_overrides(["hidden=128", "intermediate=384"]).hidden
        128
        """
        numeric = {f.name: type(getattr(self, f.name)) for f in fields(self) if type(getattr(self, f.name)) in (int, float)}
        changes: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in numeric:
                raise ConfigError(f"zoo --set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(numeric)}")
            try:
                value = numeric[key](raw.strip()) if numeric[key] is float else int(raw.strip())
            except ValueError:
                raise ConfigError(f"zoo --set {pair!r}: {key} takes a{'n integer' if numeric[key] is int else ' number'}") from None
            if value <= 0 and not key.endswith("seed"):
                raise ConfigError(f"zoo --set {pair!r}: {key} must be positive")
            changes[key] = value
        out = replace(self, **changes)
        if out.hidden % out.heads or (out.hidden // out.heads) % 2:
            raise ConfigError(f"zoo --set: hidden {out.hidden} must be heads {out.heads} times an even head size (rotary embeddings)")
        return out


@dataclass
class Zoo:
    """A built zoo folder: where its models and data are, and its accuracy table."""

    root: Path
    fingerprint: str
    skills: list[str]
    models: dict[str, Path]  # name -> folder: base, base_alt and one per skill
    table: dict[str, dict[str, float]]  # model -> skill -> test exact match
    build_seconds: float
    reused: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.models[BASE]

    def preset(self, skill: str) -> str:
        """The evaluator preset scoring a skill: ``zoo_<skill>``, or ``real_<skill>`` for
        the real family (:mod:`evomerge.real_zoo`)."""
        return f"{'real' if self.manifest.get('real') else 'zoo'}_{skill}"

    @property
    def specialists(self) -> dict[str, Path]:
        return {s: self.models[s] for s in self.skills}

    def data_file(self, skill: str, split: str) -> Path:
        return self.root / "data" / skill / f"{split}.jsonl"

    def examples(self, skill: str, split: str) -> list[dict]:
        return read_jsonl(self.data_file(skill, split))


# ----------------------------------------------------------------------------- public
def default_zoo_dir() -> Path:
    """Where tests and benchmarks keep a shared zoo: ``$EVOMERGE_ZOO_CACHE``, else
    ``.cache/zoo`` in the repository (git-ignored), else ``~/.cache/evomerge/zoo``."""
    env = os.environ.get("EVOMERGE_ZOO_CACHE")
    if env:
        return Path(env)
    from evomerge._presets import PROJECT_ROOT

    if (PROJECT_ROOT / "pyproject.toml").is_file():
        return PROJECT_ROOT / ".cache" / "zoo"
    return Path.home() / ".cache" / "evomerge" / "zoo"


def zoo(
    directory: str | Path,
    *,
    recipe: Optional[ZooRecipe] = None,
    rebuild: bool = False,
    progress: bool = True,
    workers: Optional[int] = None,
) -> Zoo:
    """Build the zoo in ``directory`` (or reuse it when it already holds this recipe).

    With no ``recipe``, the folder's own (the default plus the changes it was built
    with) when it holds a zoo, else the default.
    ``workers`` training processes run side by side (default: 2, or 1 on one core);
    every model is trained on one thread, so the bytes do not depend on it.
    """
    root = Path(directory)
    found = None if rebuild and recipe is not None else load_zoo(root, quiet=True)
    if recipe is None:
        recipe = (ZooRecipe.from_changes(found.manifest.get("changes", {})) if found else None) or ZooRecipe()
    for name in recipe.skills:
        if name not in SKILLS:
            raise ConfigError(f"zoo recipe: unknown skill {name!r} (known: {', '.join(SKILLS)})")
    if not rebuild:
        if found is not None and found.fingerprint == recipe.fingerprint():
            found.reused = True
            return found
    check_folder_target(root, "zoo folder")
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise ConfigError(f"{root}: exists, is not empty and holds no {MANIFEST}; choose another folder")
    return _build(root, recipe, progress=progress, workers=workers)


def load_zoo(directory: str | Path, *, quiet: bool = False) -> Optional[Zoo]:
    """The zoo in ``directory`` from its manifest; None (or an error) when incomplete."""
    root = Path(directory).absolute()
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        models = {k: root / v for k, v in manifest["models"].items()}
        complete = all((p / "model.safetensors").is_file() for p in models.values()) and all(
            (root / "data" / s / f"{sp}.jsonl").is_file() for s in manifest["skills"] for sp in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    if not complete:
        if quiet:
            return None
        raise ConfigError(f"{root}: not a complete zoo (run `evomerge zoo {root}`)")
    return Zoo(
        root=root,
        fingerprint=manifest["fingerprint"],
        skills=list(manifest["skills"]),
        models=models,
        table=manifest["table"],
        build_seconds=float(manifest.get("build_seconds", 0.0)),
        manifest=manifest,
    )


def format_table(table: dict[str, dict[str, float]], skills: Optional[list[str]] = None) -> str:
    """Plain-text table: one row per model, one column per skill (test exact match)."""
    skills = skills or list(next(iter(table.values())))
    first = max(len("model"), *(len(m) for m in table))
    cols = [max(7, len(s)) for s in skills]
    lines = ["  ".join(["model".ljust(first)] + [s.rjust(w) for s, w in zip(skills, cols)])]
    lines.append("  ".join(["-" * first] + ["-" * w for w in cols]))
    for model, row in table.items():
        lines.append("  ".join([model.ljust(first)] + [f"{row[s]:.3f}".rjust(w) for s, w in zip(skills, cols)]))
    return "\n".join(lines)


def write_task_data(dest: str | Path, recipe: Optional[ZooRecipe] = None, splits: tuple[str, ...] = ("validation", "test")) -> list[Path]:
    """Write the skills' held-out splits as ``dest/<skill>/<split>.jsonl`` (shipped under evaluators/)."""
    recipe = recipe or ZooRecipe()
    written = []
    for name in recipe.skills:
        data = make_splits(SKILLS[name], recipe.sizes(), recipe.data_seed)
        for split in splits:
            path = Path(dest) / name / f"{split}.jsonl"
            write_jsonl(path, data[split])
            written.append(path)
    return written


# ----------------------------------------------------------------------------- build
def _build(root: Path, recipe: ZooRecipe, *, progress: bool, workers: Optional[int]) -> Zoo:
    start = time.perf_counter()
    root = root.absolute()
    with atomic_folder(root, overwrite=True) as tmp:  # a reader never sees half a zoo
        splits = {name: make_splits(SKILLS[name], recipe.sizes(), recipe.data_seed) for name in recipe.skills}
        for name, data in splits.items():
            for split, rows in data.items():
                write_jsonl(tmp / "data" / name / f"{split}.jsonl", rows)
        jobs = [(BASE, _train_base, (recipe, recipe.base_seed, str(tmp / BASE)), recipe.base_steps)]
        jobs.append((BASE_ALT, _train_base, (recipe, recipe.base_alt_seed, str(tmp / BASE_ALT)), recipe.base_steps))
        stage2 = [
            (name, _train_specialist, (recipe, name, str(tmp / BASE), str(tmp / "data" / name / "train.jsonl"), str(tmp / name)), recipe.finetune_steps)
            for name in recipe.skills
        ]
        logs = _run_jobs([jobs, stage2], progress=progress, workers=workers)
        table = _accuracy_table(tmp, recipe, splits)
        seconds = time.perf_counter() - start
        manifest = {
            "format": ZOO_FORMAT,
            "fingerprint": recipe.fingerprint(),
            "recipe": asdict(recipe),
            "changes": recipe.changes(),
            "skills": list(recipe.skills),
            "models": {BASE: BASE, BASE_ALT: BASE_ALT, **{s: s for s in recipe.skills}},
            "alignment_pair": [BASE, BASE_ALT],
            "prompts": {s: {"generic": SKILLS[s].generic_prompt("<input>"), "instruction": SKILLS[s].prompt("<input>"), "about": SKILLS[s].description} for s in recipe.skills},
            "table": table,
            "losses": logs,
            "build_seconds": round(seconds, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    out = load_zoo(root)
    assert out is not None
    return out


def _run_jobs(stages: list[list[tuple]], *, progress: bool, workers: Optional[int]) -> dict[str, list[float]]:
    """Run each stage's jobs, side by side in worker processes when there are two cores.

    Workers are plain ``python -m evomerge._zoo_worker`` processes (not
    multiprocessing: nothing depends on how the caller's main module is written), kept
    for every stage so that torch is imported once per worker.
    """
    n = workers if workers is not None else min(2, os.cpu_count() or 1)
    logs: dict[str, list[float]] = {}
    bar = _Bar(progress, [(name, steps) for stage in stages for name, _, _, steps in stage])
    with bar:
        if n <= 1:
            for stage in stages:
                for name, fn, args, _ in stage:
                    logs[name] = fn(*args, report=bar.advance)
        else:
            with _WorkerPool(min(n, max(len(s) for s in stages))) as pool:
                for stage in stages:
                    logs.update(pool.run(stage, bar))
    return logs


class _WorkerPool:
    """Training processes fed one job at a time on stdin; progress and results on stdout."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> "_WorkerPool":
        import queue
        import subprocess
        import sys
        import threading

        self.events: queue.Queue = queue.Queue()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs = []
        for i in range(self.n):
            proc = subprocess.Popen(
                [sys.executable, "-m", "evomerge._zoo_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            self.procs.append(proc)
            threading.Thread(target=self._pump, args=(i, proc), daemon=True).start()
        return self

    def _pump(self, i: int, proc: Any) -> None:
        for line in proc.stdout:  # one reader per worker: a quiet one never blocks the others
            self.events.put((i, line.rstrip("\n")))
        self.events.put((i, None))

    def run(self, stage: list[tuple], bar: "_Bar") -> dict[str, list[float]]:
        todo = list(stage)
        busy: dict[int, str] = {}
        logs: dict[str, list[float]] = {}
        while todo or busy:
            for i in range(self.n):
                if todo and i not in busy:
                    name, fn, args, _ = todo.pop(0)
                    spec = {"job": fn.__name__, "args": [asdict(a) if isinstance(a, ZooRecipe) else a for a in args]}
                    self.procs[i].stdin.write(json.dumps(spec) + "\n")
                    self.procs[i].stdin.flush()
                    busy[i] = name
            i, line = self.events.get()
            if line is None:
                err = (self.procs[i].stderr.read() or "").strip().splitlines()
                raise RuntimeError(f"zoo: training {busy.get(i, 'worker')} failed: {err[-1] if err else self.procs[i].wait()}")
            if line.startswith("step ") and i in busy:
                bar.advance(busy[i], int(line.split()[1]))
            elif line.startswith("done "):
                logs[busy.pop(i)] = json.loads(line[5:])
        return logs

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a stuck worker is killed, not waited for
                proc.kill()


class _Bar:
    """One progress task per model (training steps), reported as evomerge.progress events."""

    def __init__(self, enabled: bool, tasks: list[tuple[str, int]]):
        from evomerge.progress import task

        self.tasks = {name: task(name, steps, enabled=enabled) for name, steps in tasks}

    def __enter__(self) -> "_Bar":
        for t in self.tasks.values():
            t.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for t in self.tasks.values():
            t.__exit__(*exc)

    def advance(self, name: str, n: int) -> None:
        self.tasks[name].advance(n)



# ----------------------------------------------------------------------------- jobs
def _new_model(recipe: ZooRecipe, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    from evomerge._zoo_model import model_config

    torch.manual_seed(seed)
    cfg = model_config(recipe.hidden, recipe.layers, recipe.heads, recipe.intermediate, recipe.max_positions)
    return LlamaForCausalLM(cfg).float()


def _one_thread():
    import torch

    class _Ctx:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)  # the same bytes on any machine

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)

    return _Ctx()


def _train_base(recipe: ZooRecipe, seed: int, out: str, report: Optional[Callable] = None) -> list[float]:
    from evomerge._zoo_model import batches_of, build_tokenizer, save, train

    with _one_thread():
        splits = {n: make_splits(SKILLS[n], recipe.sizes(), recipe.data_seed) for n in recipe.skills}
        stream = pretrain_stream(dict(recipe.mix), recipe.pretrain_seed, held_out_inputs(splits))
        model = _new_model(recipe, seed)
        name = BASE if seed == recipe.base_seed else BASE_ALT
        losses = train(model, batches_of(stream, recipe.base_batch), steps=recipe.base_steps, lr=recipe.base_lr, warmup=recipe.warmup, on_step=_ticker(report, name))
        save(model, build_tokenizer(), Path(out))
    return losses


def _train_specialist(recipe: ZooRecipe, skill: str, base: str, train_file: str, out: str, report: Optional[Callable] = None) -> list[float]:
    import torch
    from transformers import LlamaForCausalLM

    from evomerge._zoo_model import batches_from, build_tokenizer, save, train

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with _one_thread():
        rows = [(r["prompt"], r["answer"]) for r in read_jsonl(Path(train_file))]
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        losses = train(
            model,
            batches_from(rows, recipe.finetune_batch, recipe.finetune_seed),
            steps=recipe.finetune_steps,
            lr=recipe.finetune_lr,
            warmup=min(recipe.warmup, recipe.finetune_steps // 5),
            on_step=_ticker(report, skill),
        )
        save(model, build_tokenizer(), Path(out))
    return losses


def _ticker(report: Optional[Callable], name: str) -> Optional[Callable[[int], None]]:
    if report is None:
        return None
    return lambda step: report(name, step)


# ----------------------------------------------------------------------------- table
def _accuracy_table(root: Path, recipe: ZooRecipe, splits: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, float]]:
    """Test exact match of every model on every skill, plus the specialists' uniform average."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from evomerge._zoo_model import exact_match

    hf_logging.disable_progress_bar()
    tests = {s: [(r["prompt"], r["answer"]) for r in splits[s]["test"]] for s in recipe.skills}
    table: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name in [BASE, BASE_ALT, *recipe.skills]:
            model = LlamaForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()
            table[name] = {s: round(exact_match(model, tests[s]), 4) for s in recipe.skills}
        states = [load_file(str(root / s / "model.safetensors")) for s in recipe.skills]
        avg = {k: sum(sd[k] for sd in states) / len(states) for k in states[0]}
        model.load_state_dict(avg)
        table[AVERAGE] = {s: round(exact_match(model, tests[s]), 4) for s in recipe.skills}
    return table

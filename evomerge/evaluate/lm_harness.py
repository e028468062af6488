"""The ``lm_eval`` evaluator: lm-evaluation-harness tasks on the live model.

The model is wrapped by lm-eval's ``HFLM`` as it is (nothing is saved or copied), so
each call scores the current weights. What does not depend on the model is done
once: the task index (``TaskManager``) at build time, the tasks and their data at the
first call; later calls only build requests and run the model.

Built-in tasks and task folders (``include_path``, relative to the evaluator file)
are both accepted. At build time, without any model, task names are looked up,
local data files named by a task's ``dataset_kwargs.data_files`` must exist, and the
fields its templates use must be columns of that data. Metric names are
``<task>/<metric>`` (``<task>/<metric>/<filter>`` for filters other than "none").

``limit`` keeps a fixed subset of each task's documents, chosen by ``seed`` (passed
to lm-eval as explicit sample indices, not as lm-eval's first-N ``limit``).

Example::

    kind: lm_eval
    tasks: [zoo_add]
    include_path: [zoo_tasks]
    batch_size: 256
"""

from __future__ import annotations

import functools

import json
import logging
from pathlib import Path
from typing import Any, Optional

from evomerge.config import Direction, Limit, LmEvalConfig
from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluate.base import Evaluator, subset_indices

_DEFAULT_METRICS = {
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
}
_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter"}


class LmEvalEvaluator(Evaluator):
    kind = "lm_eval"

    def __init__(self, config: LmEvalConfig, base_dir: Path, where: Optional[str] = None):
        self.config = config
        self.name = config.name or "lm_eval"
        self.where = where or self.name
        _quiet_lm_eval()
        self._include = [self._resolve_dir(p, base_dir) for p in config.include_path]
        self._manager = self._task_manager()
        self._groups: dict[str, dict] = {}
        self._entries = self._leaf_entries()
        self.metrics: dict[str, Direction] = {}
        for task, entry in self._entries.items():
            cfg = entry.cfg or {}
            self._check_data(task, cfg, entry.yaml_path)
            self.metrics.update(_static_metrics(task, cfg))
        for group, cfg in self._groups.items():
            self.metrics.update(_group_metrics(group, cfg))
        if config.metrics:
            unknown = [m for m in config.metrics if m not in self.metrics]
            if unknown:
                raise ConfigError(f"{self.where}: metrics: {unknown[0]!r} is not produced by these tasks (they produce: {', '.join(sorted(self.metrics))})")
            self.metrics = {m: self.metrics[m] for m in config.metrics}
        self._loaded: Optional[dict] = None
        self._lm: Any = None
        self._lm_key: Optional[tuple[int, int]] = None

    # ------------------------------------------------------------------ build
    def _resolve_dir(self, path: str, base_dir: Path) -> str:
        p = Path(path) if Path(path).is_absolute() else base_dir / path
        if not p.is_dir():
            raise ConfigError(f"{self.where}: include_path: folder not found: {p}")
        return str(p)

    def _task_manager(self) -> Any:
        """The task index: the include_path folders alone when they hold every task (fast);
        lm-eval's built-in tasks too otherwise (an index of thousands of files, built once
        per process and folders)."""
        defaults = self.config.include_defaults
        include = tuple(self._include or ())
        if defaults is None and include:
            tm = _task_index(include, False)
            if all(t in tm.task_index for t in self.config.tasks):
                return tm
        return _task_index(include, defaults is not False)

    def _leaf_entries(self) -> dict[str, Any]:
        """Every leaf task named directly or through a group or tag, with its index entry."""
        from lm_eval.tasks._index import Kind

        index = self._manager.task_index
        leaves: dict[str, Any] = {}

        def visit(name: str, via: str) -> None:
            entry = index.get(name)
            if entry is None:
                close = sorted(n for n in index if name.lower() in n.lower())[:5]
                hint = f" (did you mean: {', '.join(close)})" if close else ""
                raise ConfigError(f"{self.where}: tasks: unknown lm-eval task {name!r}{via}{hint}")
            if entry.kind == Kind.TAG:
                for child in sorted(entry.tags):
                    visit(child, f" (in tag {name!r})")
            elif entry.kind == Kind.GROUP:
                self._groups[name] = entry.cfg or {}
                for child in (entry.cfg or {}).get("task", []):
                    child_name = child if isinstance(child, str) else child.get("task") or child.get("group")
                    if isinstance(child_name, str) and child_name in index:
                        visit(child_name, f" (in group {name!r})")
                    else:
                        leaves.setdefault(f"{name}::{child_name}", entry)  # inline group member
            else:
                leaves[name] = entry

        for name in self.config.tasks:
            visit(name, "")
        return leaves

    def _check_data(self, task: str, cfg: dict, yaml_path: Optional[Path]) -> None:
        """Local data files exist and hold the fields the task's templates use."""
        files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) if isinstance(cfg.get("dataset_kwargs"), dict) else None
        if not files:
            return
        where = f"{self.where}: task {task}"
        paths = []
        items = files.items() if isinstance(files, dict) else [(None, files)]
        for _, value in items:
            for p in [value] if isinstance(value, str) else list(value):
                if "://" in str(p) or any(ch in str(p) for ch in "*?["):
                    continue
                candidates = [Path(p)] if Path(p).is_absolute() else [p2 for p2 in ((yaml_path.parent / p) if yaml_path else None, Path.cwd() / p) if p2]
                found = next((c for c in candidates if c.is_file()), None)
                if found is None:
                    raise ConfigError(f"{where}: data file not found: {candidates[0]}")
                paths.append(found)
        if self.config.split and isinstance(files, dict) and self.config.split not in files:
            raise ConfigError(f"{where}: split {self.config.split!r} has no data file (it has: {', '.join(files)})")
        columns = _columns(paths[0]) if paths else None
        if columns is None:
            return
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            template = cfg.get(key)
            if not isinstance(template, str) or template in columns:
                continue
            for var in sorted(_jinja_fields(template)):
                if var not in columns:
                    raise ConfigError(f"{where}: {key}: field {var!r} is not in the data (columns: {', '.join(columns)})")

    # ------------------------------------------------------------------ run
    def _tasks(self) -> dict:
        """lm-eval Task objects with their data, loaded at the first call and kept."""
        if self._loaded is None:
            c = self.config
            try:
                loaded = self._manager.load(list(c.tasks))
            except Exception as exc:  # noqa: BLE001 - a task that cannot load is the user's to fix
                raise EvaluationError(f"{self.where}: cannot load lm-eval tasks: {_first_line(exc)}") from None
            gen_kwargs = c.gen_kwargs
            if isinstance(gen_kwargs, str):
                from lm_eval.utils import simple_parse_args_string

                gen_kwargs = simple_parse_args_string(gen_kwargs)
            for name, task in loaded["tasks"].items():
                if c.split is not None:
                    if c.split not in task.dataset:
                        raise EvaluationError(f"{self.where}: task {name} has no split {c.split!r} (it has: {', '.join(task.dataset)})")
                    task.set_config(key="test_split", value=c.split)
                if gen_kwargs and task.get_config("output_type") == "generate_until":
                    task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
                if c.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=c.num_fewshot)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=c.seed)
                _memoize_requests(task)
            self._loaded = loaded
        return self._loaded

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        """lm-eval's HF wrapper around this very model object, made once per model."""
        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_key != key:
            c = self.config
            kwargs: dict[str, Any] = {"batch_size": c.batch_size}
            if c.max_batch_size is not None:
                kwargs["max_batch_size"] = c.max_batch_size
            if c.max_length is not None:
                kwargs["max_length"] = c.max_length
            self._lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, **kwargs)
            self._lm_model, self._lm_tokenizer = model, tokenizer  # keep ids from being reused
            self._lm_key = key
        return self._lm

    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[Limit] = None) -> dict[str, float]:
        import lm_eval.evaluator

        c = self.config
        loaded = self._tasks()
        lm = self._wrap(model, tokenizer)
        limit = limit if limit is not None else c.limit
        samples = None
        if limit is not None:
            samples = {}
            for name, task in loaded["tasks"].items():
                keep = subset_indices(len(task.eval_docs), limit, c.seed)
                samples[name] = keep if keep is not None else list(range(len(task.eval_docs)))
        was_training = getattr(model, "training", False)
        try:
            results = lm_eval.evaluator.evaluate(
                lm=lm,
                task_dict=loaded,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
                system_instruction=c.system_instruction,
                apply_chat_template=c.apply_chat_template,
                fewshot_as_multiturn=c.fewshot_as_multiturn,
            )
        finally:
            if was_training:
                model.train()
        return self._extract(results or {})

    def _extract(self, results: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for section in ("results", "groups"):
            for task, values in (results.get(section) or {}).items():
                for key, value in values.items():
                    if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                        continue
                    metric, filt = key.split(",", 1)
                    name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
                    if name in self.metrics or not self.config.metrics:
                        out[name] = float(value)
        missing = [m for m in self.metrics if m not in out]
        if missing:
            raise EvaluationError(f"{self.where}: lm-eval did not report {missing[0]!r} (it reported: {', '.join(sorted(out)) or 'nothing'})")
        return {m: out[m] for m in self.metrics}


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=8)
def _task_index(include: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _memoize_requests(task: Any, keep: int = 8) -> None:
    """Build a task's requests once per document subset and reuse them.

    lm-eval rebuilds every request at every call (rendering each document's
    templates); the requests depend only on the documents and the task config, never
    on the model, so later calls reuse them with their responses cleared. The model
    is still run at every call.
    """
    original = task.build_all_requests
    cache: dict[tuple, list] = {}

    def build_all_requests(*, samples: Any = None, limit: Any = None, **kwargs: Any) -> None:
        key = (
            tuple(samples) if samples is not None else None,
            limit,
            tuple(sorted((k, v) for k, v in kwargs.items() if k != "chat_template" and isinstance(v, (str, int, float, bool, type(None))))),
        )
        if key not in cache:
            original(samples=samples, limit=limit, **kwargs)
            if len(cache) >= keep:
                cache.pop(next(iter(cache)))
            cache[key] = list(task._instances)
        for inst in cache[key]:
            inst.resps = []
            inst.filtered_resps = {}
        task._instances = list(cache[key])

    task.build_all_requests = build_all_requests


def _quiet_hflm() -> type:
    """lm-eval's HFLM without per-call progress bars and with request token ids kept
    (a search makes thousands of calls on the same requests)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        _pairs: dict

        def _encode_pair(self, context: str, continuation: str) -> Any:
            # Token ids depend on the tokenizer only: computed once per request text.
            cache = self.__dict__.setdefault("_pairs", {})
            key = (context, continuation)
            if key not in cache:
                if len(cache) > 500_000:
                    cache.clear()
                cache[key] = super()._encode_pair(context, continuation)
            ctx, cont = cache[key]
            return list(ctx), list(cont)

        def loglikelihood(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _static_metrics(task: str, cfg: dict) -> dict[str, Direction]:
    """Metric names and directions from a task's YAML, as lm-eval will report them."""
    output_type = cfg.get("output_type") or "generate_until"
    metric_list = cfg.get("metric_list")
    pairs: list[tuple[str, Optional[bool]]] = []
    if metric_list:
        for m in metric_list:
            name = m.get("metric") if isinstance(m, dict) else None
            if isinstance(name, str):
                pairs.append((name, m.get("higher_is_better")))
    else:
        pairs = [(name, None) for name in _DEFAULT_METRICS.get(output_type, [])]
    filters = [f.get("name", "none") for f in (cfg.get("filter_list") or []) if isinstance(f, dict)] or ["none"]
    out: dict[str, Direction] = {}
    for name, higher in pairs:
        if higher is None:
            higher = _registry_higher_is_better(name)
        direction: Direction = "maximize" if higher else "minimize"
        for filt in filters:
            out[f"{task}/{name}" if filt == "none" else f"{task}/{name}/{filt}"] = direction
    return out


def _group_metrics(group: str, cfg: dict) -> dict[str, Direction]:
    """A group's aggregate metrics (``aggregate_metric_list``), as lm-eval reports them."""
    out: dict[str, Direction] = {}
    for m in cfg.get("aggregate_metric_list") or []:
        if not isinstance(m, dict) or not isinstance(m.get("metric"), str):
            continue
        filters = m.get("filter_list", ["none"])
        for filt in [filters] if isinstance(filters, str) else filters:
            higher = m.get("higher_is_better")
            if higher is None:
                higher = _registry_higher_is_better(m["metric"])
            out[f"{group}/{m['metric']}" if filt == "none" else f"{group}/{m['metric']}/{filt}"] = "maximize" if higher else "minimize"
    return out


def _registry_higher_is_better(metric: str) -> bool:
    try:
        from lm_eval.api.registry import is_higher_better

        value = is_higher_better(metric)
    except Exception:  # noqa: BLE001 - an unregistered metric: fall back to the name
        value = None
    return value if value is not None else metric not in _LOWER_IS_BETTER


def _jinja_fields(template: str) -> set[str]:
    if "{{" not in template and "{%" not in template:
        return set()
    import jinja2
    from jinja2 import meta

    try:
        return set(meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateSyntaxError:
        return set()


def _columns(path: Path) -> Optional[list[str]]:
    """Column names from the first record of a local JSON Lines, JSON or CSV file."""
    try:
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as fh:
                first = fh.readline().strip()
            if path.suffix == ".jsonl" or first.startswith("{"):
                row = json.loads(first)
                return list(row) if isinstance(row, dict) else None
            data = json.loads(path.read_text(encoding="utf-8"))
            return list(data[0]) if isinstance(data, list) and data and isinstance(data[0], dict) else None
        if path.suffix == ".csv":
            import csv

            with path.open(encoding="utf-8", newline="") as fh:
                return next(csv.reader(fh), None)
    except (OSError, ValueError):
        return None
    return None


class _DropExpectedWarnings(logging.Filter):
    """lm-eval warnings about what this evaluator does on purpose: wrapping a live
    model object, and loading the zoo tasks through ``custom_dataset``."""

    EXPECTED = (
        "Custom kwargs can be passed",
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


def _quiet_lm_eval() -> None:
    """lm-eval logs every request batch at INFO; a search calls it thousands of times."""
    logger = logging.getLogger("lm_eval")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        child = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedWarnings) for f in child.filters):
            child.addFilter(_DropExpectedWarnings())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]

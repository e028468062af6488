"""The ``dataset`` evaluator: a ``datasets`` dataset, a prompt template, batched scoring.

Modes and their metrics:

- ``generate`` (greedy decoding): ``exact_match`` (the answer, cut at ``stop``, equals
  the target), ``contains`` (the target occurs in it), ``regex_match`` (``regex``
  extracts the target from it: group 1, or the whole match).
- ``multiple_choice`` (log-likelihood of each choice given the prompt): ``acc``,
  ``acc_norm`` (log-likelihood per character of the choice).
- ``perplexity`` of the target given the prompt (of the prompt alone without a
  target), per token: lower is better.

When ``exact_match`` is the only metric, greedy decoding is replaced by one
teacher-forced forward pass over prompt + target + stop (+ the end-of-sequence token
when there is no stop; ``decoding: auto``): greedy decoding yields the target followed by
the stop exactly when each of those tokens is the argmax at its position, so the score is
the same, without a Python loop over generated tokens. That is token for token: with a
tokenizer that can spell the target in two ways (" DLV" as " D" + "LV" or " DL" + "V"),
a model that writes the other spelling is counted wrong. ``decoding: greedy`` compares
the text, as lm-eval does, at nearly the same cost for exact match alone: the same pass
gives each row's first greedy tokens (the target's while they are the argmax, then the
argmax), and only the rows whose text is still a start of target + stop decode on, each
until its text leaves the target or stops. With other metrics every row decodes to its end.

Everything that does not need a model happens at build time: the data is loaded, the
templates are checked against its columns, the texts are rendered. Token ids are
prepared once per tokenizer; the model is run afresh at every call.

Example::

    >>> from evomerge.evaluate import build_evaluator
    >>> ev = build_evaluator({"kind": "dataset", "data_files": {"test": "add.jsonl"},
    ...                       "split": "test", "mode": "generate",
    ...                       "prompt": "{prompt}", "target": "{answer}"})  # doctest: +SKIP
    >>> ev.metrics                                  # doctest: +SKIP
    {'exact_match': 'maximize'}
    >>> ev.evaluate(model, tokenizer, limit=100)    # doctest: +SKIP
    {'exact_match': 0.93}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from evomerge.config import DatasetConfig, Direction, Limit
from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluate import _generate, _scoring
from evomerge.evaluate._templates import fields, is_plain_field, render
from evomerge.evaluate.base import Evaluator, subset_indices

MODE_METRICS: dict[str, dict[str, Direction]] = {
    "generate": {"exact_match": "maximize", "contains": "maximize", "regex_match": "maximize"},
    "multiple_choice": {"acc": "maximize", "acc_norm": "maximize"},
    "perplexity": {"perplexity": "minimize"},
}
DEFAULT_METRICS = {"generate": ["exact_match"], "multiple_choice": ["acc", "acc_norm"], "perplexity": ["perplexity"]}
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DatasetEvaluator(Evaluator):
    kind = "dataset"

    def __init__(self, config: DatasetConfig, base_dir: Path, where: Optional[str] = None):
        self.config = config
        self.name = config.name or "dataset"
        self.where = where or self.name
        mode = config.mode
        wanted = config.metrics or DEFAULT_METRICS[mode]
        # reported name -> metric computed
        self._names = dict(wanted) if isinstance(wanted, dict) else {m: m for m in wanted}
        for m in self._names.values():
            if m not in MODE_METRICS[mode]:
                raise ConfigError(f"{self.where}: metrics: {mode} mode has no metric {m!r} (it has: {', '.join(MODE_METRICS[mode])})")
        self.metrics = {name: MODE_METRICS[mode][m] for name, m in self._names.items()}
        self._base = set(self._names.values())
        self._require_fields()
        rows = self._load(base_dir)
        self._check_templates(rows)
        self._render(rows)
        self._tokenizer: Any = None
        self._encoded: Any = None

    # ------------------------------------------------------------------ build
    def _require_fields(self) -> None:
        c, w = self.config, self.where
        if c.mode == "generate" and c.target is None:
            raise ConfigError(f"{w}: target: generate mode needs a target template")
        if c.mode == "multiple_choice" and (c.choices is None or c.label is None):
            raise ConfigError(f"{w}: {'choices' if c.choices is None else 'label'}: multiple_choice mode needs choices and label")
        if c.mode == "generate" and c.decoding == "teacher_forced" and self._base != {"exact_match"}:
            others = sorted(self._base - {"exact_match"})
            raise ConfigError(f"{w}: decoding: teacher_forced scores exact_match only, not {', '.join(others)} (use greedy or auto)")
        if "regex_match" in self._base and not c.regex:
            raise ConfigError(f"{w}: regex: the regex_match metric needs a regex")
        if c.regex:
            try:
                re.compile(c.regex)
            except re.error as exc:
                raise ConfigError(f"{w}: regex: {exc}") from None

    def _load(self, base_dir: Path) -> list[dict]:
        c, w = self.config, self.where
        path, data_files = c.path, c.data_files
        local = (base_dir / path) if not Path(path).is_absolute() else Path(path)
        if Path(path).suffix in _BUILDERS:  # a single data file named as the path
            if not local.is_file():
                raise ConfigError(f"{w}: path: data file not found: {local}")
            path, data_files = _BUILDERS[Path(path).suffix], {c.split: str(local)}
        elif local.is_dir() and path not in ("json", "csv", "parquet", "text"):
            path = str(local)
        if data_files is not None:
            data_files = _resolve_files(data_files, base_dir, w)
        elif path in ("json", "csv", "parquet", "text"):
            raise ConfigError(f"{w}: data_files: the {path} builder needs data files")
        if isinstance(data_files, dict) and c.split not in data_files:
            raise ConfigError(f"{w}: split: no data file for split {c.split!r} (data_files has: {', '.join(data_files)})")
        if isinstance(data_files, (str, list)):
            data_files = {c.split: data_files}
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(path, c.dataset_name, data_files=data_files, split=c.split)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{w}: split {c.split!r}: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - offline hub, bad files: one line for the user
            raise ConfigError(f"{w}: cannot load dataset {c.path!r}: {_first_line(exc)}") from None
        if len(ds) == 0:
            raise ConfigError(f"{w}: split {c.split!r} is empty")
        return ds.to_list()

    def _templates(self) -> dict[str, list[str]]:
        c = self.config
        out = {"prompt": [c.prompt]}
        if c.target is not None:
            out["target"] = [c.target]
        if c.label is not None:
            out["label"] = [c.label]
        if isinstance(c.choices, list):
            out["choices"] = list(c.choices)
        return out

    def _check_templates(self, rows: list[dict]) -> None:
        c, w = self.config, self.where
        columns = list(rows[0].keys())
        for key, templates in self._templates().items():
            for t in templates:
                try:
                    used = fields(t)
                except ValueError as exc:
                    raise ConfigError(f"{w}: {key}: {exc}") from None
                for f in sorted(used):
                    if f not in columns:
                        raise ConfigError(f"{w}: {key}: field {f!r} is not in the data (columns: {', '.join(columns)})")
        if isinstance(c.choices, str) and c.choices not in columns:
            raise ConfigError(f"{w}: choices: field {c.choices!r} is not in the data (columns: {', '.join(columns)})")

    def _render(self, rows: list[dict]) -> None:
        c, w = self.config, self.where
        try:
            self.prompts = [render(c.prompt, r) for r in rows]
            self.targets = [render(c.target, r) for r in rows] if c.target is not None else None
            if c.mode == "multiple_choice":
                self.choices = [list(map(str, r[c.choices])) if isinstance(c.choices, str) else [render(t, r) for t in c.choices] for r in rows]
                self.gold = [_gold(r, c.label, ch) for r, ch in zip(rows, self.choices)]
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{w}: a template cannot be filled from the data: {_first_line(exc)}") from None
        if c.mode == "multiple_choice":
            for i, (g, ch) in enumerate(zip(self.gold, self.choices)):
                if g is None or not 0 <= g < len(ch):
                    raise ConfigError(f"{w}: label: example {i} has no gold choice among {len(ch)} choices")
        self.size = len(self.prompts)

    # ------------------------------------------------------------------ tokens
    def _encode(self, tokenizer: Any) -> dict[str, Any]:
        """Token ids of every request, prepared once per tokenizer."""
        if tokenizer is self._tokenizer:
            return self._encoded
        c = self.config
        special = c.add_special_tokens
        enc: dict[str, Any] = {}
        if c.mode == "generate":
            # Greedy output, cut at max_new_tokens, equals the target exactly when the target
            # and then its end (stop string, else end-of-sequence) are the argmax tokens, up
            # to max_new_tokens: a target longer than that can never match.
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            forced, possible = [], []
            for p, t in zip(self.prompts, self.targets):
                ctx, target = _scoring.encode_pair(tokenizer, p, t, special)
                full = _scoring.encode_pair(tokenizer, p, t + c.stop, special)[1] if c.stop else target + eos
                possible.append(len(target) <= c.max_new_tokens)
                forced.append((ctx, full[: c.max_new_tokens]))
            enc["forced"], enc["forced_possible"] = forced, np.array(possible)
            enc["prompts"] = [_scoring.encode(tokenizer, p, special) for p in self.prompts]
        elif c.mode == "multiple_choice":
            enc["pairs"] = [[_scoring.encode_pair(tokenizer, p, ch, special) for ch in chs] for p, chs in zip(self.prompts, self.choices)]
        else:
            if self.targets is None:
                enc["pairs"] = [_scoring.encode_pair(tokenizer, "", p, special) for p in self.prompts]
            else:
                enc["pairs"] = [_scoring.encode_pair(tokenizer, p, t, special) for p, t in zip(self.prompts, self.targets)]
        self._tokenizer, self._encoded = tokenizer, enc
        return enc

    # ------------------------------------------------------------------ score
    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[Limit] = None) -> dict[str, float]:
        c = self.config
        keep = subset_indices(self.size, limit if limit is not None else c.limit, c.seed)
        idx = list(range(self.size)) if keep is None else keep
        enc = self._encode(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        was_training = getattr(model, "training", False)
        if was_training:
            model.eval()
        try:
            if c.mode == "generate":
                raw = self._generate(model, tokenizer, enc, idx, pad)
            elif c.mode == "multiple_choice":
                raw = self._multiple_choice(model, enc, idx, pad)
            else:
                raw = self._perplexity(model, enc, idx, pad)
            return {name: raw[m] for name, m in self._names.items()}
        finally:
            if was_training:
                model.train()

    def decoding_used(self) -> str:
        """How ``generate`` scores: ``teacher_forced`` (one pass, the target's tokens must
        be the argmax) or ``greedy`` (the text greedy decoding writes)."""
        c = self.config
        return "teacher_forced" if c.decoding == "teacher_forced" or (c.decoding == "auto" and self._base == {"exact_match"}) else "greedy"

    def _generate(self, model: Any, tokenizer: Any, enc: dict, idx: list[int], pad: int) -> dict[str, float]:
        c = self.config
        if self.decoding_used() == "teacher_forced":
            _, greedy, _ = _scoring.loglikelihoods(model, [enc["forced"][i] for i in idx], batch_size=c.batch_size, pad_id=pad)
            return {"exact_match": float((np.asarray(greedy, dtype=bool) & enc["forced_possible"][idx]).mean())}
        # exact match alone: one teacher-forced pass over the targets gives each row's first
        # greedy tokens; only rows whose text can still equal the target decode on
        checked = self._base == {"exact_match"}
        started = None
        if checked:
            best = _scoring.argmax_tokens(model, [enc["forced"][i] for i in idx], batch_size=c.batch_size, pad_id=pad)
            started = [_greedy_start(enc["forced"][i][1], b) for i, b in zip(idx, best)]
        stop_ids = _scoring.encode(tokenizer, c.stop, False) if c.stop else []
        eos = [stop_ids[0]] if len(stop_ids) == 1 else []
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        outs = _generate.greedy_generate(
            model,
            [enc["prompts"][i] for i in idx],
            max_new_tokens=c.max_new_tokens,
            batch_size=c.batch_size,
            pad_id=pad,
            eos_ids=eos,
            stop=c.stop or None,
            tokenizer=tokenizer,
            expected=[len(enc["forced"][i][1]) for i in idx],  # the target's tokens: long answers start first
            started=started,
            decided=self._cannot_match(idx) if checked else None,
        )
        texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
        scores: dict[str, list[float]] = {m: [] for m in self._base}
        pattern = re.compile(c.regex) if c.regex else None
        for i, text in zip(idx, texts):
            if c.stop and c.stop in text:
                text = text[: text.index(c.stop)]
            target = self.targets[i]
            if "exact_match" in scores:
                scores["exact_match"].append(float(text == target))
            if "contains" in scores:
                scores["contains"].append(float(target in text))
            if "regex_match" in scores:
                m = pattern.search(text)
                got = (m.group(1) if m.groups() else m.group(0)) if m else None
                scores["regex_match"].append(float(got == target))
        return {m: float(np.mean(v)) for m, v in scores.items()}

    def _cannot_match(self, idx: list[int]) -> Any:
        """``decided`` for exact match: row ``r``'s answer can no longer equal its target
        once its text is not a start of target + stop. Text that ends inside a character
        (a byte-level token's half) is never taken as settled."""
        ends = [self.targets[i] + (self.config.stop or "") for i in idx]

        def decided(r: int, text: str) -> bool:
            return not ends[r].startswith(text) and "\ufffd" not in text

        return decided

    def _multiple_choice(self, model: Any, enc: dict, idx: list[int], pad: int) -> dict[str, float]:
        c = self.config
        flat = [pair for i in idx for pair in enc["pairs"][i]]
        ll, _, _ = _scoring.loglikelihoods(model, flat, batch_size=c.batch_size, pad_id=pad)
        acc, acc_norm, at = [], [], 0
        for i in idx:
            k = len(self.choices[i])
            scores = ll[at : at + k]
            lengths = np.array([max(1, len(ch)) for ch in self.choices[i]], dtype=np.float64)
            acc.append(float(np.argmax(scores) == self.gold[i]))
            acc_norm.append(float(np.argmax(scores / lengths) == self.gold[i]))
            at += k
        return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}

    def _perplexity(self, model: Any, enc: dict, idx: list[int], pad: int) -> dict[str, float]:
        ll, _, counts = _scoring.loglikelihoods(model, [enc["pairs"][i] for i in idx], batch_size=self.config.batch_size, pad_id=pad)
        total = int(counts.sum())
        if total == 0:
            raise EvaluationError(f"{self.where}: no tokens to score")
        return {"perplexity": float(math.exp(-float(ll.sum()) / total))}


def _greedy_start(target: list[int], best: list[int]) -> list[int]:
    """The first tokens greedy decoding writes, from the argmax at each target position:
    the target's tokens while they are the argmax, then the argmax where one is not."""
    for j, (t, b) in enumerate(zip(target, best)):
        if t != b:
            return target[:j] + [b]
    return list(target)


def _resolve_files(files: Any, base_dir: Path, where: str) -> Any:
    """Data file paths relative to the evaluator file; a missing local file is an error."""

    def one(p: str) -> str:
        if "://" in p or p.startswith("hf:"):
            return p
        path = Path(p) if Path(p).is_absolute() else base_dir / p
        if any(ch in p for ch in "*?["):
            if not list(path.parent.glob(path.name)):
                raise ConfigError(f"{where}: data_files: no file matches {path}")
            return str(path)
        if not path.is_file():
            raise ConfigError(f"{where}: data_files: data file not found: {path}")
        return str(path)

    if isinstance(files, str):
        return one(files)
    if isinstance(files, list):
        return [one(f) for f in files]
    return {split: (one(v) if isinstance(v, str) else [one(x) for x in v]) for split, v in files.items()}


def _gold(row: dict, label: str, choices: list[str]) -> Optional[int]:
    value: Any = row[label[1:-1]] if is_plain_field(label) else render(label, row)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = str(value)
    if text in choices:
        return choices.index(text)
    if text.strip().lstrip("-").isdigit():
        return int(text.strip())
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]

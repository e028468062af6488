"""An lm-eval task over the same data as a ``dataset`` evaluator, for side-by-side timing.

The evaluator's rendered rows (prompt, choices and gold index, or prompt and target)
are written as JSONL next to a task YAML that names their columns, so lm-eval reads
exactly the texts evomerge scores: ``multiple_choice`` with an empty target delimiter
(the choices are the evaluator's own strings), or ``generate_until`` with the
evaluator's stop string and token limit, greedy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from evomerge.errors import ConfigError


def write_task(evaluator: Any, rows: Sequence[int], folder: Path, name: str) -> str:
    """Write ``folder/<name>.yaml`` and its data (rows ``rows`` of ``evaluator``); returns the task name."""
    c = evaluator.config
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    task: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "metadata": {"version": 1.0},
    }
    if c.mode == "multiple_choice":
        docs = [{"prompt": evaluator.prompts[i], "choices": evaluator.choices[i], "gold": evaluator.gold[i]} for i in rows]
        task.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="gold", target_delimiter="",
                    metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    elif c.mode == "generate":
        docs = [{"prompt": evaluator.prompts[i], "target": evaluator.targets[i]} for i in rows]
        until = [c.stop] if c.stop else []
        task.update(output_type="generate_until", doc_to_target="target", target_delimiter="",
                    generation_kwargs={"until": until, "max_gen_toks": c.max_new_tokens, "do_sample": False},
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    else:
        raise ConfigError(f"bench evaluate: {evaluator.where}: mode {c.mode!r} has no lm-eval counterpart here (multiple_choice or generate)")
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return name

"""The run handle: a run's study (the truth) and its folder (a local cache of it).

A :class:`Run` reads; it never opens a source model, builds an evaluator or looks for
a GPU, so ``status``, ``export`` of a front member, ``dashboard`` and the plots work on
any machine that reaches the storage, even one where the sources are gone.

Everything a resume needs lives in the study: the frozen run config and the number of
layers of the sources (study system attributes), the optimizer's state, the baseline
bookkeeping and one record per trial (:mod:`evomerge.record`). The folder holds
``config.yaml`` (a copy of the frozen config), ``run.json`` (the storage URL), the
Pareto models and the plots; :meth:`Run.from_storage` rebuilds it from the study alone.

Example:
    >>> run = Run.open("runs/demo")                                       # doctest: +SKIP
    >>> len(run.study().trials), [o.metric for o in run.objectives]       # doctest: +SKIP
    (100, ['reverse/accuracy', 'count/accuracy'])
    >>> run = Run.from_storage("postgresql://db/evomerge", "demo", runs_dir="elsewhere")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from evomerge import __version__
from evomerge.errors import ConfigError
from evomerge.io import write_json_atomic, write_text_atomic
from evomerge.run._storage import CONFIG_ATTR, LAYERS_ATTR, VERSION_ATTR, open_storage, set_system_attr, study_id, system_attrs
from evomerge.run_config import RunConfig, load_run_config, parse_run_config

CONFIG_NAME = "config.yaml"
META_NAME = "run.json"


class Run:
    """A run folder and its study, read without building anything."""

    def __init__(self, config: RunConfig, run_dir: Path, *, storage_url: Optional[str] = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.name = config.name or self.run_dir.name
        self.storage_url = storage_url
        self._storage: Any = None  # opened once: a journal file is replayed once, then read incrementally

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, run_dir: Path, *, storage: Optional[str] = None) -> "Run":
        """The run in ``run_dir`` (its ``config.yaml`` and ``run.json``); ``storage`` if it moved."""
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_NAME).is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_NAME}); runs are made by evomerge search")
        meta = json.loads((run_dir / META_NAME).read_text()) if (run_dir / META_NAME).is_file() else {}
        return cls(load_run_config(run_dir / CONFIG_NAME), run_dir, storage_url=storage or meta.get("storage"))

    @classmethod
    def from_storage(cls, url: str, study_name: str, *, runs_dir: Path = Path("runs")) -> "Run":
        """The run a storage holds, its folder (re)made as ``runs_dir/<study_name>`` from the study.

        An existing folder of that run is kept (its config must match the study's).
        """
        storage = open_storage(url, Path(runs_dir))
        sid = study_id(storage, study_name)
        if sid is None:
            raise ConfigError(f"storage {url} holds no study named {study_name!r}")
        frozen = system_attrs(storage, sid).get(CONFIG_ATTR)
        if frozen is None:
            raise ConfigError(f"study {study_name!r} in {url} was not made by evomerge search (it has no frozen run config)")
        run_dir = Path(runs_dir) / study_name
        if (run_dir / CONFIG_NAME).is_file():
            run = cls.open(run_dir, storage=url)
        else:
            run = cls(parse_run_config(frozen, where=f"study {study_name!r}"), run_dir, storage_url=url)
            run.write_folder()
        run._storage = storage
        return run

    def write_folder(self) -> None:
        """``run.json`` and ``config.yaml``, the latter last: it is what makes a folder a run."""
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / META_NAME, {"storage": self.storage_url, "evomerge": __version__})
        write_text_atomic(self.run_dir / CONFIG_NAME, yaml.safe_dump(self.frozen_config(), sort_keys=False))

    def frozen_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", exclude_none=True)

    # ------------------------------------------------------------------ storage
    def storage(self) -> Any:
        if self._storage is None:
            self._storage = open_storage(self.storage_url, self.run_dir)
        return self._storage

    def has_study(self) -> bool:
        return study_id(self.storage(), self.name) is not None

    def study(self) -> Any:
        """The run's study, loaded (ConfigError when the storage holds none of that name)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if not self.has_study():
            where = f"storage {self.storage_url}" if self.storage_url else f"{self.run_dir / 'study.journal'}"
            raise ConfigError(f"{self.run_dir}: {where} holds no study named {self.name!r} (another database than the run's?)")
        # A RandomSampler: loading a study to read it should not build a TPE sampler.
        return optuna.load_study(study_name=self.name, storage=self.storage(), sampler=optuna.samplers.RandomSampler())

    def attrs(self) -> dict[str, Any]:
        """The run-level facts of the study (frozen config, layers, version)."""
        sid = study_id(self.storage(), self.name)
        return {} if sid is None else system_attrs(self.storage(), sid)

    def freeze(self, *, num_layers: int) -> None:
        """Write the frozen config and the sources' layer count into the study."""
        storage = self.storage()
        sid = study_id(storage, self.name)
        assert sid is not None, "the study is created before it is frozen"
        set_system_attr(storage, sid, CONFIG_ATTR, self.frozen_config())
        set_system_attr(storage, sid, LAYERS_ATTR, int(num_layers))
        set_system_attr(storage, sid, VERSION_ATTR, __version__)

    def check_frozen(self) -> None:
        """Refuse a ``config.yaml`` edited since the study froze it (the study's is the run's)."""
        frozen = self.attrs().get(CONFIG_ATTR)
        if frozen is None:
            return  # a run made before the config lived in the study: its folder's config stands
        mine = self.frozen_config()
        for key in sorted(set(frozen) | set(mine)):
            if frozen.get(key) != mine.get(key):
                what = key.replace("_", " ")
                raise ConfigError(
                    f"{self.run_dir / CONFIG_NAME}: {what} no longer matches the study "
                    f"(the config frozen in it gives {json.dumps(frozen.get(key))[:120]}); a resume continues the run as it was made"
                )

    # ------------------------------------------------------------------ what the run is
    @property
    def objectives(self) -> list[Any]:
        from evomerge.objective import Objective

        return [Objective(o.metric, o.direction) for o in self.config.objectives]

    @property
    def constraints(self) -> list[Any]:
        from evomerge.pareto import Constraint

        return [Constraint(c.metric, c.min, c.max) for c in self.config.constraints]

    def archive(self, write_model: Any = None) -> Any:
        """The run's Pareto archive (``write_model`` writes missing member folders)."""
        from evomerge.pareto import ParetoArchive

        return ParetoArchive(self.run_dir, self.objectives, constraints=self.constraints, write_model=write_model)

    def space(self) -> Any:
        """The search space, built from the config and the layer count the study keeps."""
        from evomerge.dataflow import build_space

        num_layers = self.attrs().get(LAYERS_ATTR)
        if num_layers is None:
            raise ConfigError(f"{self.run_dir}: the study does not record the sources' layer count (made before evomerge kept it)")
        s = self.config.sources
        return build_space(self.config.search_space, base_model=s.base_model, models=s.models, num_layers=num_layers)

    def trials_done(self) -> int:
        """COMPLETE + PRUNED trials so far: what the trial budget counts."""
        from optuna.trial import TrialState

        if not self.has_study():
            return 0
        return len(self.study().get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

"""The Optuna storage of a run, and the run-level facts it keeps as study system attributes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from evomerge.errors import ConfigError

JOURNAL_NAME = "study.journal"
CONFIG_ATTR = "evomerge:config"  # the frozen run config (a JSON mapping)
LAYERS_ATTR = "evomerge:num_layers"  # of the sources: what the search space's layer groups are cut from
VERSION_ATTR = "evomerge:version"


def open_storage(url: Optional[str], run_dir: Path) -> Any:
    """The storage at ``url``, else the journal file in the run folder; one line when unreachable."""
    import optuna

    if url:
        try:
            return optuna.storages.get_storage(url)
        except Exception as exc:  # noqa: BLE001 - any connection problem is the URL's
            raise ConfigError(f"storage {url}: cannot be reached ({' '.join(str(exc).split())[:200]})") from None
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(run_dir) / JOURNAL_NAME)))


def study_id(storage: Any, name: str) -> Optional[int]:
    """The study's id in the storage, or None when it holds no study of that name."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def system_attrs(storage: Any, sid: int) -> dict[str, Any]:
    return storage.get_study_system_attrs(sid)


def set_system_attr(storage: Any, sid: int, key: str, value: Any) -> None:
    storage.set_study_system_attr(sid, key, value)

"""``evomerge dashboard``: optuna-dashboard on a run's storage, bound to loopback by default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def dashboard(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8080, storage: Optional[str] = None) -> None:
    """Serve the run's study (and its plot artifacts) until interrupted."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    from evomerge.plots import ARTIFACTS
    from evomerge.study import SearchRun

    run = SearchRun.open(run_dir, storage=storage)
    store_dir = Path(run.run_dir) / ARTIFACTS
    store_dir.mkdir(exist_ok=True)
    print(f"optuna-dashboard for run {run.name} on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    run_server(run.storage(), host=host, port=port, artifact_store=FileSystemArtifactStore(str(store_dir)))

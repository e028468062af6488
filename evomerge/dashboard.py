"""``evomerge dashboard``: optuna-dashboard on a run's storage, bound to loopback by default."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Optional

from evomerge.errors import ConfigError


def dashboard(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8080, storage: Optional[str] = None) -> None:
    """Serve the run's study (and its plot artifacts) until interrupted."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    from evomerge.plots import ARTIFACTS
    from evomerge.run.handle import Run

    run = Run.open(run_dir, storage=storage)  # the storage and the folder only: no model, no GPU
    _check_listen(host, port)
    store_dir = Path(run.run_dir) / ARTIFACTS
    store_dir.mkdir(exist_ok=True)
    print(f"optuna-dashboard for run {run.name} on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    run_server(run.storage(), host=host, port=port, artifact_store=FileSystemArtifactStore(str(store_dir)))


def _check_listen(host: str, port: int) -> None:
    """ConfigError in one line when the server could not listen there (port taken, bad host)."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: a port is between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            probe.bind(address)
    except OSError as exc:
        reason = "in use (another dashboard?); pick another --port" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None

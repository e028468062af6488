"""``--ray-address``: a search joins a Ray head that was started separately, on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge._testing import write_family
from evomerge.cli import main
from tests import _ray_evals

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(300)

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path, monkeypatch):
    """A Ray head (``ray start --head --block``) in a session of its own; stopped by its pids only.

    The head's token authentication matches this process's: a driver that joins by address
    sends a token only when RAY_AUTH_MODE=token, which an earlier local ``ray.init`` in the
    same process has set (and Ray keeps that mode for the life of the process).
    """
    if ray.is_initialized():
        ray.shutdown()
    mode = os.environ.get("RAY_AUTH_MODE") or "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=mode)
    log_path = tmp_path / "head.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(RAY_BIN), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard=false", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the Ray head did not come up:\n" + log_path.read_text()[-2000:])
            time.sleep(0.5)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_session(proc)
        log.close()


def stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM the ``ray start`` process (it stops its GCS, raylet and workers), then SIGKILL what is left of its session."""
    import psutil

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in psutil.process_iter() if _sid(p) == proc.pid]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _sid(p) -> int:
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return -1


def test_search_joins_a_running_cluster(head, tmp_path, capsys):
    """Acceptance 4: `search --ray-address` runs its trials on the head's workers, then leaves the head up."""
    fam = write_family(tmp_path / "fam", 2, seed=3)
    cfg = tmp_path / "search.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "sources": {"base_model": str(fam[0]), "models": [str(fam[1]), str(fam[2])]},
                "search_space": "task_arithmetic_global",
                "evaluators": [{"preset": str(_ray_evals.write_preset(tmp_path, fam))}],
                "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
                "optimizer": {"name": "random"},
                "budget": {"trials": 4},
                "keep_pareto_models": False,
            }
        )
    )
    code = main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--ray-address", head, "--workers", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_complete"] == 4
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "runs" / "search" / "study.journal")))
    trials = optuna.load_study(study_name="search", storage=storage).get_trials()
    ids = {t.user_attrs["worker_id"] for t in trials}
    assert ids and all(i.startswith("ray-") for i in ids)
    # the head's node ran them (Ray names a node by its interface address, even on loopback)
    node_ip = re.search(r"Local node IP: (\S+)", (tmp_path / "head.log").read_text()).group(1)
    assert {i.split("@")[1] for i in ids} == {node_ip}
    assert not ray.is_initialized()  # the executor disconnected ...
    up = subprocess.run([str(RAY_BIN), "status", "--address", head], capture_output=True, env=dict(os.environ), timeout=60)
    assert up.returncode == 0, up.stderr[-500:]  # ... and left the cluster running

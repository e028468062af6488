"""Find YAML presets (search spaces, evaluators) by name.

Presets live in the top-level ``search_spaces/`` and ``evaluators/`` folders of the
repository. A name resolves, in order, to a file path given as is, then to
``<kind>/<name>.yaml`` under the current directory, then under the installed
package's project root.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def preset_dirs(kind: str) -> list[Path]:
    """Folders searched for presets of ``kind`` ("evaluators" or "search_spaces")."""
    dirs = [Path.cwd() / kind, PROJECT_ROOT / kind]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available_presets(kind: str) -> list[str]:
    names = {p.stem for d in preset_dirs(kind) for p in d.glob("*.yaml")}
    return sorted(names)


def resolve_preset(name_or_path: str | Path, kind: str) -> Path:
    """Return the YAML file for a preset name or a path; one-line error otherwise."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{kind} file not found: {path}")
        return path
    for d in preset_dirs(kind):
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = ", ".join(available_presets(kind)) or "none"
    raise ConfigError(f"unknown {kind} preset {str(name_or_path)!r} (known: {known})")

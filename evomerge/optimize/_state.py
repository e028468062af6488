"""An optimizer's state kept in the study itself, so any machine can resume the search.

Optuna's own ``CmaEsSampler`` pickles its ES into trial system attributes; this does the
same for a whole study: the pickle is cut into text chunks (some storages cap one
attribute's length) written as study system attributes, and only then a pointer naming
them is written, in one call. A crash between the two leaves the pointer on the last
complete state; the chunks of the state before the last are blanked as the pointer moves
on, so a long search keeps two states in its storage, not one per generation.
"""

from __future__ import annotations

import base64
import pickle
import secrets
from typing import Any, Optional

_CHUNK = 2000  # characters per attribute: under every storage's limit
_PREFIX = "evomerge:optimizer_state"


def save_state(study: Any, state: Any, *, label: Any) -> None:
    """Pickle ``state`` into the study; ``label`` (a generation number, say) names its chunks."""
    storage, sid = study._storage, study._study_id
    label = f"{label}-{secrets.token_hex(4)}"  # never rewritten in place: a crash mid-write spoils no saved state
    text = base64.b64encode(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")
    chunks = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)] or [""]
    for i, chunk in enumerate(chunks):
        storage.set_study_system_attr(sid, f"{_PREFIX}:{label}:{i}", chunk)
    before = storage.get_study_system_attrs(sid).get(_PREFIX) or {}
    older = {"label": before["label"], "chunks": before["chunks"]} if before else None
    storage.set_study_system_attr(sid, _PREFIX, {"label": label, "chunks": len(chunks), "older": older})  # the commit point
    gone = before.get("older")
    if gone and gone["label"] not in (label, (older or {}).get("label")):  # two states back: no longer needed
        for i in range(gone["chunks"]):
            storage.set_study_system_attr(sid, f"{_PREFIX}:{gone['label']}:{i}", None)


def load_state(study: Any) -> Optional[Any]:
    """The last state saved in the study, or None."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    pointer = attrs.get(_PREFIX)
    if not pointer:
        return None
    text = "".join(attrs[f"{_PREFIX}:{pointer['label']}:{i}"] for i in range(pointer["chunks"]))
    return pickle.loads(base64.b64decode(text))

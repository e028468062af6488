#!/usr/bin/env bash
# Re-check parity with mergekit 0.1.5 from scratch: mergekit lives in its own
# environment (.venv-mergekit), never in evomerge's; it regenerates the expected
# tensors under tests/data/parity/ and compares evomerge against them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-mergekit
if [ ! -x "$VENV/bin/mergekit-yaml" ]; then
  python3 -m venv "$VENV"
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then "$VENV/bin/pip" install -q "$wheel"; fi
  "$VENV/bin/pip" install -q "mergekit==0.1.5"
fi
HF_HUB_OFFLINE=1 .venv/bin/python scripts/mergekit_parity.py --regenerate --mergekit "$VENV/bin/mergekit-yaml"

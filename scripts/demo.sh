#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the offline demo: train, predict, compare with the labeled-only baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mnsegment demo "$@"

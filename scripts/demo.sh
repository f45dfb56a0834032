#!/usr/bin/env bash
# The main job: install balsam into .venv (scripts/bootstrap.sh), then run a real campaign on this
# machine with the embedded server: `balsam demo` (see docs/quickstart.md). Extra arguments go to
# `balsam demo` (e.g. --num-jobs 200, --site-path DIR, --stop-agent).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/bootstrap.sh
# The launchers run MPI apps with the mpiexec installed into the virtualenv (MPICH from PyPI).
export PATH="$repo/.venv/bin:$PATH"
exec "$repo/.venv/bin/balsam" demo "$@"

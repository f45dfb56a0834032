#!/usr/bin/env bash
# The main job: install balsam into .venv (scripts/bootstrap.sh), then run a real campaign on this
# machine with the embedded server: `balsam demo` (see docs/quickstart.md). Extra arguments go to
# `balsam demo` (e.g. --num-jobs 200, --site-path DIR, --stop-agent).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# No `cd "$repo"`: `balsam demo` runs in the caller's directory, where a relative --site-path is
# meant (bootstrap.sh goes to the repository by itself).
# The first install downloads and builds for minutes with nothing on screen (pip's output goes to
# a log): say so, or the silence reads as a hang.
[ -x "$repo/.venv/bin/balsam" ] ||
    echo "demo: first run: installing into .venv takes a few minutes (pip's output: $repo/.venv/bootstrap.log)"
bash "$repo/scripts/bootstrap.sh"
# The launchers run MPI apps with the mpiexec installed into the virtualenv (MPICH from PyPI).
export PATH="$repo/.venv/bin:$PATH"
exec "$repo/.venv/bin/balsam" demo "$@"

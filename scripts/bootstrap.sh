#!/usr/bin/env bash
# Install balsam into ./.venv: the core (with its test tools) and every plugin folder under
# plugins/, all editable. With --with-test-plugins (scripts/test.sh) also the test plugin
# distributions under tests/fixtures/, which users of the main job should not see. Needs Python 3.11
# ($PYTHON, default python3.11) and network access to PyPI the first time. Idempotent: when nothing
# changed since the last run it returns in well under a second.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PYTHON="${PYTHON:-python3.11}"
venv="$repo/.venv"
with_test_plugins=0
[ "${1:-}" = "--with-test-plugins" ] && with_test_plugins=1

# Every folder with a pyproject.toml that belongs in the environment, core first.
targets=(".[test]")
folders=(plugins/*/)
[ "$with_test_plugins" = 1 ] && folders+=(tests/fixtures/*/)
for dir in "${folders[@]}"; do
    [ -f "$dir/pyproject.toml" ] && targets+=("${dir%/}")
done

# The stamp changes whenever a pyproject.toml changes or a plugin folder appears or goes away.
stamp_of() {
    {
        printf '%s\n' "${targets[@]}"
        cat pyproject.toml
        for t in "${targets[@]:1}"; do cat "$t/pyproject.toml"; done
    } | sha256sum | cut -d' ' -f1
}
# The installs are editable, so pip compiles none of balsam's own sources, and a process started
# with PYTHONDONTWRITEBYTECODE=1 (containers and CI often set it) cannot cache what it compiles:
# every launcher, agent, CLI call and Python run() job would compile each balsam module it imports,
# again (50-85 ms of CPU per run() job here: benchmarks/python_app_startup.py). Compile them here,
# as pip does for a regular install; on every run, since sources change under an editable install
# (an up-to-date file costs one stat). compileall -q prints only the files that fail.
compile_sources() {
    "$venv/bin/python" -m compileall -q core plugins >&2 ||
        echo "bootstrap: the sources above under core/ or plugins/ do not compile" >&2
}

stamp_file="$venv/.balsam-bootstrap-$with_test_plugins"
stamp="$(stamp_of)"
if [ -x "$venv/bin/balsam" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
    compile_sources
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || { echo "bootstrap: $PYTHON not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    echo "bootstrap: creating $venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$venv"
fi

echo "bootstrap: installing ${targets[*]} into $venv"
log="$venv/bootstrap.log"
args=()
for t in "${targets[@]}"; do args+=(-e "$t"); done
# Build back-ends are chatty (deprecation notices); keep their output in a log, show it on failure.
if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip setuptools wheel &&
       "$venv/bin/python" -m pip install --disable-pip-version-check "${args[@]}"; } >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "bootstrap: pip failed (full output in $log)" >&2
    exit 1
fi
compile_sources
"$venv/bin/balsam" --version >/dev/null
echo "$stamp" > "$stamp_file"
echo "bootstrap: done ($("$venv/bin/balsam" --version))"

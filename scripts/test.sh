#!/usr/bin/env bash
# The test suite, all of it (slow real-system tests included): install (scripts/bootstrap.sh),
# make sure PostgreSQL runs with a `balsam_test` database and Chromium is installed (the dashboard's
# browser test), install sshd (the rsync-over-ssh tests) and start the CI Slurm cluster when its
# script is present, both when we are root, then run pytest (which also builds the docs with
# `mkdocs build --strict`), on 3 pytest-xdist workers unless test paths are given (see the end).
# Arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/bootstrap.sh --with-test-plugins

export BALSAM_TEST_DATABASE_URL="${BALSAM_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/balsam_test}"
export PATH="$repo/.venv/bin:$PATH"   # mpiexec (MPICH wheel) and balsam
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }
pg_ok() { psql "postgresql://postgres@127.0.0.1:5432/postgres" -tAc "select 1" >/dev/null 2>&1; }

# -- PostgreSQL (127.0.0.1:5432, user postgres, trust auth) ------------------------------------
apt_updated=0
apt_install() {  # apt_install PACKAGE...: Debian packages, the package lists refreshed once per run
    if [ "$apt_updated" = 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "test.sh: installing PostgreSQL"
    apt_install postgresql
fi
# -- Chromium: the dashboard's browser test drives Debian's headless Chromium with Playwright ------
# (Playwright's own browser download is never used: the test points it at /usr/bin/chromium.)
if ! command -v chromium >/dev/null 2>&1; then
    echo "test.sh: installing chromium"
    apt_install chromium
fi
# -- OpenSSH's sshd: the rsync transfer backend is tested over real ssh, to a private sshd the tests
# start on 127.0.0.1 (tests/transfers/test_builtin_backends.py). Only the program is wanted: a
# policy-rc.d denies the package's service start for the install, so no system sshd is left
# running. Not fatal: without it those tests are skipped, and the same backend still runs through
# a fake remote shell.
if [ ! -x /usr/sbin/sshd ] && [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing openssh-server (for /usr/sbin/sshd; its service is not started)"
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1; fi
    apt_install openssh-server || echo "test.sh: could not install openssh-server; the rsync-over-ssh tests will be skipped" >&2
    if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
fi
pg_version="$(ls /etc/postgresql | sort -V | tail -1)"
if ! pg_ok; then
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        echo "test.sh: starting PostgreSQL $pg_version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
        for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
    if ! pg_ok; then
        # A fresh Debian cluster wants passwords on TCP; the tests use trust on localhost only.
        hba="/etc/postgresql/$pg_version/main/pg_hba.conf"
        echo "test.sh: allowing trust auth for 127.0.0.1 in $hba (test machine)"
        as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
        sleep 1
    fi
    pg_ok || { echo "test.sh: cannot connect to PostgreSQL at 127.0.0.1:5432 as postgres" >&2; exit 1; }
fi
# The suite keeps its live test servers (uvicorn, several workers each) until the session ends, and
# both xdist workers' servers plus the PostgreSQL race tests' two-worker servers held PostgreSQL's
# default 100 connections late in a full run ("sorry, too many clients already"). A cluster this
# script manages gets room for them (a restart: max_connections is read at start only).
pg_max="$(psql "postgresql://postgres@127.0.0.1:5432/postgres" -tAc "show max_connections")"
if [ "${pg_max:-0}" -lt 300 ] && [ -d "/etc/postgresql/$pg_version/main" ]; then
    echo "test.sh: max_connections $pg_max -> 300 (restarting PostgreSQL $pg_version)"
    psql "postgresql://postgres@127.0.0.1:5432/postgres" -qc "ALTER SYSTEM SET max_connections = 300" >/dev/null
    if as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main restart; then
        for _ in $(seq 1 30); do pg_ok && break; sleep 1; done
    else
        echo "test.sh: could not restart PostgreSQL; max_connections stays $pg_max" >&2
    fi
    pg_ok || { echo "test.sh: cannot connect to PostgreSQL at 127.0.0.1:5432 as postgres" >&2; exit 1; }
fi
db="${BALSAM_TEST_DATABASE_URL##*/}"
if [ "$(psql "postgresql://postgres@127.0.0.1:5432/postgres" -tAc "select 1 from pg_database where datname='$db'")" != 1 ]; then
    psql "postgresql://postgres@127.0.0.1:5432/postgres" -qc "create database \"$db\"" >/dev/null
fi

# -- Slurm (a real single-host cluster, started by the shared CI script) --------------------------
slurm_script="$repo/../shared/ci/start-slurm.sh"
if [ -f "$slurm_script" ] && [ "$(id -u)" = 0 ]; then
    bash "$slurm_script" >/tmp/balsam-start-slurm.log 2>&1 || {
        echo "test.sh: start-slurm.sh failed; its output:" >&2; tail -40 /tmp/balsam-start-slurm.log >&2; exit 1; }
    # The CI cluster has no GPU GRES; the Perlmutter GRES tests start a private one-node cluster of
    # their own beside it (4 GPUs on char devices, its own ports 6917/17101-17102, munge auth), so
    # they run here rather than skip (tests/platforms/test_perlmutter_slurm_gres_real.py, ~35 s).
    if pgrep -x munged >/dev/null 2>&1; then
        export BALSAM_TEST_GRES_SLURM="${BALSAM_TEST_GRES_SLURM:-start}"
    fi
fi

# -- pytest, on 3 pytest-xdist workers for the whole suite -------------------------------------------
# Three on the CI's 2 cores: many tests wait on processes, servers, schedulers and timers rather than
# compute (2 workers kept the CPUs 1-4 runnable, often idle); a third fills that time. The whole run
# took 1,330 s against 1,973 s with 2 workers (pytest 1,268 s against 1,908 s; quiet 2-core VM,
# 7 December), with the same tests passing.
# Each worker has its own servers, databases (balsam_test_<pid>_*) and tmp dirs; the real-Slurm tests
# all run on one worker, one after another (XDIST_GROUPS in tests/conftest.py). With test paths
# (`scripts/test.sh tests/server/test_jobs.py`) pytest runs in this process, which starts sooner.
# BALSAM_TEST_WORKERS=N sets the number of workers either way (0 or 1: none; `auto`: one per CPU);
# with -n, --dist, -p no:xdist, --pdb or --trace among the arguments, pytest gets them as they are
# (give `-n N --dist loadgroup` to keep the real-Slurm tests on one worker).
workers="${BALSAM_TEST_WORKERS:-}"
user_chooses=0
for arg in "$@"; do
    case "$arg" in
        -n|-n*|--numprocesses|--numprocesses=*|--dist|--dist=*|no:xdist|-pno:xdist|--pdb|--trace) user_chooses=1 ;;
        -*) ;;
        *) if [ -z "$workers" ] && [ -e "${arg%%::*}" ]; then workers=1; fi ;;  # a test path
    esac
done
workers="${workers:-3}"
xdist=()
if [ "$user_chooses" = 0 ] && [ "$workers" != 0 ] && [ "$workers" != 1 ]; then
    xdist=(-n "$workers" --dist loadgroup)   # N, or pytest-xdist's `auto`
fi
exec "$repo/.venv/bin/pytest" ${xdist[@]+"${xdist[@]}"} "$@"

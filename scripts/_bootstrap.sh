# Sourced by scripts/test, scripts/serve and scripts/bench: make .venv with the package and its
# test extras (and defines service_venv and default_sandbox_python, below). Idempotent and quick.

# The interpreter: CPython 3.12 where the machine has it (on PATH or under pyenv), else 3.13,
# else python3 (3.11 works). From 3.12 on the sandbox's zygote makes its heap immortal
# (PEP 683), so forked workers keep sharing it: about half the memory per worker, and faster
# starts (docs/sandbox.md).
pick_python() {
    local candidate pyenv_root
    pyenv_root=$(pyenv root 2>/dev/null || echo "${HOME:-/root}/.pyenv")
    for candidate in python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12 \
        python3.13 "$pyenv_root"/versions/3.13*/bin/python3.13 python3; do
        if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    echo python3
}

python=$(pick_python)
want=$("$python" -c 'import sys; print(sys.version.split()[0])')
if [ -x .venv/bin/python ] && [ "$(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')" != "$want" ]; then
    rm -rf .venv  # made with another interpreter
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    touch "$stamp"
fi

# The service's own venv (scripts/serve, scripts/bench http): on the distribution's python3
# where that is another interpreter than .venv's. Distributions build theirs optimized (PGO,
# LTO, linked statically); pyenv's, say, are not: on this kind of machine Debian's 3.11 ran
# the service's Python ~1.5-1.9x as fast as pyenv's 3.11 and 3.12 builds (warm fetches:
# +27% requests/s). Workers stay on .venv's interpreter (--sandbox-python): on 3.12+ they
# share the zygote's memory. Returns 1 (the service then runs on .venv) where there is no
# such interpreter or the venv cannot be made, saying why on stderr. Call it only as a
# condition (`if service_venv`): its steps rely on `|| return 1`, not on set -e.
service_venv() {
    local system=/usr/bin/python3 stamp want identity='import os, sys; print(os.path.realpath(sys._base_executable), sys.version.split()[0])'
    [ -x "$system" ] || return 1
    "$system" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 || return 1
    if [ "$("$system" -c "$identity")" = "$(.venv/bin/python -c "$identity")" ]; then
        return 1  # .venv is on it already
    fi
    want=$("$system" -c 'import sys; print(sys.version.split()[0])')
    if [ -x .venv-service/bin/python ] && [ "$(.venv-service/bin/python -c 'import sys; print(sys.version.split()[0])')" != "$want" ]; then
        rm -rf .venv-service
    fi
    if [ ! -x .venv-service/bin/python ]; then
        # No pip of its own (Debian's python3 may come without ensurepip): .venv's installs.
        if ! "$system" -m venv --without-pip .venv-service >&2; then
            echo "service_venv: no venv on $system: the service runs on .venv" >&2
            rm -rf .venv-service
            return 1
        fi
    fi
    stamp=.venv-service/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
    if [ ! -f "$stamp" ]; then
        if ! .venv/bin/python -m pip --python .venv-service/bin/python install --quiet -e .; then
            echo "service_venv: could not install into .venv-service: the service runs on .venv" >&2
            return 1
        fi
        touch "$stamp"
    fi
}

# With the service on .venv-service: its workers on .venv's interpreter, unless the
# environment or the config file (WORKERLOADER_CONFIG, else ./workerloader.toml; a file given
# with --config is not looked at) names one, since the variable would beat the file.
default_sandbox_python() {
    local config="${WORKERLOADER_CONFIG:-workerloader.toml}"
    if [ -z "${WORKERLOADER_SANDBOX_PYTHON:-}" ] &&
        ! grep -qs '^[[:space:]]*sandbox_python[[:space:]]*=' "$config"; then
        export WORKERLOADER_SANDBOX_PYTHON="$PWD/.venv/bin/python"
    fi
}

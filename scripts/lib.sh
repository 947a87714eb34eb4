# Shared set-up for scripts/test, scripts/demo and scripts/bench (sourced, not run):
# installs Dovecot and PostgreSQL with apt-get when missing and the project with pip into .venv.
ensure_environment() {
    if ! command -v dovecot >/dev/null 2>&1; then
        echo "== installing Dovecot (dovecot-imapd) with apt-get"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        # dovecot-imapd conflicts with cyrus-imapd; nothing here installs Cyrus.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dovecot-imapd >/dev/null
    fi
    # PostgreSQL for the tests of the PostgreSQL backend and of several daemons: they start a
    # throwaway cluster of their own (initdb + pg_ctl), never the system one on port 5432.
    # Debian keeps the server binaries in /usr/lib/postgresql/VERSION/bin, off PATH.
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        echo "== installing PostgreSQL (postgresql) with apt-get"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
    fi
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian splits venv/ensurepip out of python3: without it 'python3 -m venv' fails.
        echo "== installing python3-venv with apt-get"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        python3 -m venv .venv
    fi
    # The install is editable: code changes need no reinstall, only a changed pyproject.toml
    # does. The stamp records what was installed, so repeated runs skip pip (and its noise).
    local stamp=".venv/.installed-pyproject.sha256"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && .venv/bin/python -c 'import mailbridge' 2>/dev/null; then
        return 0
    fi
    echo "== installing Python packages into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" > "$stamp"
}

# Shared set-up for scripts/test, scripts/demo and scripts/bench (sourced, not run):
# installs Dovecot with apt-get when missing and the project with pip into .venv.
ensure_environment() {
    if ! command -v dovecot >/dev/null 2>&1; then
        echo "== installing Dovecot (dovecot-imapd) with apt-get"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        # dovecot-imapd conflicts with cyrus-imapd; nothing here installs Cyrus.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dovecot-imapd >/dev/null
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
    echo "== installing Python packages into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
}

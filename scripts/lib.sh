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
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        python3 -m venv .venv
    fi
    echo "== installing Python packages into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
}

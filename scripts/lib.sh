# Shared by scripts/demo, scripts/install-deps and scripts/test (sourced, not run).
#
# veil installs into a virtual environment of its own, as Debian 12 wants (its python3 refuses
# `pip install` outside one: PEP 668), from a lock file with hashes (requirements/*.lock,
# refreshed by scripts/lock). Works as root and as a user with sudo.

# The interpreter the environments are made from: the system's python3 unless PYTHON says.
PYTHON=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# apt_install PKG...: install the Debian packages that are missing (one apt-get update first).
apt_install() {
    local missing=() pkg
    command -v dpkg-query >/dev/null || die "not a Debian-like system: install $* by hand"
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null; then
        die "need root or sudo to install: ${missing[*]}"
    fi
    say "installing ${missing[*]}"
    $SUDO apt-get update -qq
    # Through env: sudo resets the environment, and a debconf question would wait unseen.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# python_ok: the interpreter exists and is a Python veil supports.
python_ok() {
    command -v "$PYTHON" >/dev/null || die "no $PYTHON: apt-get install python3 (3.11 or newer)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$("$PYTHON" -V 2>&1) is too old: veil needs Python 3.11 or newer"
}

# fresh_venv DIR: a new virtual environment at DIR (whatever was there is removed). On Debian,
# `python3 -m venv` needs the python3-venv package (ensurepip): installed when missing.
fresh_venv() {
    local dir=$1
    python_ok
    rm -rf "$dir"
    if ! "$PYTHON" -m venv "$dir" >/dev/null 2>&1; then
        rm -rf "$dir"
        local minor
        minor=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        apt_install python3-venv "python$minor-venv"
        "$PYTHON" -m venv "$dir" || die "cannot make a virtual environment with $PYTHON"
    fi
}

# locked_venv DIR LOCK [EDITABLE]: DIR holds what LOCK pins (hashes checked) and veil from this
# checkout (editable if EDITABLE=-e). Kept across runs (packages a lock no longer lists stay
# until the venv is remade: delete DIR for that); made anew if it is broken or was made by
# another interpreter.
locked_venv() {
    local dir=$1 lock=$2 editable=${3:-}
    local want
    python_ok
    if [ -e "$dir" ] && ! [ -w "$dir" ]; then
        die "$dir is not writable by $(id -un) (made by root?): remove it or run as its owner"
    fi
    want=$("$PYTHON" -c 'import sys; print(sys.version)')
    if ! [ -x "$dir/bin/python" ] \
        || [ "$("$dir/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null)" != "$want" ]; then
        say "making $dir"
        fresh_venv "$dir"
    fi
    # pip itself is in the lock: the first install upgrades it to the pinned release.
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
        -r "$lock"
    # The build backend comes from the lock too, so nothing unpinned is downloaded.
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --no-build-isolation $editable .
}

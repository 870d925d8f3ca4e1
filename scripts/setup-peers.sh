#!/usr/bin/env bash
# Finds the peers `make bench-peers` measures trellis against:
#   h2load (nghttp2-client), nginx (nginx-light) and haproxy (haproxy).
# The bench runs its own private nginx and haproxy from temporary configs on
# free ports; the machine's services need not run. If some are missing and
# this runs as root with apt-get, installs them (apt-get install -y, after an
# apt-get update when the first attempt fails). Otherwise it stops and names
# the packages to install. `make test` does not need any of them.
set -euo pipefail

# find_bin NAME: prints the first executable NAME on PATH or in the usual
# sbin/bin folders (nginx and haproxy live in /usr/sbin).
find_bin() {
    local found
    found=$(command -v "$1" 2>/dev/null || true)
    if [ -n "$found" ] && [ -x "$found" ]; then
        echo "$found"
        return 0
    fi
    local dir
    for dir in /usr/sbin /usr/bin /usr/local/sbin /usr/local/bin; do
        if [ -x "$dir/$1" ]; then
            echo "$dir/$1"
            return 0
        fi
    done
    return 1
}

# missing_packages: prints the Debian package for each tool not found.
missing_packages() {
    find_bin h2load >/dev/null || echo nghttp2-client
    find_bin nginx >/dev/null || echo nginx-light
    find_bin haproxy >/dev/null || echo haproxy
}

mapfile -t missing < <(missing_packages)

if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-peers: installing with apt-get: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y "${missing[@]}"; then
        echo "setup-peers: install failed; running apt-get update and trying again"
        apt-get update
        apt-get install -y "${missing[@]}"
    fi
    mapfile -t missing < <(missing_packages)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    cat >&2 <<EOF
setup-peers: make bench-peers needs these packages, which are not installed:
  ${missing[*]}
Install them, e.g. on Debian/Ubuntu (as root):
  apt-get update && apt-get install -y ${missing[*]}
(looked on PATH, in /usr/sbin, /usr/bin and /usr/local/{s,}bin).
EOF
    exit 1
fi

echo "setup-peers: h2load  $(find_bin h2load)"
echo "setup-peers: nginx   $(find_bin nginx)"
echo "setup-peers: haproxy $(find_bin haproxy)"

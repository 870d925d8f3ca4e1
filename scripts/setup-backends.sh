#!/usr/bin/env bash
# Finds the servers the end-to-end tests start privately (each test runs its
# own instance on a free port, in a temporary directory):
#   redis-server, nats-server, PostgreSQL's initdb + postgres, and
#   prometheus + promtool (the metrics test scrapes trellis with a real
#   Prometheus and checks the exposition with promtool).
# And the Python package kubernetes-validate (PyPI; it ships the Kubernetes
# schemas), with which tests/tests/deploy_kubernetes.rs validates
# deploy/kubernetes/ offline: installed with pip when
# `python3 -c 'import kubernetes_validate'` fails.
# And grpcio, grpcio-tools and grpcio-health-checking (PyPI), on which the
# Python example pattern examples/python-kv/ runs (tests/tests/python_pattern.rs):
# installed with pip when `python3 -c 'import grpc, grpc_tools, grpc_health'`
# fails. And Schemathesis (PyPI), which tests/tests/schemathesis.rs runs
# against the HTTP API's OpenAPI document, installed the same way.
# If some are missing and this runs as root with apt-get, installs them
# (apt-get update; apt-get install -y redis-server nats-server postgresql
# prometheus).
# Otherwise it stops and says exactly what to install. Run by `make setup`
# (and so by `make test`). The tests look in the same places.
set -euo pipefail

# PostgreSQL's server binaries are not on PATH on Debian/Ubuntu.
pg_bindirs() {
    if command -v pg_config >/dev/null 2>&1; then
        pg_config --bindir 2>/dev/null || true
    fi
    # Newest version first.
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r || true
}

# find_bin NAME [DIR...]: prints the first executable NAME on PATH, in the
# usual sbin/bin folders, or in the DIRs.
find_bin() {
    local name=$1
    shift
    local found
    found=$(command -v "$name" 2>/dev/null || true)
    if [ -n "$found" ] && [ -x "$found" ]; then
        echo "$found"
        return 0
    fi
    local dir
    for dir in /usr/sbin /usr/bin /usr/local/sbin /usr/local/bin "$@"; do
        if [ -x "$dir/$name" ]; then
            echo "$dir/$name"
            return 0
        fi
    done
    return 1
}

# missing_packages: prints the Debian package for each server not found.
missing_packages() {
    local dirs
    mapfile -t dirs < <(pg_bindirs)
    find_bin redis-server >/dev/null || echo redis-server
    find_bin nats-server >/dev/null || echo nats-server
    if ! find_bin initdb "${dirs[@]}" >/dev/null || ! find_bin postgres "${dirs[@]}" >/dev/null; then
        echo postgresql
    fi
    if ! find_bin prometheus >/dev/null || ! find_bin promtool >/dev/null; then
        echo prometheus
    fi
}

mapfile -t missing < <(missing_packages)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-backends: missing: ${missing[*]}"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup-backends: installing with apt-get: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
        mapfile -t missing < <(missing_packages)
    fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
    cat >&2 <<EOF
setup-backends: these servers are needed by the end-to-end tests and were not found:
  ${missing[*]}
Install them, e.g. on Debian/Ubuntu (as root):
  apt-get update && apt-get install -y ${missing[*]}
(looked on PATH, in /usr/sbin, /usr/bin, /usr/local/{s,}bin, \`pg_config --bindir\`
and /usr/lib/postgresql/*/bin). The tests start their own private instances; the
machine's services need not run.
EOF
    exit 1
fi

mapfile -t dirs < <(pg_bindirs)
echo "setup-backends: redis-server $(find_bin redis-server)"
echo "setup-backends: nats-server  $(find_bin nats-server)"
echo "setup-backends: initdb       $(find_bin initdb "${dirs[@]}")"
echo "setup-backends: postgres     $(find_bin postgres "${dirs[@]}")"
echo "setup-backends: prometheus   $(find_bin prometheus)"
echo "setup-backends: promtool     $(find_bin promtool)"
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "setup-backends: running as root, the tests start PostgreSQL as the 'postgres' user, which does not exist; install the postgresql package (it creates the user)" >&2
    exit 1
fi

# Python packages from PyPI, each installed with pip when its import fails.
if ! command -v python3 >/dev/null 2>&1; then
    echo "setup-backends: python3 is missing; the tests need it with kubernetes-validate, grpcio and schemathesis (apt-get install -y python3 python3-pip, then make setup)" >&2
    exit 1
fi
# pip_install IMPORTS WHO PACKAGE...: installs PACKAGEs unless
# `python3 -c "import IMPORTS"` works; WHO (the test that needs them) is
# named when it fails.
pip_install() {
    local imports=$1 who=$2
    shift 2
    if python3 -c "import $imports" >/dev/null 2>&1; then
        return
    fi
    echo "setup-backends: the Python packages $* are missing ($who needs them); installing them with pip"
    if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup-backends: python3 has no pip; installing python3-pip with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update && apt-get install -y --no-install-recommends python3-pip || true
    fi
    # A distribution's Python refuses pip installs outside a virtualenv
    # (PEP 668); these packages are self-contained, so fall back to
    # overriding that.
    python3 -m pip install --quiet "$@" \
        || python3 -m pip install --quiet --break-system-packages "$@" \
        || true
    if ! python3 -c "import $imports" >/dev/null 2>&1; then
        cat >&2 <<EOF
setup-backends: could not install the Python packages $* for $(command -v python3):
pip failed (its message is above), or installed them where this python3 does not look.
$who needs them: install them by hand for this python3, then run \`make setup\` again.
EOF
        exit 1
    fi
}

# kubernetes-validate: the offline schema check of deploy/kubernetes/.
pip_install kubernetes_validate tests/tests/deploy_kubernetes.rs kubernetes-validate==1.37.0
echo "setup-backends: kubernetes-validate $(python3 -m kubernetes_validate --version) ($(command -v python3))"
# grpcio & co.: the Python example pattern, examples/python-kv/.
pip_install "grpc, grpc_tools, grpc_health" tests/tests/python_pattern.rs \
    grpcio==1.85.3 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1
echo "setup-backends: grpcio $(python3 -c 'import grpc; print(grpc.__version__)') ($(command -v python3))"
# Schemathesis: the HTTP API against its OpenAPI document.
pip_install schemathesis tests/tests/schemathesis.rs schemathesis==4.32.5
echo "setup-backends: schemathesis $(python3 -c 'import schemathesis; print(schemathesis.__version__)') ($(command -v python3))"

#!/usr/bin/env bash
# Finds (or installs from the system package manager) the backend servers
# the tests start privately. To be completed with the backend patterns.
set -euo pipefail
echo "setup-backends: nothing required yet"

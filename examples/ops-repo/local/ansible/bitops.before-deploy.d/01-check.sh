#!/usr/bin/env bash
# Runs before the playbook, in the ansible folder of the run's working copy.
set -euo pipefail
echo "before deploy: environment ${BITOPS_ENVIRONMENT}, plugin ${BITOPS_PLUGIN_NAME}"
command -v ansible-playbook >/dev/null || { echo "ansible-playbook is not installed" >&2; exit 1; }

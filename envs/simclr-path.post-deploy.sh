#!/usr/bin/env bash
# Snakemake runs this inside the new conda env, from the directory snakemake runs in (the
# repository root, or SIMCLR_PATH_SRC when the workflow runs elsewhere). Installs this package
# without dependencies: the env file provides them.
set -euo pipefail
src="${SIMCLR_PATH_SRC:-$PWD}"
if [ ! -f "$src/pyproject.toml" ]; then
    echo "simclr-path: $src is not the simclr-path source tree; set SIMCLR_PATH_SRC" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation -e "$src"

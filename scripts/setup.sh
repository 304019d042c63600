#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs jflash with its test extras,
# pinned by constraints.txt to the versions the GPU machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for cand in python3.13 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  # pyenv keeps other versions behind shims that need PYENV_VERSION.
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V -r); do
      echo "env PYENV_VERSION=$v python${v%.*}"; return
    done
  fi
  echo "no Python >= 3.12 found; set PYTHON=/path/to/python3.12" >&2
  exit 1
}

PY=$(find_python)
if [ ! -x .venv/bin/python ]; then
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench]"
.venv/bin/python -c 'import jax, flax, chex; print("jflash env:", jax.__version__, flax.__version__, chex.__version__)'

#!/usr/bin/env bash
# make test-min: the fast tier against the lowest versions pyproject.toml declares.
#
# Copies the working tree (tracked and untracked, not ignored files) into a fresh temporary
# directory, creates a venv there, installs torch as the Makefile does (TORCH_SPEC), then the
# project with its dev extra resolved by uv with --resolution lowest-direct: every direct
# dependency at the lowest release its floor (and the other floors) allow, the transitive ones at
# their newest compatible. Prints the versions it got, runs
# `pytest -m "not integration and not slow"` and removes the directory. Nothing in the
# checkout or its .venv is touched. Needs PyPI. requirements.lock plays no part here.
#
#   infra/check-min-versions.sh                          # torch: the Makefile's TORCH_SPEC
#   TORCH_SPEC='torch==2.4.*' infra/check-min-versions.sh   # torch's own floor too
#   KEEP=1 infra/check-min-versions.sh                   # keep the directory, to look into it
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-$(sed -n 's/^TORCH_SPEC ?= *//p' Makefile)}
UV_SPEC=${UV_SPEC:-$(sed -n 's/^UV_SPEC ?= *//p' Makefile)}
WORKERS=${TEST_WORKERS:-2}

dir=$(mktemp -d "${TMPDIR:-/tmp}/min-versions.XXXXXX")
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$dir"' EXIT; else echo "kept: $dir"; fi

src=$dir/src
mkdir "$src"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$src"

start=$(date +%s)
"$PYTHON" -m venv "$dir/venv"
bin=$dir/venv/bin
"$bin/python" -m pip install --quiet "$TORCH_SPEC" "$UV_SPEC"
"$bin/uv" pip install --quiet --python "$bin/python" --resolution lowest-direct \
    -e "$src[dev]"
echo "installed in $(( $(date +%s) - start )) s; the direct dependencies:"
"$bin/python" - "$src/pyproject.toml" <<'EOF'
import sys, tomllib
from importlib.metadata import version
from packaging.requirements import Requirement

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
for name in dict.fromkeys(Requirement(r).name for r in reqs):
    print(f"  {name}=={version(name)}")
EOF

cd "$src"
start=$(date +%s)
"$bin/python" -m pytest -m "not integration and not slow" -n "$WORKERS" -p no:cacheprovider -q \
    --durations=0 --durations-min=30
echo "fast tier on the floors: passed in $(( $(date +%s) - start )) s"

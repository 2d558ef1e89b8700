#!/usr/bin/env bash
# Installability check (run by `make wheel-test` and CI): build st's wheel, install it into a fresh virtualenv that
# cannot see the source tree, and run `st tiny-model` plus the four stages on a few generated images with it.
# The new environment gets the already installed dependencies through a .pth line pointing at the project
# virtualenv's site-packages (a plain path: the editable install's import hook there is not activated), so the
# check needs no network; `pip check` then proves that the wheel's declared requirements are met by them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${ST_PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "wheel-test: building the wheel"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" "$root" >/dev/null
base=$("$python" -c 'import sys; print(sys._base_executable)')
"$base" -m venv "$work/venv"
venv_python=$work/venv/bin/python
"$venv_python" -m pip uninstall --quiet --yes setuptools 2>/dev/null || true  # the project's own copy is the one used
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$python" > "$(purelib "$venv_python")/st-dependencies.pth"
"$venv_python" -m pip install --quiet --no-deps --no-index "$work"/dist/st-*.whl
"$venv_python" -m pip check

cd "$work"   # nothing of the source tree on the path from here on
location=$("$venv_python" -c 'import pipeline; print(pipeline.__file__)')
case "$location" in
  "$work"/venv/*) echo "wheel-test: st imports from the wheel ($location)" ;;
  *) echo "wheel-test: st was imported from $location, not from the installed wheel" >&2; exit 1 ;;
esac

st=$work/venv/bin/st
"$st" tiny-model sd1x model
"$st" sample-data data --images 4 --family sd1x --model model
"$st" prepare -c data/config.json -o run/prepare
"$st" cache -c data/config.json -i run/prepare -o run/cache
"$st" train -c data/config.json -i run/cache -o run/train --set max_train_steps=2
"$st" publish -c data/config.json -i run/train -o run/publish
"$st" verify run
echo "wheel-test: the wheel ran the whole chain"

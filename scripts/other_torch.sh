#!/usr/bin/env bash
# The test suite under another torch (2.11, the torch of current GPU images), file by file, this
# checkout's tinymeg first on the path; nothing installed. CI runs the 2.13 pin only: a torch 2.11
# wheel is the CUDA build (about 5 GB), so this is run by hand, in a venv that has it:
#
#   python3 -m venv /tmp/t211 && /tmp/t211/bin/pip install torch==2.11.0 pytest hypothesis tqdm numpy safetensors
#   PYTHON=/tmp/t211/bin/python bash scripts/other_torch.sh [test_file.py ...]     # default: every file
#
# One file at a time, so that a file that hangs costs its own timeout and no more; the README's
# own test (minutes of recipes, torchrun from the venv) is left to CI. Exit status: the number of
# files that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:?set PYTHON to the interpreter of the torch to check}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # absolute: tests start subprocesses elsewhere
"$python" -c "import torch; print('torch', torch.__version__)"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=($(cd tests && ls test_*.py | grep -v '^test_readme.py$'))
failed=0
for f in "${files[@]}"; do
  start=$SECONDS
  log=$(mktemp)
  timeout 900 "$python" -m pytest -q -p no:cacheprovider "tests/$f" > "$log" 2>&1 || failed=$((failed + 1))
  printf '%-34s %4ss  %s\n' "$f" $((SECONDS - start)) "$(tail -1 "$log")"
  rm -f "$log"
done
exit $failed

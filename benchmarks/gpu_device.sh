#!/usr/bin/env bash
# The `gpu` scenario on a lent GPU machine (no network, 64 MiB per call, warm
# for 30 s after a call). Three steps:
#
#   here:      bash benchmarks/gpu_device.sh prepare
#              -> build/gpu/: vLLM 0.26.0 for torch 2.11 in two ~59 MiB parts
#                 (benchmarks/gpu_payload/build.sh, ~5 min), batchd's own
#                 dependencies as py3.12 wheels, SmolLM2's tokenizer files
#   device 1:  bash benchmarks/gpu_device.sh part0
#              carry: build/gpu/part0, build/gpu/extra
#   device 2:  LIMIT_S=600 bash benchmarks/gpu_device.sh run   (within 30 s of call 1;
#              LIMIT_S = the call's timeout_s)   carry: build/gpu/part1
#              SWAPS=0 FITS=0 (and REPEATS=9): the whole budget goes to part 1
#              SCENARIO=scaleout: the `scaleout` scenario instead (two daemons on
#              the one GPU); carry models/tiny-llama too (`make test` builds it)
#              SCENARIO=replicas: the `replicas` scenario (one engine against two
#              replicas of one daemon sharing the GPU at 0.4 of its memory each);
#              carry models/tiny-llama
#              SCENARIO=images: the `images` scenario (REPEATS=1); carry
#              models/tiny-vision (`batchd models prepare tiny-vision`)
#
# The run writes the record, its logs and nvidia-smi's view to $OUT; commit
# the record under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: gpu_device.sh prepare|part0|run}
GPU=build/gpu
case $step in
prepare)
  mkdir -p $GPU/part0 $GPU/part1 $GPU/extra/wheels $GPU/extra/tokenizer
  test -f $GPU/payload/vllm026.sha256 || bash benchmarks/gpu_payload/build.sh "$PWD/$GPU/payload"
  cp $GPU/payload/vllm026.txz.part00 $GPU/payload/vllm026.sha256 $GPU/part0/
  cp $GPU/payload/vllm026.txz.part01 $GPU/part1/
  # What the device's image and the vLLM payload (packed for vllm.LLM) lack:
  # batchd's own dependencies, and what vLLM's API server module imports, from
  # which batchd takes its serving layer (uvicorn, watchfiles,
  # model-hosting-container-standards and its jmespath).
  python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d $GPU/extra/wheels pydantic-settings python-dotenv structlog tomli-w watchdog \
    uvicorn watchfiles "model-hosting-container-standards>=0.1.14,<1" jmespath
  cp models/smollm2-135m/{tokenizer_config.json,chat_template.jinja} $GPU/extra/tokenizer/
  # gzipped: part 0 and these share one 64 MiB call
  gzip -9c models/smollm2-135m/tokenizer.json > $GPU/extra/tokenizer/tokenizer.json.gz
  du -sh $GPU/part0 $GPU/part1 $GPU/extra ;;
part0)
  mkdir -p /tmp/vp /tmp/extra
  cp $GPU/part0/* /tmp/vp/ && cp -r $GPU/extra/* /tmp/extra/
  gunzip -f /tmp/extra/tokenizer/tokenizer.json.gz
  ls -l /tmp/vp; nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv ;;
run)
  cp $GPU/part1/* /tmp/vp/
  test -d /tmp/site || {
    cat /tmp/vp/vllm026.txz.part0[01] > /tmp/vp/all.txz
    echo "$(cat /tmp/vp/vllm026.sha256)  /tmp/vp/all.txz" | sha256sum -c -
    python3 -c 'import tarfile; tarfile.open("/tmp/vp/all.txz").extractall("/tmp/site")'
    python3 -m pip install -q --no-deps --no-index --target /tmp/site /tmp/extra/wheels/*.whl
  }
  export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BATCHD_BENCH_RESULTS=${OUT:-/tmp/out} \
    BATCHD_BENCH_TOKENIZER=/tmp/extra/tokenizer
  nvidia-smi > "$BATCHD_BENCH_RESULTS/nvidia-smi.txt"
  # The parts share what the call's limit (LIMIT_S, the run call's timeout_s)
  # leaves after the unpacking, less a margin for the last load and the exit.
  budget=$(( ${LIMIT_S:-600} - SECONDS - 50 ))
  echo "unpacked after ${SECONDS}s; parts budget ${budget}s"
  if [ "${SCENARIO:-gpu}" = scaleout ] || [ "${SCENARIO:-gpu}" = images ] || \
     [ "${SCENARIO:-gpu}" = replicas ]; then
    # scaleout: a bulk as whole files on one daemon and on two daemons of one spool
    # sharing the GPU; images: the daemon's RSS for 50 against 5,000 pictures
    # (docs/BENCHMARKING.md); the tiny model carried in models/
    timeout "$budget" python3 -m benchmarks run "$SCENARIO" --repeats "${REPEATS:-3}" \
      2>&1 | tee "$BATCHD_BENCH_RESULTS/$SCENARIO-run.log"
  else
    timeout $(( budget + 35 )) python3 -m benchmarks run gpu --repeats "${REPEATS:-3}" \
      --budget-s "$budget" --swaps "${SWAPS:-6}" --fits "${FITS:-3}" 2>&1 | tee "$BATCHD_BENCH_RESULTS/gpu-run.log"
  fi ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac

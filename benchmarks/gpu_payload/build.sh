#!/bin/bash
# vLLM 0.26.0 (the newest release built for torch 2.11 + CUDA 13) for a py3.12
# GPU machine with no network, packed in one xz archive split in two parts that
# each fit a 64 MiB transfer. reqs-minimal.txt: the packages vLLM really needs
# that such an image lacks. Drops what an H100 does not use (the sm_80 FA2
# library, the Rust front end, other Pythons' deep_gemm).
# usage: bash build.sh OUTDIR   (needs pip that reaches PyPI, xz, split; ~5 min)
set -euo pipefail
OUT=${1:-/tmp/vllm_payload}; HERE=$(cd "$(dirname "$0")" && pwd)
PLAT="--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --only-binary=:all:"
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_31_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do PLAT="$PLAT --platform $p"; done
mkdir -p "$OUT/wheels"; rm -rf "$OUT/site"
python3 -m pip download -q --no-deps $PLAT -d "$OUT/wheels" -r "$HERE/reqs-vllm.txt" -r "$HERE/reqs-minimal.txt"
python3 -m pip install -q --no-deps --no-compile --no-index $PLAT --target "$OUT/site" "$OUT"/wheels/*.whl
cd "$OUT/site"
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs vllm/third_party/deep_gemm/_C.cpython-31[0134]-x86_64-linux-gnu.so
rm -rf bin; find . -name __pycache__ -prune -exec rm -rf {} +
cd "$OUT"
tar -C site -cf - . | xz -9e -T1 --lzma2=preset=9e,dict=256MiB > vllm026.txz
rm -f vllm026.txz.part*; split -n 2 -d vllm026.txz vllm026.txz.part
sha256sum vllm026.txz | cut -d' ' -f1 > vllm026.sha256
ls -l vllm026.txz vllm026.txz.part*; cat vllm026.sha256

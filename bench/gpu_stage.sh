#!/usr/bin/env bash
# Fill .devdata (ignored by git) with what call N of bench/gpu_session.sh carries: 64 MiB
# travel per call with the checkout (about 13 MB), so CIFAR-10 (98 MB) comes in three pieces.
#   bash bench/gpu_stage.sh 1   # the Imagenette slice and CIFAR batches 1-2 (about 48 MB)
#   bash bench/gpu_stage.sh 2   # CIFAR batches 3-4 (about 33 MB)
#   bash bench/gpu_stage.sh 3   # CIFAR batch 5, the test batch, checksums, the unpacker
# The data comes from ../shared/data (or $CANON_SHARED_DATA).
set -eu
call=${1:?usage: gpu_stage.sh 1|2|3}
shared=${CANON_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
cifar=$shared/cifar10
rm -rf .devdata && mkdir -p .devdata/cifar10
case $call in
  1) cp -r "$shared/imagenette2-160-mini" .devdata/
     cp "$cifar"/data_batch_{1,2}.* .devdata/cifar10/ ;;
  2) cp "$cifar"/data_batch_{3,4}.* .devdata/cifar10/ ;;
  3) cp "$cifar"/data_batch_5.* "$cifar"/test_batch.* "$cifar"/checksums.json .devdata/cifar10/
     cp "$shared/unpack_cifar10.py" .devdata/ ;;
  *) echo "gpu_stage.sh: call 1, 2 or 3, not $call" >&2; exit 2 ;;
esac
du -sh .devdata

#!/usr/bin/env bash
# Fill the folders that bench/gpu_session.sh's calls carry to a lent GPU machine, all at once,
# so that nothing runs here between the calls (a machine left idle 30 s is given back, with
# what earlier calls carried). 64 MiB travel per call with the checkout (about 13 MB), so
# CIFAR-10 (98 MB of WebP mosaics) comes in three pieces, one per call:
#   .devdata    the 1,500-image Imagenette slice (15 MB)   carry with .devcifar1 in call 1
#   .devcifar1  CIFAR batches 1-2 (33 MB)
#   .devcifar2  CIFAR batches 3-4 (33 MB)                   call 2
#   .devcifar3  batch 5, the test batch, checksums, unpack_cifar10.py (33 MB)   call 3
# The data comes from ../shared/data (or $CANON_SHARED_DATA). All five are ignored by git.
set -eu
cd "$(dirname "$0")/.."
shared=${CANON_SHARED_DATA:-$(cd .. && pwd)/shared/data}
cifar=$shared/cifar10
rm -rf .devdata .devcifar1 .devcifar2 .devcifar3
mkdir -p .devdata .devcifar1 .devcifar2 .devcifar3
cp -r "$shared/imagenette2-160-mini" .devdata/
cp "$cifar"/data_batch_{1,2}.* .devcifar1/
cp "$cifar"/data_batch_{3,4}.* .devcifar2/
cp "$cifar"/data_batch_5.* "$cifar"/test_batch.* "$cifar"/checksums.json \
  "$shared/unpack_cifar10.py" .devcifar3/
du -sh .devdata .devcifar1 .devcifar2 .devcifar3

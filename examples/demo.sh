#!/usr/bin/env bash
# The balefs demo: a volume over 4 local node directories with embedded SQLite metadata,
# a small ImageNet-like tree packed in, listed, read back, copied out and compared.
# Everything lives under one fresh directory (printed at the end) and its own BALEFS_HOME.
set -euo pipefail
work=${BALEFS_DEMO_DIR:-$(mktemp -d -t balefs-demo-XXXXXX)}
export BALEFS_HOME="$work/home"
mkdir -p "$work"/data/n{0,1,2,3}
echo "== making a small ImageNet-like tree (10 classes x 200 files, 4-64 KiB) in $work/imagenet-mini"
python - "$work/imagenet-mini" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random(0)
blob = os.urandom(1 << 20)
for c in range(10):
    d = os.path.join(root, "train", f"n0144{c:04d}")
    os.makedirs(d, exist_ok=True)
    for i in range(200):
        size = rng.randint(4 << 10, 64 << 10)
        start = rng.randint(0, len(blob) - size)
        with open(os.path.join(d, f"img_{i:05d}.JPEG"), "wb") as f:
            f.write(blob[start:start + size])
PY
set -x
balefs init demo --node "$work/data/n0" --node "$work/data/n1" --node "$work/data/n2" --node "$work/data/n3"
balefs put "$work/imagenet-mini" bale://demo/imagenet
balefs ls -l bale://demo/imagenet/train | head -5
balefs cat bale://demo/imagenet/train/n01440000/img_00000.JPEG | cmp - "$work/imagenet-mini/train/n01440000/img_00000.JPEG"
balefs get bale://demo/imagenet "$work/copy"
diff -r "$work/imagenet-mini" "$work/copy"
balefs df demo
python - <<'PY'
import fsspec
fs = fsspec.filesystem("bale")
paths = fs.find("demo/imagenet/train")
with fsspec.open("bale://" + paths[0], "rb") as f:
    first = f.read()
data = fs.cat(paths)  # one request per block, not per file
print(f"fsspec: {len(paths)} files, {sum(map(len, data.values())) / 1e6:.1f} MB in one batched cat; first file {len(first)} bytes")
PY
set +x
echo "== demo OK. To keep using this volume: export BALEFS_HOME=$BALEFS_HOME"

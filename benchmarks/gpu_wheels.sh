#!/usr/bin/env bash
# Download the wheels that caldm's sampling and benchmarks/gpu_suite.py need on the GPU device
# machine into .whl/ (ignored by git), for its CPython 3.12 on x86-64 Linux.
#
# That machine has PyTorch, numpy, scipy, safetensors, pyyaml, tqdm, fsspec, pillow and
# packaging, but not monai, nibabel or pydantic, and it cannot reach a registry. torch is never
# downloaded. The versions are the ones the project's venv runs (monai is pinned in
# constraints.txt); the script checks that every requirement of these wheels is either here or
# on that machine, and prints the folder's size (what travels is limited to 64 MiB in all).
#
# Run here, in the repository root:   benchmarks/gpu_wheels.sh
# Then the ONE command on the device machine, carrying .whl (results come back from $OUT):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT
#
# (device tool: run(command=<that line>, carry=[".whl"], timeout_s=600); the suite keeps to
# its 480 s budget and rewrites $OUT/gpu_<device>.md/.json after every part.)
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PYTHON=${PYTHON:-python3}
WHEELS=(
  monai==1.6.1
  nibabel==5.4.2
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)
# On the device already (its image's package list); a requirement outside both lists fails.
ON_DEVICE="torch numpy scipy safetensors pyyaml tqdm fsspec pillow packaging"

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"

# Every unconditional requirement (no extra; markers other than python<3.12 kept) must be met.
"$PYTHON" - "$DEST" "$ON_DEVICE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

dest, on_device = Path(sys.argv[1]), set(sys.argv[2].split())
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(w.name.split("-")[0]) for w in dest.glob("*.whl")} | {norm(n) for n in on_device}
missing = []
for wheel in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = line.split(":", 1)[1].strip()
            marker = req.split(";", 1)[1] if ";" in req else ""
            if "extra" in marker or re.search(r"python_version\s*<\s*.3\.(1[0-2]|[0-9])\b", marker):
                continue
            name = norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
            if name not in have:
                missing.append(f"{wheel.name}: {req}")
if missing:
    sys.exit("requirements neither carried nor on the device:\n  " + "\n  ".join(missing))
print(f"{len(list(dest.glob('*.whl')))} wheels, every requirement carried or on the device")
EOF
ls -1 "$DEST"
size=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $((size / 1024)) MiB ($size KiB) of the 64 MiB that may travel"
if [ "$size" -gt $((32 * 1024)) ]; then
  echo "warning: $DEST is over 32 MiB; the working tree travels too" >&2
fi

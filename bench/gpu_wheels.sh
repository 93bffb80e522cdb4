#!/bin/bash
# The Python packages bench/gpu_all.sh needs that the GPU machine's image lacks (it has torch, numpy, rich,
# matplotlib, pyyaml...; no network), as Python 3.12 x86-64 wheels in .whl (git-ignored; about 28 MB).
# .whl/extra holds the ones gpu_all.sh installs only where the machine lacks them (or has an older one).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl/extra
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
fetch() {
  local into=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$into" "$@"
}
fetch .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
  gymnasium==1.4.0 farama_notifications==0.0.6 Box2D==2.3.10 pygame_ce==2.5.8 snntorch==1.0.0
fetch .whl/extra typing_extensions==4.16.0 scikit_learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0
du -sh .whl

#!/usr/bin/env bash
# The GPU checks of issues 5 and 8 as one prepared script, sized for a lent GPU machine (the `device` tool: about
# 15 minutes of device time, at most 10 minutes a command, no internet, torch 2.11 + CUDA 13 on Python 3.12 there).
#
#   bash scripts/gpu_session.sh prepare   # here, once: fills .gpu_carry/ (git-ignored) with what the GPU machine
#                                         # lacks: the peers' wheels for Python 3.12 (higher, TorchOpt, optree), the
#                                         # learn2learn 0.2.0 source with its Cython files regenerated, a copy of
#                                         # ../shared/bench/peers_maml.py, the Omniglot background zip and
#                                         # the commit with its files' blob ids (a copy without .git reports it)
#   bash scripts/gpu_session.sh checks    # there (device run, carry [".gpu_carry"]): build the extension with CUDA,
#                                         # tests/gpu, the second-order MAML step on Conv-4 against learn2learn /
#                                         # higher / TorchOpt / a plain loop on the GPU, the kernels' standalone
#                                         # self-test                                         (at most 400 s)
#   bash scripts/gpu_session.sh suite     # there, at once after (a machine stays warm 30 s): the quick suite on the
#                                         # GPU, Omniglot included, the fused-op benchmark's CUDA rows, the
#                                         # first-order MAML step; rebuilds first on a fresh machine (at most 330 s)
#
# Every step runs under `timeout` within a deadline (GPU_SESSION_SECONDS, default 400 / 330 s from the start) and a
# failed step does not stop the next; each prints "=== step: rc=N in S s" and the last line sums them up. Files land
# in $OUT (the device tool's folder; ./gpu_out elsewhere), at most 8 per command: checks writes gpu_checks.log and
# gpu_meta_train.{json,md}; suite writes gpu_suite.log, gpu_quick.json, gpu_fused_cuda.json and
# gpu_meta_train_fo.{json,md}. Render them here into docs/RESULTS.md with `scripts/benchmark.py --from-json
# docs/results/quick.json --gpu-json ... --fused-json ... --gpu-meta-train-json ... --out docs` (README, section CUDA).
#
# Overrides, for a dry run of the whole flow on a CPU machine: DEVICE=cpu PY=.venv/bin/python
# PEERS_PY=/path/to/peers/venv/bin/python (skips installing the carried wheels) SKIP_BUILD=1 (keeps the current build)
# META_ARGS / SUITE_ARGS (more options for bench_meta_train.py / benchmark.py, e.g. "--configs sinusoid" or
# "--settings sinusoid-10s"; later options win).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-}
CARRY=${GPU_CARRY:-$ROOT/.gpu_carry}
OUT=${OUT:-$ROOT/gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
START=$(date +%s)
case "$MODE" in checks) BUDGET=400 ;; *) BUDGET=330 ;; esac  # 15 device minutes: start + both calls
DEADLINE=$((START + ${GPU_SESSION_SECONDS:-$BUDGET}))
PEERS_PY=${PEERS_PY:-}
SKIP_BUILD=${SKIP_BUILD:-0}
SUMMARY=""

record_tree() {  # the commit and its tracked files' blob ids, so that a copy without .git can tell which commit it is
  mkdir -p "$CARRY"
  git rev-parse HEAD > "$CARRY/commit" && git ls-tree -r HEAD > "$CARRY/tree.txt"
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "record-tree: the working tree has uncommitted changes: the GPU run will report them; commit, then prepare" >&2
  fi
}

tree_commit() {  # print "COMMIT DIRTY" for this working tree from $CARRY/tree.txt (no git needed): DIRTY=1 when a
                 # tracked file's content differs from the commit's blob or is missing
  "$PY" - "$CARRY" <<'PY'
import hashlib, pathlib, sys
carry = pathlib.Path(sys.argv[1])
commit = (carry / "commit").read_text().strip()
dirty = 0
for line in (carry / "tree.txt").read_text().splitlines():
    meta, path = line.split("\t", 1)
    mode, kind, blob = meta.split()
    if kind != "blob" or mode == "120000":  # submodules and links: not compared
        continue
    f = pathlib.Path(path)
    data = f.read_bytes() if f.is_file() else None
    if data is None or hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != blob:
        dirty = 1
        print(f"tree_commit: {path} differs from {commit[:7]}", file=sys.stderr)
print(commit, dirty)
PY
}

prepare() {
  # Only here: needs pip's registry and ../shared. Nothing of it is committed (.gpu_carry/ is in .gitignore).
  set -e
  local shared=$ROOT/../shared l2l=$CARRY/l2l_src
  rm -rf "$CARRY" && mkdir -p "$CARRY/whl" "$CARRY/data/omniglot"
  record_tree
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/whl" higher==0.2.1 torchopt==0.7.3 optree==0.20.0
  # learn2learn 0.2.0 is an sdist whose shipped C files do not compile on Python >= 3.11: regenerate them with a
  # current Cython (in a throw-away venv), so the GPU machine only compiles C.
  local tmp
  tmp=$(mktemp -d)
  python3 -m venv "$tmp/venv" && "$tmp/venv/bin/pip" install -q cython
  "$tmp/venv/bin/pip" download -q --no-deps --no-binary learn2learn -d "$tmp" learn2learn==0.2.0
  tar -xzf "$tmp"/learn2learn-0.2.0.tar.gz -C "$tmp"
  (cd "$tmp/learn2learn-0.2.0" && rm -f learn2learn/data/{meta_dataset,task_dataset,transforms}.c \
     && "$tmp/venv/bin/cython" -3 learn2learn/data/meta_dataset.pyx learn2learn/data/task_dataset.pyx \
          learn2learn/data/transforms.pyx)
  mkdir -p "$l2l"
  cp -r "$tmp/learn2learn-0.2.0"/{learn2learn,setup.py,setup.cfg,README.md,PKG-INFO,MANIFEST.in,requirements.txt} "$l2l"/
  rm -rf "$tmp"
  cp "$shared/bench/peers_maml.py" "$CARRY/peers_maml.py"
  cp "$shared/data/omniglot/images_background.zip" "$CARRY/data/omniglot/"
  cp -r "$shared/data/omniglot/splits" "$CARRY/data/omniglot/"
  du -sh "$CARRY"
  echo "prepare: done; device run with carry [\".gpu_carry\"] and command: bash scripts/gpu_session.sh checks"
}

step() {  # step NAME CAP_SECONDS CMD...: run CMD under the smaller of CAP and the time left; record its exit code
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 5)) t0 rc
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped, deadline reached"
    SUMMARY+="$name=skipped "
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (at most $cap s): $*"
  t0=$(date +%s)
  timeout "$cap" bash -c '"$@"' step "$@"  # through bash: the functions below are exported to it
  rc=$?
  echo "=== $name: rc=$rc in $(($(date +%s) - t0)) s"
  SUMMARY+="$name=$rc "
  return 0
}

environment() {
  if [ -n "${METAFORMER_COMMIT:-}" ]; then
    echo "date $(date -u '+%Y-%m-%d %H:%M:%S') UTC; $(nproc) cores; commit $METAFORMER_COMMIT (from .gpu_carry, no git" \
         "here)$( [ "${METAFORMER_DIRTY:-0}" = 1 ] && echo ' with uncommitted changes')"
  else
    echo "date $(date -u '+%Y-%m-%d %H:%M:%S') UTC; $(nproc) cores; commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" \
         "$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '(with uncommitted changes)')"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
}

install_peers() {  # the carried wheels and learn2learn into /tmp/site (PYTHONPATH), unless PEERS_PY is given
  [ -n "${PEERS_PY:-}" ] && return 0
  [ -d "$CARRY/whl" ] || { echo "no $CARRY/whl: run 'bash scripts/gpu_session.sh prepare' here and carry .gpu_carry"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl \
    && rm -rf /tmp/l2l_src && cp -r "$CARRY/l2l_src" /tmp/l2l_src \
    && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site /tmp/l2l_src \
    && "$PY" -c "import higher, torchopt; from learn2learn.algorithms.maml import MAML; print('peers import: ok')"
}

build() {  # the extension in place, with the CUDA kernels when DEVICE is cuda
  [ "${SKIP_BUILD:-0}" = 1 ] && { echo "SKIP_BUILD=1: keeping the current build"; return 0; }
  local cuda=0
  [ "$DEVICE" != cpu ] && cuda=1
  MAX_JOBS=$(nproc) METAFORMER_BUILD_CUDA=$cuda "$PY" setup.py -q build_ext --inplace \
    && "$PY" -c "from metaformer import ops; print('backend', ops.backend(), 'cuda kernels', ops.extension_has_cuda())"
}

built() {  # is the extension there (with CUDA kernels when DEVICE is cuda)?
  "$PY" -c "import sys; from metaformer import ops; sys.exit(0 if ops.backend() == 'extension' and ('$DEVICE' == 'cpu' or ops.extension_has_cuda()) else 1)" 2>/dev/null
}

selftest() {  # the torch-free kernels' own test binary (needs nvcc and a GPU)
  bash scripts/check_cuda_build.sh && build/cuda-check/selftest
}

meta_train() {  # meta_train ORDER OUTNAME: the Conv-4 MAML step, 1 and 5 inner steps, ours against the peers
  "$PY" scripts/bench_meta_train.py --device "$DEVICE" --configs omniglot --steps-list 1,5 --orders "$1" --threads 4 \
    --timed 5 --peers-python "${PEERS_PY:-$PY}" --peers-script "$CARRY/peers_maml.py" --json-out "$OUT/$2.json" \
    --md-out "$OUT/$2.md" ${META_ARGS:-}
}

checks() {  # most needed first: a step the deadline cuts off is the least missed
  step environment 30 environment
  step peers 120 install_peers
  step build 330 build
  step tests_gpu 200 env METAFORMER_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider tests/gpu
  step meta_train_so 200 meta_train so gpu_meta_train
  if [ "$DEVICE" != cpu ]; then step selftest 120 selftest; fi
}

suite() {
  step environment 30 environment
  if ! built; then step build 330 build; fi
  step quick_suite 300 "$PY" scripts/benchmark.py --suite quick --device "$DEVICE" --data-root "$CARRY/data" \
    --threads 2 --jobs "${SUITE_JOBS:-8}" --no-peers --out /tmp/gpu_suite --work /tmp/gpu_suite_work ${SUITE_ARGS:-}
  cp /tmp/gpu_suite/results/quick.json "$OUT/gpu_quick.json" 2>/dev/null || echo "no suite JSON to copy"
  step fused_op 100 "$PY" scripts/bench_inner_update.py --device "$DEVICE" --json "$OUT/gpu_fused_cuda.json"
  if ! "$PY" -c "import higher" 2>/dev/null && [ -z "$PEERS_PY" ]; then step peers 120 install_peers; fi
  step meta_train_fo 200 meta_train fo gpu_meta_train_fo
}

case "$MODE" in
  prepare) prepare; exit $? ;;
  record-tree) record_tree; exit $? ;;
  tree-commit) tree_commit; exit $? ;;
  checks|suite) ;;
  *) echo "usage: bash scripts/gpu_session.sh prepare|checks|suite" >&2; exit 2 ;;
esac
# The device machine gets a copy of the working tree, perhaps without .git: then the commit recorded by `prepare`,
# and whether the copy still matches it, tell the reports (benchmark.py and bench_meta_train.py read these).
if [ -z "${METAFORMER_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1 && [ -f "$CARRY/tree.txt" ]; then
  read -r METAFORMER_COMMIT METAFORMER_DIRTY < <(tree_commit)
  export METAFORMER_COMMIT METAFORMER_DIRTY
fi
mkdir -p "$OUT"
export PYTHONPATH=$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export ROOT CARRY OUT DEVICE PY PEERS_PY SKIP_BUILD
export -f environment install_peers build built selftest meta_train
exec 3>&1 > >(tee "$OUT/gpu_$MODE.log") 2>&1
TEE=$!
"$MODE"
echo "gpu_session $MODE: ${SUMMARY:-see gpu_$MODE.log} ($(($(date +%s) - START)) s)"
exec 1>&3 2>&3 3>&-
wait "$TEE"  # the log is whole before the command returns (the device tool fetches $OUT right after)

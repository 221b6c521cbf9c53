#!/bin/bash
# What is left of the paper grids (issue 11), on one CUDA GPU, inside one device call.
#
#   bash benchmarks/device_grid.sh [SECONDS]        # on the device machine; default 480
#   DEVICE=cpu bash benchmarks/device_grid.sh 0     # pack only (a dry run, anywhere)
#
# Both presets run side by side on the GPU for at most SECONDS (the rungs in float64; every
# ground-truth store is committed and complete, so nothing is retrained, and a store built
# on the CPU loads on the GPU). Then $OUT/grid.tgz holds each configuration finished there
# (rows, diagnostics, timing, config, model) and, while it stays under the 16 MiB a file may
# bring back, the finished rung blobs of the configurations left partial; $OUT/*.log the
# runners' logs and $OUT/status.txt where the grids stand. Merge on the CPU machine:
#
#   pkill -f "curvinf reproduce"                    # no local runner writing the same rows
#   tar xzf <files_at>/grid.tgz -C /work/main && git add results/ && git commit ...
#   make grid                                       # the CPU runners go on with the rest
#
# Rows measured there say so in docs/results.md (device and wall time per configuration).
set -u
limit=${1:-480}
out=${OUT:-/tmp/device_grid}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CURVINF_PROGRESS=0
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
if [ "$device" = cuda ]; then
  $python -c "import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())" \
    || { echo "no CUDA device here"; exit 1; }
fi
for p in paper paper-code; do
  [ "$limit" -gt 0 ] || break  # 0: pack only
  timeout "$limit" $python -m curvinf.cli reproduce --preset "$p" --out "results/$p" \
    --device "$device" --no-progress > "$out/$p.log" 2>&1 &
done
wait
files=()  # configurations finished here: rows that are not committed yet
for d in results/paper/runs/* results/paper-code/runs/*; do
  if [ -e "$d/rows.json" ] && ! git ls-files --error-unmatch "$d/rows.json" > /dev/null 2>&1; then
    files+=("$d"/rows.json "$d"/diagnostics.json "$d"/timing.json "$d"/config.json "$d"/model.pt)
  fi
done
room=$(( 15000000 - $(cat "${files[@]}" /dev/null | wc -c) ))
for d in results/paper/runs/* results/paper-code/runs/*; do  # partial ones, while they fit
  if [ ! -e "$d/rows.json" ] && compgen -G "$d/rungs/*.pt" > /dev/null; then
    size=$(cat "$d"/rungs/*.pt | wc -c)  # float blobs barely compress
    if [ "$size" -lt "$room" ]; then
      files+=("$d"/rungs/*.pt "$d"/config.json "$d"/model.pt)
      room=$(( room - size ))
    fi
  fi
done
rm -f "$out/grid.tgz"
[ ${#files[@]} -gt 0 ] && tar czf "$out/grid.tgz" "${files[@]}"
for p in paper paper-code; do
  $python -m curvinf.cli status "results/$p" 2>&1 | tail -n 3
done > "$out/status.txt"
echo "brought back: ${#files[@]} files"
cat "$out/status.txt"

#!/usr/bin/env bash
# `make demo` after the install: the demo (every learner, test accuracy +- CI), the op
# benchmark's headline table, then where the time of this run went, phase by phase (the
# install's phases when this run installed; bootstrap.sh records them).
# Usage: tools/demo.sh VENV_DIR [demo args...]; DEMO_START = when make started (epoch seconds).
set -euo pipefail
VENV=${1:-.venv}
shift || true
PY="$VENV/bin/python"
START=${DEMO_START:-$(date +%s)}
PHASES=$(mktemp)
trap 'rm -f "$PHASES"' EXIT

"$PY" -m fastmeta demo --phases "$PHASES" "$@"
t=$(date +%s)
# the headline table of the README: the three euclidean shapes, forward+backward
"$PY" bench/bench_proto.py --quick --shapes episode,many-way,omniglot --passes fwd+bwd
printf 'op benchmark (bench_proto headline)\t%d\t3 shapes, fwd+bwd\n' $(( $(date +%s) - t )) >> "$PHASES"

END=$(date +%s)
{
  # the install's phases count when they happened during this run
  if [ -f "$VENV/.bootstrap-phases.tsv" ] && [ "$(stat -c %Y "$VENV/.bootstrap-phases.tsv")" -ge "$START" ]; then
    sed 's/^/install: /' "$VENV/.bootstrap-phases.tsv"
  fi
  cat "$PHASES"
} | awk -F'\t' -v total=$(( END - START )) '
  { name[NR] = $1; sec[NR] = $2; note[NR] = $3; sum += $2; if (length($1) > w) w = length($1) }
  END {
    printf "\nwhere the time of this run went (%d min %02d s in all):\n", total / 60, total % 60
    for (i = 1; i <= NR; i++) printf "  %-" w "s %5d s  %s\n", name[i], sec[i], note[i]
    printf "  %-" w "s %5d s\n", "other (make, imports, start-up)", total - sum
  }'

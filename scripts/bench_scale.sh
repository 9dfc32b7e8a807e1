#!/usr/bin/env bash
# The scale benchmark (issue 10): engaged against the same ten rules as plain
# SQL (../shared/bench), measured back to back in one sitting on the same data.
#
#   scripts/bench_scale.sh [CUSTOMERS]        default 1000000
#   scripts/bench.sh scale [CUSTOMERS]        the same
#
# Steps: generate the data once (gen.py N 9 1, kept in bench-data/scale-N/data),
# import it into a fresh SQLite store (rows/s), then time
#   baseline → fresh night (`run`, until its plan is committed) → baseline →
#   rerun of the same night (everything deduplicated) → baseline,
# and the peak RSS of run, rerun, `run --dry-run`, `plan` and `simulate --all`.
# Planning is timed from the start of `engaged run` to its "Run planned" log
# line; the run is then stopped (SIGTERM), so delivery is not measured here
# (scripts/bench.sh measures delivery). Prints each figure and the ratios
# engaged ÷ baseline (the mean of the baseline's three timings).
#
# Needs python3 and /usr/bin/time; writes only under bench-data/.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
SHARED="${BENCH_SHARED:-$(cd .. && pwd)/shared/bench}"
OUT="$PWD/bench-data/scale-$N"
DATA="$OUT/data"
NOW="2026-03-10T12:00:00Z"
BIN="$PWD/target/release/engaged"

cargo build --release --quiet
mkdir -p "$OUT"
if [ ! -s "$DATA/events.jsonl" ]; then
  echo "generating $N customers…"
  python3 "$SHARED/gen.py" "$DATA" "$N" 9 1
fi
rm -f "$OUT"/engaged.db* && rm -rf "$OUT/outbox"
cat > "$OUT/engaged.toml" <<TOML
[database]
url = "sqlite://$OUT/engaged.db"
[rules]
dir = "$SHARED/rules"
[templates]
dir = "$SHARED/templates"
[mail]
from = "Acme <hello@acme.test>"
transport = "file"
outbox_dir = "$OUT/outbox"
TOML
# For the run over what changed (issue 10, point 4): the same settings and a
# schedule over what changed (a separate file, so that `simulate` above does
# not simulate its 1,440 fire times a day).
{ cat "$OUT/engaged.toml"; cat <<'TOML'
[[schedules]]
name = "changed"
cron = "0 * * * * *"
rules = ["welcome"]
customers = "changed"
TOML
} > "$OUT/changed.toml"
cd "$OUT"

# Seconds and peak KB of a command: "SECONDS KB".
measure() {
  /usr/bin/time -f '%e %M' -o "$OUT/time.txt" "$@" > "$OUT/cmd.out" 2> "$OUT/cmd.err"
  cat "$OUT/time.txt" | tail -1
}

# Seconds until the run's plan is committed, and its peak KB (extra
# arguments go to `engaged run`).
plan_time() {
  local start pid t=""
  start=$(date +%s.%N)
  ENGAGED_LOG=info /usr/bin/time -f '%M' -o "$OUT/time.txt" "$BIN" --config "${CFG:-$OUT/engaged.toml}" run --now "$NOW" "$@" \
    > "$OUT/run.out" 2> "$OUT/run.err" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if grep -q "Run planned" "$OUT/run.err"; then
      t=$(python3 -c "import time; print(round(time.time() - $start, 2))")
      pkill -TERM -P "$pid" || true
      break
    fi
    sleep 0.1
  done
  wait "$pid" || true
  [ -n "$t" ] || { echo "the run ended without planning:" >&2; tail -5 "$OUT/run.err" >&2; exit 1; }
  echo "$t $(tail -1 "$OUT/time.txt")"
}

baseline() {
  python3 "$SHARED/sql_baseline.py" "$DATA" > "$OUT/baseline.out"
  grep -o '[0-9.]* s for' "$OUT/baseline.out" | cut -d' ' -f1
}

read -r t kb < <(measure "$BIN" import customers "$DATA/customers.csv")
echo "import customers: $t s, $(python3 -c "print(round($N / $t))") rows/s, peak $kb KB"
lines=$(wc -l < "$DATA/events.jsonl")
read -r t kb < <(measure "$BIN" import events "$DATA/events.jsonl")
echo "import events: $t s, $(python3 -c "print(round($lines / $t))") lines/s, peak $kb KB"

baseline > /dev/null # loads baseline.db once (untimed by the baseline itself)
b1=$(baseline)
read -r fresh fresh_kb < <(plan_time)
b2=$(baseline)
read -r rerun rerun_kb < <(plan_time)
b3=$(baseline)
read -r dry dry_kb < <(measure "$BIN" run --dry-run --now "$NOW")
read -r plan plan_kb < <(measure "$BIN" plan --now "$NOW")
read -r sim sim_kb < <(measure "$BIN" simulate --all --days 1 --now "$NOW")
# A schedule over what changed: its first run covers everyone (and sets its
# watermark); then 1,000 customers get an event and the next run covers them.
read -r chg0 chg0_kb < <(CFG="$OUT/changed.toml" plan_time --schedule changed)
python3 - "$DATA/customers.csv" "$OUT/changed.jsonl" <<'PY'
import csv, sys
ids = [r["id"] for r in csv.DictReader(open(sys.argv[1]))]
step = max(1, len(ids) // 1000)
with open(sys.argv[2], "w") as f:
    for n, i in enumerate(ids[::step][:1000]):
        f.write('{"type":"track","userId":"%s","event":"login","timestamp":"2026-03-10T11:00:00Z","messageId":"bench-changed-%d"}\n' % (i, n))
PY
"$BIN" import events "$OUT/changed.jsonl" > /dev/null
read -r chg chg_kb < <(CFG="$OUT/changed.toml" plan_time --schedule changed)
chg_customers=$("$BIN" runs --json | python3 -c "import json, sys; print(json.load(sys.stdin)[0]['summary']['customers'])")
echo "run over what changed: first (everyone) $chg0 s; then $chg_customers changed customers in $chg s (process start to plan committed), peak $chg_kb KB"

python3 - "$OUT" "$b1" "$b2" "$b3" "$fresh" "$fresh_kb" "$rerun" "$rerun_kb" \
  "$dry" "$dry_kb" "$plan" "$plan_kb" "$sim" "$sim_kb" "$BIN" <<'PY'
import json, subprocess, sys
out, b1, b2, b3, fresh, fresh_kb, rerun, rerun_kb, dry, dry_kb, plan, plan_kb, sim, sim_kb, binary = sys.argv[1:]
base = (float(b1) + float(b2) + float(b3)) / 3
print(f"baseline (plain SQL): {b1} / {b2} / {b3} s, mean {base:.2f} s")
print(f"planning, fresh night: {fresh} s = {float(fresh) / base:.1f}x baseline, peak {int(fresh_kb) // 1024} MB")
print(f"planning, rerun:       {rerun} s = {float(rerun) / base:.1f}x baseline, peak {int(rerun_kb) // 1024} MB")
print(f"run --dry-run: {dry} s, peak {int(dry_kb) // 1024} MB")
print(f"plan:          {plan} s, peak {int(plan_kb) // 1024} MB")
print(f"simulate --all --days 1: {sim} s, peak {int(sim_kb) // 1024} MB")
# Per-rule counts of the fresh night against the baseline's.
sql = json.loads(open(f"{out}/baseline.out").readline())
runs = json.loads(subprocess.run([binary, "runs", "--json"], capture_output=True, text=True, cwd=out, check=True).stdout)
first = min(runs, key=lambda r: r["id"])
rules = first["summary"]["rules"]
ours = {rule: c["planned"] for rule, c in rules.items()}
theirs = dict(sql)
theirs["nps"] = theirs.pop("nps_escalate") + theirs.pop("nps_review")
same = ours == theirs
print("per-rule counts equal the baseline's:" , "yes" if same else "NO")
if not same:
    print("  engaged: ", ours)
    print("  baseline:", theirs)
PY

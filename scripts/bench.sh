#!/usr/bin/env bash
# Benchmark: 100k customers with 1M events on SQLite, the shipped rules, and
# delivery into postfix's smtp-sink. Prints the numbers BENCHMARKS.md records.
#
#   scripts/bench.sh [CUSTOMERS] [EVENTS_PER_CUSTOMER]
#   BENCH_DATABASE_URL=postgres://postgres@127.0.0.1/engaged_bench scripts/bench.sh 20000 10
#
# With BENCH_DATABASE_URL (postgres://…) the store is that PostgreSQL
# database, dropped and created afresh first (with psql, through the server's
# `postgres` database); otherwise a fresh SQLite file in ./bench-data/.
#
# Needs: apt-get (to fetch the postfix package; nothing is installed or
# started system-wide), /usr/bin/time, psql for PostgreSQL. Everything else
# goes to ./bench-data/.
#   scripts/bench.sh scale [CUSTOMERS]   the 1M scale case against the plain-SQL
#                                       baseline (scripts/bench_scale.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = scale ]; then
  shift
  exec scripts/bench_scale.sh "$@"
fi
CUSTOMERS="${1:-100000}"
PER="${2:-10}"
NOW="2026-06-15T02:00:00Z"
OUT="$PWD/bench-data"
BIN="$PWD/target/release/engaged"
SINK_PORT=25250

cargo build --release --quiet
rm -rf "$OUT" && mkdir -p "$OUT"

# postfix's smtp-sink, run from the extracted package (no mail server started).
if [ ! -x "$OUT/../target/postfix/usr/sbin/smtp-sink" ]; then
  mkdir -p target/postfix-deb
  (cd target/postfix-deb && apt-get download postfix >/dev/null 2>&1)
  dpkg -x target/postfix-deb/postfix_*.deb target/postfix
fi
SINK="$PWD/target/postfix/usr/sbin/smtp-sink"
export LD_LIBRARY_PATH="$PWD/target/postfix/usr/lib/postfix"
# -c counts sessions/messages on stdout; -u nobody because it refuses to run as root.
"$SINK" -u nobody -c 127.0.0.1:$SINK_PORT 1000 > "$OUT/sink.log" 2>&1 &
SINK_PID=$!
trap 'kill $SINK_PID 2>/dev/null || true' EXIT

DB_URL="${BENCH_DATABASE_URL:-sqlite://$OUT/engaged.db}"
case "$DB_URL" in
  postgres://*|postgresql://*)
    DB_NAME="${DB_URL##*/}"; DB_NAME="${DB_NAME%%\?*}"
    psql -q "${DB_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" -c "CREATE DATABASE $DB_NAME"
    ;;
esac

cat > "$OUT/engaged.toml" <<TOML
[database]
url = "$DB_URL"
[rules]
dir = "$PWD/rules"
[templates]
dir = "$PWD/templates"
[mail]
from = "Acme <hello@acme.test>"
smtp_url = "smtp://127.0.0.1:$SINK_PORT"
[delivery]
concurrency = 4
TOML

measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" > "$OUT/$label.out" 2> "$OUT/$label.err"
  read -r secs kb < "$OUT/time.txt"
  echo "$label: ${secs}s, peak RSS $((kb / 1024)) MiB"
}

measure generate "$BIN" sample-data "$OUT/data" --customers "$CUSTOMERS" --events-per-customer "$PER" --now "$NOW"
cat "$OUT/generate.out"
measure import_customers "$BIN" --config "$OUT/engaged.toml" import customers "$OUT/data/customers.csv"
cat "$OUT/import_customers.out"
measure import_events "$BIN" --config "$OUT/engaged.toml" import events "$OUT/data/events.jsonl"
cat "$OUT/import_events.out"
events=$(wc -l < "$OUT/data/events.jsonl")
echo "import events/s: $(python3 -c "print(round($events / $(cut -d' ' -f1 "$OUT/time.txt")))")"

measure run "$BIN" --config "$OUT/engaged.toml" run --now "$NOW" --json
python3 - "$OUT/run.out" "$(cut -d' ' -f1 "$OUT/time.txt")" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
total = float(sys.argv[2])
ev, secs = s["evaluations"], s["evaluation_seconds"]
sent = s["delivery"]["sent"]
print(f"customers {s['customers']}, evaluations {ev} in {secs:.2f}s = {ev/secs:,.0f} customer-rule evaluations/s")
print(f"planned actions: {sum(r['planned'] for r in s['rules'].values())}, delivered {sent}, failed {s['delivery']['failed']}")
print(f"end-to-end run {total:.2f}s; delivery ≈ {sent/(total-secs):,.0f} messages/s into smtp-sink (run time minus evaluation)")
PY

# The same night again: everything is deduplicated (each repeat is recorded
# on its action), nothing is sent. This is the steady-state cost of a run.
measure rerun "$BIN" --config "$OUT/engaged.toml" run --now "$NOW" --json
python3 - "$OUT/rerun.out" "$(cut -d' ' -f1 "$OUT/time.txt")" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
dedup = sum(r["deduplicated"] for r in s["rules"].values())
print(f"rerun {float(sys.argv[2]):.2f}s: {dedup} actions deduplicated, {s['delivery']['sent']} sent")
PY

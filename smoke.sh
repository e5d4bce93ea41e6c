#!/usr/bin/env bash
# End-to-end smoke test: a real observerd on a free port, driven with curl, killed and restarted.
# Prints each assertion; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

fail() { echo "FAIL: $*"; echo "--- daemon log:"; cat "$work/daemon.log"; exit 1; }
pass() { echo "ok   $*"; }

start_daemon() {
  : > "$work/daemon.log"
  "$PY" observerd.py --config lakehouse.toml --bind 127.0.0.1:0 --persist-path "$work/ops.jsonl" \
    2>>"$work/daemon.log" &
  pid=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*msg=listening addr=\([^ ]*\).*/\1/p' "$work/daemon.log")
    [ -n "$addr" ] && { base="http://$addr"; break; }
    kill -0 "$pid" 2>/dev/null || fail "daemon exited at startup"
    sleep 0.05
  done
  [ -n "$addr" ] || fail "daemon did not log its address within 5 s"
  # It answers at once and takes ops once its ring is restored: GET /observer/ready says when.
  for _ in $(seq 100); do
    [ "$(curl -sS -o /dev/null -w '%{http_code}' "$base/observer/ready")" = 200 ] && return
    sleep 0.05
  done
  fail "daemon not ready within 5 s"
}

# expect_json DESCRIPTION JSON PYTHON-EXPR: evaluates EXPR with the parsed JSON bound to j.
expect_json() {
  "$PY" -c 'import json,sys; j=json.loads(sys.argv[1]); sys.exit(0 if eval(sys.argv[2]) else 1)' "$2" "$3" \
    && pass "$1" || fail "$1: got $2"
}

post() { curl -sS -o "$work/body" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
  --data "$1" "$base/observer/event"; }

start_daemon
pass "daemon listening on $base, and ready"

i=0
for event in \
  '{"endpoint":"/mcp/search","source":"mcp","success":true,"duration_ms":12}' \
  '{"endpoint":"/mcp/search","source":"mcp","success":false,"error":"timeout after 30s"}' \
  '{"endpoint":"/scenario/checkout","source":"scenario","success":true,"duration_ms":840}' \
  '{"endpoint":"/scenario/checkout","source":"scenario","success":true,"duration_ms":910}' \
  '{"endpoint":"/scenario/refund","source":"scenario","success":false,"error":"HTTP 500"}'; do
  i=$((i + 1))
  code=$(post "$event")
  [ "$code" = 200 ] || fail "event $i: status $code: $(cat "$work/body")"
  expect_json "event $i accepted with ring_size $i" "$(cat "$work/body")" "j == {'accepted': True, 'ring_size': $i}"
done

stats=$(curl -sS "$base/observer/stats")
expect_json "stats: 5 total, 3 ok, 2 failed" "$stats" "(j['total'], j['successes'], j['failures']) == (5, 3, 2)"
expect_json "stats: by_source mcp=2 scenario=3" "$stats" "j['by_source'] == {'mcp': 2, 'scenario': 3}"
expect_json "stats: 3 recent scenario ops, oldest first" "$stats" \
  "[o['duration_ms'] for o in j['recent_scenario_ops']] == [840, 910, 0]"

code=$(post '{"endpoint":"   "}')
[ "$code" = 400 ] || fail "blank endpoint: status $code"
expect_json "blank endpoint is a 400 naming the field" "$(cat "$work/body")" "'endpoint' in j['error']"

lines=$(wc -l < "$work/ops.jsonl")
[ "$lines" -eq 5 ] && pass "ops.jsonl holds exactly 5 lines" || fail "ops.jsonl holds $lines lines"

metrics=$(curl -sS "$base/metrics")
grep -q '^observerd_events_total{source="scenario",success="true"} 2$' <<<"$metrics" \
  && pass "metrics: events_total counts scenario successes" || fail "metrics: $metrics"
"$PY" observerd.py check --config lakehouse.toml --bind 127.0.0.1:0 >/dev/null && pass "check: shipped lakehouse.toml is valid" \
  || fail "check rejected lakehouse.toml"

# The first answer in one command, the same from the files, over --url and over HTTP.
counts=$("$PY" observerd.py ops "$work/ops.jsonl" --since 10m --failed --count-by endpoint -o json) \
  || fail "ops --count-by exited $?"
expect_json "ops --since 10m --failed --count-by endpoint: two endpoints, one failure each" "$counts" \
  "sorted((g['value'], g['failures'], g['ops']) for g in j['groups']) == [('/mcp/search', 1, 2), ('/scenario/refund', 1, 1)]"
remote=$("$PY" observerd.py ops --url "$base" --since 10m --failed --count-by endpoint -o json) \
  || fail "ops --url --count-by exited $?"
expect_json "ops --url counts alike" "$remote" "j['groups'] == $(printf '%s' "$counts" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["groups"])')"
expect_json "GET /observer/history?count_by= counts alike" \
  "$(curl -sS "$base/observer/history?since=10m&failed&count_by=endpoint")" "len(j['groups']) == 2 and not j['truncated']"
newest=$("$PY" observerd.py ops --url "$base" --failed -n 1 -o ndjson) || fail "ops --url exited $?"
expect_json "ops --url --failed -n 1: the newest failure" "$newest" "j['endpoint'] == '/scenario/refund'"
expect_json "stats --url: what the daemon serves" "$("$PY" observerd.py stats --url "$base")" "j['total'] == 5"
"$PY" observerd.py top --once --url "$base" | grep -q "ENDPOINTS OF THE LAST 5m" \
  && pass "top --once ranks the last 5 minutes" || fail "top --once"

kill -9 "$pid"; wait "$pid" 2>/dev/null || true
pass "daemon killed with SIGKILL"
start_daemon
for _ in $(seq 20); do grep -q 'msg="restored ops"' "$work/daemon.log" && break; sleep 0.05; done
grep -q 'msg="restored ops" count=5' "$work/daemon.log" && pass "restart restored 5 ops" \
  || fail "restart did not log count=5"
stats=$(curl -sS "$base/observer/stats")
expect_json "after restart: 5 total, 3 ok, 2 failed" "$stats" "(j['total'], j['successes'], j['failures']) == (5, 3, 2)"
expect_json "after restart: by_source unchanged" "$stats" "j['by_source'] == {'mcp': 2, 'scenario': 3}"

retried='{"endpoint":"/mcp/search","op_id":"smoke-retry-1","success":true,"duration_ms":9}'
code=$(post "$retried")
[ "$code" = 200 ] || fail "op with an op_id: status $code: $(cat "$work/body")"
expect_json "op with an op_id is stored" "$(cat "$work/body")" "j == {'accepted': True, 'duplicate': False, 'ring_size': 6}"
before=$(curl -sS "$base/observer/stats")
code=$(post "$retried")
[ "$code" = 200 ] || fail "duplicate op_id: status $code: $(cat "$work/body")"
expect_json "the same op_id again is acknowledged as a duplicate" "$(cat "$work/body")" \
  "j == {'accepted': True, 'duplicate': True, 'ring_size': 6}"
[ "$(curl -sS "$base/observer/stats")" = "$before" ] && pass "a duplicate POST leaves stats unchanged" \
  || fail "stats changed after a duplicate POST"
copies=$(grep -c '"op_id":"smoke-retry-1"' "$work/ops.jsonl")
[ "$copies" -eq 1 ] && pass "ops.jsonl holds the op_id once" || fail "ops.jsonl holds it $copies times"

kill -TERM "$pid"
for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$pid" 2>/dev/null && fail "daemon still running 2 s after SIGTERM"
wait "$pid" && pass "SIGTERM: clean exit 0" || fail "SIGTERM: exit status $?"
pid=""
echo "smoke: all assertions passed"

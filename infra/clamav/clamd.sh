#!/usr/bin/env bash
# Run a private ClamAV daemon (Debian's clamav-daemon) on 127.0.0.1 for Bulwark:
# its own clamd.conf, database directory, log and pid file; never the system one.
#
# Usage: infra/clamav/clamd.sh <command>
#
#   start      build the project's signature database when needed, write clamd.conf
#              (rendered from clamd.conf.template beside this script),
#              start clamd in the background and wait until it answers PING;
#              no-op when already running
#   run        the same, but clamd runs in the foreground in place of this script
#              (a container's command: the compose stack's clamd service)
#   config     print the clamd.conf that start and run write
#   stop       SIGTERM clamd, SIGKILL after $BULWARK_CLAMD_STOP_TIMEOUT s
#   status     exit 0 if our clamd is running and answering, 1 if not,
#              2 if something else answers on the port
#   build-db   (re)build the project's database from infra/clamav/signatures/
#   version    print what clamd's VERSION command answers (engine/db version/db date)
#   logs [N]   tail the clamd log
#   address    print host:port
#
# Environment (defaults in brackets):
#   BULWARK_CLAMD_HOST           listen address [127.0.0.1]
#   BULWARK_CLAMD_PORT           TCP port for the INSTREAM protocol [3310]
#   BULWARK_CLAMD_DIR            state dir: clamd.conf, clamd.log, clamd.pid, tmp/,
#                                the built database db/ [<repo>/var/clamd]
#   BULWARK_CLAMAV_DB            database directory clamd loads. Unset: the project's
#                                own database, built from infra/clamav/signatures/ into
#                                $BULWARK_CLAMD_DIR/db. Set it to a real database
#                                directory (e.g. /var/lib/clamav kept current by an
#                                operator's freshclam) to scan with the official signatures.
#   BULWARK_CLAMD_START_TIMEOUT  seconds to wait for PING [120]
#   BULWARK_CLAMD_STOP_TIMEOUT   seconds to wait after SIGTERM [20]
#   BULWARK_CLAMD_EXTRA_CONFIG   extra clamd.conf lines; they replace the generated
#                                lines for the same options (e.g. "MaxFileSize 100M") []
#
# The project's database
#   infra/clamav/signatures/*.ndb (text, one signature a line) hold the EICAR test
#   signature and the signatures of the project's own harmless test samples.
#   `build-db` packs them with `sigtool --build --unsigned` into db/daily.cud,
#   versioned by infra/clamav/signatures/VERSION, so clamd's VERSION command (which
#   reports the database named "daily") names the database version in every verdict.
#   To add a signature: append a line to bulwark.ndb (hex from
#   `printf %s 'bytes' | sigtool --hex-dump`), bump VERSION, then `clamd.sh build-db`
#   (start does it too when the sources changed) and restart clamd.
#   Signature names get ClamAV's ".UNOFFICIAL" suffix.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
SIG_DIR="$SCRIPT_DIR/signatures"

HOST="${BULWARK_CLAMD_HOST:-127.0.0.1}"
# Where status and version knock: loopback when clamd listens everywhere (a container).
case "$HOST" in 0.0.0.0 | :: | "") PROBE_HOST=127.0.0.1 ;; *) PROBE_HOST="$HOST" ;; esac
PORT="${BULWARK_CLAMD_PORT:-3310}"
CDIR="${BULWARK_CLAMD_DIR:-$REPO_ROOT/var/clamd}"
START_TIMEOUT="${BULWARK_CLAMD_START_TIMEOUT:-120}"
STOP_TIMEOUT="${BULWARK_CLAMD_STOP_TIMEOUT:-20}"
case "$CDIR" in /*) ;; *) CDIR="$PWD/$CDIR" ;; esac

BUILT_DB="$CDIR/db"
DB="${BULWARK_CLAMAV_DB:-$BUILT_DB}"
CONF="$CDIR/clamd.conf"
PID_FILE="$CDIR/clamd.pid"
LOG_FILE="$CDIR/clamd.log"
OUT_LOG="$CDIR/clamd.out"

log() { printf 'clamd.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

clamd_bin() {
  local bin
  for bin in "$(command -v clamd 2>/dev/null || true)" /usr/sbin/clamd; do
    [[ -n "$bin" && -x "$bin" ]] && { printf '%s\n' "$bin"; return 0; }
  done
  die "clamd not found: install Debian's clamav-daemon (apt-get install clamav-daemon clamav)"
}

# ---------------------------------------------------------------- database

sources_sha() { cat "$SIG_DIR"/VERSION "$SIG_DIR"/*.ndb | sha256sum | awk '{ print $1 }'; }

cmd_build_db() {
  command -v sigtool >/dev/null || die "sigtool not found: install Debian's clamav"
  local version tmp
  version="$(tr -dc '0-9' <"$SIG_DIR/VERSION")"
  [[ -n "$version" ]] || die "$SIG_DIR/VERSION holds no version number"
  mkdir -p "$CDIR"
  tmp="$(mktemp -d "$CDIR/db.build.XXXXXX")"
  # sigtool packs only the files named after the database it builds.
  cat "$SIG_DIR"/*.ndb >"$tmp/daily.ndb"
  # sigtool insists on a COPYING file and asks for a builder name on stdin;
  # --datadir keeps it from reading (or bumping past) the system database.
  printf 'Bulwark test signatures: EICAR and the project'"'"'s own harmless samples.\n' >"$tmp/COPYING"
  if ! (cd "$tmp" && printf 'bulwark\n' | sigtool --quiet --datadir="$tmp" --build=daily.cud --unsigned \
      --cvd-version="$version" --no-cdiff >"$tmp.log" 2>&1) || [[ ! -s "$tmp/daily.cud" ]]; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"
    die "sigtool could not build the database"
  fi
  rm -rf "$BUILT_DB" "$tmp.log"
  mkdir -p "$BUILT_DB"
  mv "$tmp/daily.cud" "$BUILT_DB/daily.cud"
  rm -rf "$tmp"
  sources_sha >"$BUILT_DB/.sources.sha256"
  log "built $BUILT_DB/daily.cud (version $version)"
}

ensure_db() {
  if [[ -n "${BULWARK_CLAMAV_DB:-}" ]]; then
    [[ -d "$DB" ]] || die "BULWARK_CLAMAV_DB=$DB is not a directory"
    return 0
  fi
  if [[ ! -s "$BUILT_DB/daily.cud" || "$(cat "$BUILT_DB/.sources.sha256" 2>/dev/null)" != "$(sources_sha)" ]]; then
    cmd_build_db
  fi
}

# ---------------------------------------------------------------- liveness

read_pid() { [[ -f "$PID_FILE" ]] && tr -dc '0-9' <"$PID_FILE"; }

pid_alive() {
  local pid="$1" state
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    state="$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != Z ]] || return 1
    # Guard against pid reuse: it must be a clamd reading our config.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$CONF" || return 1
  fi
}

is_running() { pid_alive "$(read_pid || true)"; }

# clamd's own protocol: "zPING\0" answers "PONG\0" once the database is loaded.
clamd_says() { # COMMAND
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "z%s\0" "$3" >&3
    tr -d "\0" <&3' _ "$PROBE_HOST" "$PORT" "$1" 2>/dev/null
}

answers() { [[ "$(clamd_says PING || true)" == PONG ]]; }

port_open() { timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$PROBE_HOST" "$PORT" 2>/dev/null; }

tail_logs() {
  local f
  for f in "$LOG_FILE" "$OUT_LOG"; do
    if [[ -s "$f" ]]; then
      log "---- last lines of $f ----"
      tail -n "${1:-30}" "$f" >&2
    fi
  done
}

# ---------------------------------------------------------------- start/stop

TEMPLATE="$SCRIPT_DIR/clamd.conf.template"

# clamd.conf from clamd.conf.template, the one place clamd's settings live
# (make run, the tests and the compose stack all render it here).
render_config() {
  local conf keys
  [[ -r "$TEMPLATE" ]] || die "$TEMPLATE not found"
  conf="$(<"$TEMPLATE")"
  # Quoted replacements: bash 5.2 would otherwise expand & in them.
  conf="${conf//@HOST@/"$HOST"}"
  conf="${conf//@PORT@/"$PORT"}"
  conf="${conf//@PID_FILE@/"$PID_FILE"}"
  conf="${conf//@LOG_FILE@/"$LOG_FILE"}"
  conf="${conf//@TMP_DIR@/"$CDIR/tmp"}"
  conf="${conf//@DATABASE_DIR@/"$DB"}"
  [[ "$conf" != *@[A-Z_]*@* ]] || die "$TEMPLATE has a placeholder clamd.sh does not fill in"
  if [[ -n "${BULWARK_CLAMD_EXTRA_CONFIG:-}" ]]; then
    # clamd keeps the first value of an option it reads twice, so drop the
    # template's lines for every option the extra config sets.
    keys="$(printf '%s\n' "$BULWARK_CLAMD_EXTRA_CONFIG" | awk '$1 !~ /^#/ && NF { print $1 }' | paste -sd '|')"
    printf '%s\n' "$conf" | awk -v keys="^($keys)\$" '$1 ~ keys { next } { print }'
    printf '\n# BULWARK_CLAMD_EXTRA_CONFIG\n%s\n' "$BULWARK_CLAMD_EXTRA_CONFIG"
  else
    printf '%s\n' "$conf"
  fi
}

write_config() {
  render_config >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
}

cmd_start() {
  local clamd pid deadline
  clamd="$(clamd_bin)"
  mkdir -p "$CDIR/tmp"
  exec 9>"$CDIR/.lock"
  flock -w $((START_TIMEOUT + 30)) 9 || die "another clamd.sh holds $CDIR/.lock"

  if is_running; then
    pid="$(read_pid)"
    deadline=$((SECONDS + START_TIMEOUT))
    until answers; do
      ((SECONDS < deadline)) || die "clamd pid $pid is running but not answering on $HOST:$PORT"
      sleep 0.2
    done
    log "already running (pid $pid) on $HOST:$PORT"
    return 0
  fi
  rm -f "$PID_FILE"
  port_open && die "$HOST:$PORT is already in use by another process (not our pid file in $CDIR)"

  ensure_db
  write_config
  : >"$OUT_LOG"
  # (9>&-: clamd must not inherit the lock fd.)
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PID_FILE" \
    "$clamd" --foreground --config-file="$CONF" </dev/null >>"$OUT_LOG" 2>&1 9>&- &
  local i
  for i in $(seq 50); do [[ -s "$PID_FILE" ]] && break; sleep 0.05; done
  pid="$(read_pid || true)"
  [[ -n "$pid" ]] || die "clamd did not start (no pid file)"

  deadline=$((SECONDS + START_TIMEOUT))
  until answers; do
    if ! pid_alive "$pid" || ((SECONDS >= deadline)); then
      tail_logs
      kill -TERM "$pid" 2>/dev/null || true
      rm -f "$PID_FILE"
      die "clamd did not answer PING on $HOST:$PORT"
    fi
    sleep 0.2
  done
  log "ready on $HOST:$PORT (pid $pid, database $DB: $(clamd_says VERSION || true))"
}

# In a container: clamd in the foreground as this process (so the container's
# init signals it directly); `status` works as for `start`.
cmd_run() {
  local clamd
  clamd="$(clamd_bin)"
  mkdir -p "$CDIR/tmp"
  ensure_db
  write_config
  echo $$ >"$PID_FILE"
  log "starting clamd on $HOST:$PORT (database $DB)"
  exec "$clamd" --foreground --config-file="$CONF"
}

cmd_stop() {
  local pid i
  pid="$(read_pid || true)"
  if ! pid_alive "$pid"; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pid_alive "$pid" || break
    sleep 0.1
  done
  if pid_alive "$pid"; then
    log "pid $pid still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE"
  log "stopped (pid $pid)"
}

cmd_status() {
  if is_running; then
    if answers; then
      echo "running: pid $(read_pid) on $HOST:$PORT ($(clamd_says VERSION))"
      return 0
    fi
    echo "starting or unhealthy: pid $(read_pid) not answering on $HOST:$PORT"
    return 1
  fi
  if port_open; then
    echo "not ours: something else answers on $HOST:$PORT (no live pid in $CDIR)"
    return 2
  fi
  echo "not running ($HOST:$PORT, dir $CDIR)"
  return 1
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; }

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    start) cmd_start ;;
    run) cmd_run ;;
    config) render_config ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    build-db) cmd_build_db ;;
    version) clamd_says VERSION || die "clamd does not answer on $HOST:$PORT"; echo ;;
    logs) tail -n "${1:-100}" "$LOG_FILE" ;;
    address) echo "$HOST:$PORT" ;;
    -h | --help | help) usage ;;
    *) usage; exit 64 ;;
  esac
}

main "$@"

#!/usr/bin/env bash
# Run a single-node Apache Kafka (KRaft, combined broker+controller) on
# 127.0.0.1 straight from Maven Central jars: no Docker, no Kafka tarball.
#
# Usage: infra/kafka/kafka.sh <command> [args]
#
#   resolve          copy the broker jars (infra/kafka/pom.xml) into $BULWARK_KAFKA_LIBS,
#                    only when missing or when pom.xml changed (sha256 stamp)
#   start            write server.properties, format storage once, start the broker
#                    in the background and wait until it answers; no-op when running
#   stop             SIGTERM the broker, SIGKILL after $BULWARK_KAFKA_STOP_TIMEOUT s
#   status           exit 0 if our broker is running and answering, 1 if not,
#                    2 if something else answers on the port
#   wait [SECONDS]   wait until a broker answers on the port (ours or not)
#   topics ARGS...   kafka-topics (TopicCommand) against this broker,
#                    e.g. `kafka.sh topics --list`
#   tool CLASS ARGS  run any Kafka tool main class on the broker classpath
#   logs [N]         tail the broker log
#   bootstrap        print the bootstrap address (host:port)
#   client-config    print the path of the tools' --command-config (secure profile)
#
# Environment (defaults in brackets):
#   BULWARK_KAFKA_PORT             client listener port [9092]
#   BULWARK_KAFKA_CONTROLLER_PORT  KRaft controller port [BULWARK_KAFKA_PORT + 1]
#   BULWARK_KAFKA_HOST             listen / advertised address [127.0.0.1]
#   BULWARK_KAFKA_DIR              state dir: server.properties, data/, server.log,
#                                  kafka.out, kafka.pid [<repo>/var/kafka]
#   BULWARK_KAFKA_LIBS             jar dir [<repo>/.cache/kafka/libs]
#   BULWARK_KAFKA_START_TIMEOUT    seconds to wait for readiness [60]
#   BULWARK_KAFKA_STOP_TIMEOUT     seconds to wait after SIGTERM [30]
#   BULWARK_KAFKA_HEAP_OPTS        broker heap [-Xms256m -Xmx1g]
#   BULWARK_KAFKA_JVM_OPTS         extra broker JVM options []
#   BULWARK_KAFKA_EXTRA_CONFIG     extra server.properties lines, appended last
#                                  (so they override the generated ones) []
#   BULWARK_KAFKA_PROFILE          plaintext (loopback default) or secure [plaintext]
#   BULWARK_KAFKA_SECURE_DIR       the secure profile's files, written by
#                                  `bulwark kafka secure-init` [<repo>/var/kafka-secure]:
#                                  ca.pem, broker.pem, credentials/broker.properties
#   JAVA_HOME                      Java 17+; otherwise `java` on PATH
#
# The secure profile: clients on SASL_SSL (SCRAM-SHA-512) with the broker's
# certificate from broker.pem; broker and controller authenticate each other
# with mutual TLS; the StandardAuthorizer denies whatever no ACL allows, and
# User:broker is the only super user. Its SCRAM credential is bootstrapped at
# `kafka-storage format --add-scram`; `bulwark kafka provision` creates the
# other principals and their ACLs. docs/operations.md, "Securing Kafka".
#
# Several brokers can run side by side with different PORT/DIR (tests do that).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
POM="$SCRIPT_DIR/pom.xml"
BROKER_LOG4J="$SCRIPT_DIR/log4j2.properties"
TOOLS_LOG4J="$SCRIPT_DIR/log4j2-tools.properties"

LIBS="${BULWARK_KAFKA_LIBS:-$REPO_ROOT/.cache/kafka/libs}"
HOST="${BULWARK_KAFKA_HOST:-127.0.0.1}"
PORT="${BULWARK_KAFKA_PORT:-9092}"
CPORT="${BULWARK_KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
KDIR="${BULWARK_KAFKA_DIR:-$REPO_ROOT/var/kafka}"
START_TIMEOUT="${BULWARK_KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT="${BULWARK_KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${BULWARK_KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
JVM_OPTS="${BULWARK_KAFKA_JVM_OPTS:-}"
PROFILE="${BULWARK_KAFKA_PROFILE:-plaintext}"
SECURE_DIR="${BULWARK_KAFKA_SECURE_DIR:-$REPO_ROOT/var/kafka-secure}"

case "$KDIR" in /*) ;; *) KDIR="$PWD/$KDIR" ;; esac
case "$LIBS" in /*) ;; *) LIBS="$PWD/$LIBS" ;; esac
case "$SECURE_DIR" in /*) ;; *) SECURE_DIR="$PWD/$SECURE_DIR" ;; esac
case "$PROFILE" in plaintext | secure) ;; *) printf 'kafka.sh: error: BULWARK_KAFKA_PROFILE=%s: plaintext or secure\n' "$PROFILE" >&2; exit 64 ;; esac

PROPS="$KDIR/server.properties"
DATA_DIR="$KDIR/data"
PID_FILE="$KDIR/kafka.pid"
SERVER_LOG="$KDIR/server.log"
OUT_LOG="$KDIR/kafka.out"
STAMP="$LIBS/.pom.sha256"
# The tools' connection settings (the secure profile: the broker's own principal).
CLIENT_PROPS="$KDIR/client.properties"
SCRAM_MARK="$DATA_DIR/.bulwark-scram-bootstrapped"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- java / jars

java_bin() {
  local java
  if [[ -n "${JAVA_HOME:-}" ]]; then
    java="$JAVA_HOME/bin/java"
    [[ -x "$java" ]] || die "JAVA_HOME=$JAVA_HOME has no bin/java"
  else
    java="$(command -v java)" || die "java not found (install Java 17+ or set JAVA_HOME)"
  fi
  printf '%s\n' "$java"
}

check_java_version() {
  local ver major
  ver="$("$JAVA" -version 2>&1 | awk -F'"' '/version/ { print $2; exit }')"
  major="${ver%%.*}"
  [[ "$major" == 1 ]] && major="$(cut -d. -f2 <<<"$ver")"
  [[ "$major" =~ ^[0-9]+$ ]] || { log "warning: cannot parse java version '$ver'"; return 0; }
  ((major >= 17)) || die "Kafka 4.x needs Java 17+, $JAVA is $ver"
}

pom_sha() { sha256sum "$POM" | awk '{ print $1 }'; }

libs_current() {
  [[ -f "$STAMP" && -f "$LIBS/kafka_2.13-$(kafka_version).jar" ]] &&
    [[ "$(cat "$STAMP")" == "$(pom_sha)" ]]
}

kafka_version() { sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM"; }

cmd_resolve() {
  if libs_current; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found; needed once to fetch the Kafka jars into $LIBS"
  local tmp mvnlog
  mkdir -p "$(dirname "$LIBS")"
  # Serialise concurrent resolves (parallel test workers); re-check once locked.
  exec 8>"$LIBS.lock"
  flock -w 600 8 || die "timed out waiting for $LIBS.lock"
  if libs_current; then
    exec 8>&-
    return 0
  fi
  tmp="$(mktemp -d "$LIBS.tmp.XXXXXX")"
  mvnlog="$tmp.log"
  local -a mvn=(mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies
    -DincludeScope=runtime "-DoutputDirectory=$tmp")
  log "resolving Kafka $(kafka_version) jars into $LIBS"
  # Offline first (works whenever ~/.m2 already has everything), then online.
  if ! "${mvn[@]}" -o >"$mvnlog" 2>&1 && ! "${mvn[@]}" >"$mvnlog" 2>&1; then
    cat "$mvnlog" >&2
    rm -rf "$tmp" "$mvnlog"
    die "mvn dependency:copy-dependencies failed"
  fi
  pom_sha >"$tmp/.pom.sha256"
  rm -rf "$LIBS" "$mvnlog"
  mv -T "$tmp" "$LIBS"
  exec 8>&-
}

# Run a Kafka CLI tool (quiet logging, small fast-starting JVM).
run_tool() { run_tool_timeout 0 "$@"; }

run_tool_timeout() { # SECONDS (0 = none) MAIN_CLASS ARGS...
  local secs="$1"
  shift
  timeout "$secs" "$JAVA" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Xshare:auto -Djava.awt.headless=true "-Dlog4j2.configurationFile=$TOOLS_LOG4J" \
    -cp "$LIBS/*" "$@"
}

# ---------------------------------------------------------------- liveness

read_pid() { [[ -f "$PID_FILE" ]] && tr -dc '0-9' <"$PID_FILE"; }

pid_alive() {
  local pid="$1" state
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    # A zombie (nobody reaped it yet) is dead for our purposes.
    state="$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != Z ]] || return 1
    # Guard against pid reuse after a reboot / crash.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  fi
}

is_running() { pid_alive "$(read_pid || true)"; }

port_open() { # host port
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# The port accepting connections is not enough: ask the broker for its API
# versions, which only succeeds once it serves client requests.
broker_answers() {
  port_open "$HOST" "$PORT" &&
    run_tool_timeout 30 org.apache.kafka.tools.BrokerApiVersionsCommand \
      --bootstrap-server "$HOST:$PORT" $(client_config_args) >/dev/null 2>&1
}

# wait_ready TIMEOUT [managed]: poll until answering; when managed, fail fast if
# our process died.
wait_ready() {
  local timeout="$1" managed="${2:-}" deadline
  deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    if [[ -n "$managed" ]] && ! is_running; then
      log "broker process exited during startup"
      return 1
    fi
    if port_open "$HOST" "$PORT" && broker_answers; then
      return 0
    fi
    sleep 0.3
  done
  log "timed out after ${timeout}s waiting for $HOST:$PORT"
  return 1
}

tail_logs() {
  local f
  for f in "$SERVER_LOG" "$OUT_LOG"; do
    if [[ -s "$f" ]]; then
      log "---- last lines of $f ----"
      tail -n "${1:-40}" "$f" >&2
    fi
  done
}

# ---------------------------------------------------------------- start/stop

# --command-config for a Kafka tool: nothing in the plaintext profile.
client_config_args() {
  if [[ "$PROFILE" == secure ]]; then
    printf -- '--command-config\n%s\n' "$CLIENT_PROPS"
  fi
}

# A value of credentials/NAME.properties (username=..., password=...).
credential() { # NAME KEY
  local file="$SECURE_DIR/credentials/$1.properties"
  [[ -r "$file" ]] || die "missing $file: run \`bulwark kafka secure-init\` first"
  sed -n "s/^$2=//p" "$file" | head -n 1
}

check_secure_files() {
  local f
  for f in ca.pem broker.pem credentials/broker.properties; do
    [[ -s "$SECURE_DIR/$f" ]] || die "missing $SECURE_DIR/$f: run \`bulwark kafka secure-init\` first"
  done
}

# The listeners, authentication and authorization of a profile.
write_security_properties() {
  if [[ "$PROFILE" == plaintext ]]; then
    cat <<EOF
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
EOF
    return
  fi
  local user password
  user="$(credential broker username)"
  password="$(credential broker password)"
  cat <<EOF
# Secure profile (BULWARK_KAFKA_PROFILE=secure): clients authenticate with
# SCRAM over TLS; the controller listener takes only the broker's certificate.
listeners=SASL_SSL://$HOST:$PORT,CONTROLLER://$HOST:$CPORT
advertised.listeners=SASL_SSL://$HOST:$PORT
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$password";
ssl.keystore.type=PEM
ssl.keystore.location=$SECURE_DIR/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$SECURE_DIR/ca.pem
ssl.enabled.protocols=TLSv1.3,TLSv1.2
ssl.endpoint.identification.algorithm=https
listener.name.controller.ssl.client.auth=required
# CN=broker on the controller listener is the principal User:broker.
ssl.principal.mapping.rules=RULE:^CN=([^,]+)\$/\$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:$user
EOF
}

write_client_properties() {
  [[ "$PROFILE" == secure ]] || return 0
  local user password
  user="$(credential broker username)"
  password="$(credential broker password)"
  (umask 077 && cat >"$CLIENT_PROPS" <<EOF
# Generated by infra/kafka/kafka.sh: the tools connect as the broker's own principal.
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$password";
ssl.truststore.type=PEM
ssl.truststore.location=$SECURE_DIR/ca.pem
EOF
  )
}

write_properties() {
  (umask 077 && : >"$PROPS")  # it holds the broker's password in the secure profile
  chmod 600 "$PROPS"
  cat >"$PROPS" <<EOF
# Generated by infra/kafka/kafka.sh on every start; edit the script, not this file.
# Single-node KRaft: this process is both broker and the only controller.
process.roles=broker,controller
node.id=1
# Static single-voter quorum; unlike a dynamic (--standalone) quorum the
# controller endpoint is not baked into the formatted metadata log, so the
# ports may change between restarts of the same BULWARK_KAFKA_DIR.
controller.quorum.voters=1@$HOST:$CPORT
controller.listener.names=CONTROLLER
$(write_security_properties)

log.dirs=$DATA_DIR
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true

# Internal topics: one replica (one broker) and few partitions, which makes the
# first consumer group / transaction a little quicker than the default 50.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Kafka's default: members of an empty group that start together join one
# rebalance (a second Faust worker, say), instead of the first taking every
# partition and a rebalance moving them while transactions are open.
group.initial.rebalance.delay.ms=3000
EOF
  if [[ -n "${BULWARK_KAFKA_EXTRA_CONFIG:-}" ]]; then
    printf '\n# BULWARK_KAFKA_EXTRA_CONFIG\n%s\n' "$BULWARK_KAFKA_EXTRA_CONFIG" >>"$PROPS"
  fi
}

# A Kafka Uuid as `kafka-storage random-uuid` prints it (16 random bytes,
# base64url, unpadded), without paying for a JVM start. Kafka never hands out
# ids starting with '-' (they look like CLI flags), so neither do we.
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" == -* ]] || break
  done
  printf '%s\n' "$id"
}

format_storage() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    if [[ "$PROFILE" == secure && ! -f "$SCRAM_MARK" ]]; then
      die "$DATA_DIR was formatted for the plaintext profile, without the broker's SCRAM credential; \
the secure profile needs a data directory of its own (BULWARK_KAFKA_DIR)"
    fi
    return 0
  fi
  local cid
  local -a scram=()
  cid="$(new_cluster_id)"
  if [[ "$PROFILE" == secure ]]; then
    # The broker's own credential, in the metadata log from the start
    # (KIP-900): nobody could create it later without being a super user.
    scram=(--add-scram "SCRAM-SHA-512=[name=$(credential broker username),password=$(credential broker password)]")
  fi
  log "formatting $DATA_DIR (cluster id $cid, $PROFILE profile)"
  run_tool kafka.tools.StorageTool format --config "$PROPS" --cluster-id "$cid" \
    --ignore-formatted "${scram[@]}" >"$KDIR/format.log" 2>&1 ||
    { cat "$KDIR/format.log" >&2; die "storage format failed"; }
  if [[ "$PROFILE" == secure ]]; then : >"$SCRAM_MARK"; fi
}

cmd_start() {
  local t0 pid
  t0="$(now)"
  mkdir -p "$KDIR"
  exec 9>"$KDIR/.lock"
  flock -w $((START_TIMEOUT + 30)) 9 || die "another kafka.sh holds $KDIR/.lock"

  if is_running; then
    pid="$(read_pid)"
    if wait_ready "$START_TIMEOUT" managed; then
      log "already running (pid $pid) on $HOST:$PORT"
      return 0
    fi
    tail_logs
    die "broker pid $pid is running but not answering on $HOST:$PORT"
  fi
  rm -f "$PID_FILE"

  local p
  for p in "$PORT" "$CPORT"; do
    if port_open "$HOST" "$p"; then
      die "$HOST:$p is already in use by another process (not our pid file in $KDIR)"
    fi
  done

  cmd_resolve
  check_java_version
  if [[ "$PROFILE" == secure ]]; then check_secure_files; fi
  write_properties
  write_client_properties
  format_storage

  : >"$OUT_LOG"
  # (9>&-: the broker must not inherit the lock fd, or it would hold the lock.)
  # shellcheck disable=SC2086  # HEAP_OPTS / JVM_OPTS are word lists on purpose
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PID_FILE" \
    "$JAVA" $HEAP_OPTS \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    "-Dkafka.logs.dir=$KDIR" "-Dlog4j2.configurationFile=$BROKER_LOG4J" \
    $JVM_OPTS \
    -cp "$LIBS/*" kafka.Kafka "$PROPS" \
    </dev/null >>"$OUT_LOG" 2>&1 9>&- &
  # Wait for the pid file written by the child (normally instantaneous).
  local i
  for i in $(seq 50); do [[ -s "$PID_FILE" ]] && break; sleep 0.05; done
  pid="$(read_pid || true)"
  [[ -n "$pid" ]] || die "broker did not start (no pid file)"

  if ! wait_ready "$START_TIMEOUT" managed; then
    tail_logs
    stop_pid "$pid" 5
    rm -f "$PID_FILE"
    die "broker failed to become ready"
  fi
  log "ready on $HOST:$PORT (pid $pid, dir $KDIR) after $(elapsed "$t0")s"
}

stop_pid() { # PID TIMEOUT_SECONDS: SIGTERM, then SIGKILL after the timeout
  local pid="$1" secs="$2" i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "pid $pid still alive after ${secs}s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do pid_alive "$pid" || return 0; sleep 0.1; done
  log "warning: pid $pid survived SIGKILL"
}

cmd_stop() {
  local pid
  pid="$(read_pid || true)"
  if ! pid_alive "$pid"; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  stop_pid "$pid" "$STOP_TIMEOUT"
  rm -f "$PID_FILE"
  log "stopped (pid $pid)"
}

cmd_status() {
  if is_running; then
    if broker_answers; then
      echo "running: pid $(read_pid) on $HOST:$PORT (dir $KDIR)"
      return 0
    fi
    echo "starting or unhealthy: pid $(read_pid) not answering on $HOST:$PORT"
    return 1
  fi
  if port_open "$HOST" "$PORT"; then
    echo "not ours: something else answers on $HOST:$PORT (no live pid in $KDIR)"
    return 2
  fi
  echo "not running ($HOST:$PORT, dir $KDIR)"
  return 1
}

cmd_wait() {
  local timeout="${1:-$START_TIMEOUT}" t0
  t0="$(now)"
  wait_ready "$timeout" || exit 1
  log "$HOST:$PORT answering after $(elapsed "$t0")s"
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; }

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    resolve) cmd_resolve ;;
    start) JAVA="$(java_bin)"; cmd_start ;;
    stop) cmd_stop ;;
    status) JAVA="$(java_bin)"; cmd_status ;;
    wait) JAVA="$(java_bin)"; cmd_wait "$@" ;;
    topics)
      JAVA="$(java_bin)"; cmd_resolve
      run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$PORT" $(client_config_args) "$@" ;;
    tool)
      [[ $# -ge 1 ]] || die "usage: kafka.sh tool MAIN_CLASS [ARGS...]"
      JAVA="$(java_bin)"; cmd_resolve; run_tool "$@" ;;
    logs) tail -n "${1:-100}" "$SERVER_LOG" ;;
    bootstrap) echo "$HOST:$PORT" ;;
    client-config) echo "$CLIENT_PROPS" ;;
    -h | --help | help) usage ;;
    *) usage; exit 64 ;;
  esac
}

main "$@"

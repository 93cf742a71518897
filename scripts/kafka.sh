#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft: broker and controller in one JVM) for tests.
#
#   scripts/kafka.sh start [DIR]          start a broker on free loopback ports, keeping its
#                                         config, data, broker.log, pid and bootstrap in DIR
#                                         (default: a new temp dir); prints only 127.0.0.1:PORT
#   scripts/kafka.sh stop DIR [--clean]   stop it (SIGTERM, SIGKILL after 30 s); --clean
#                                         also deletes DIR
#   scripts/kafka.sh tool NAME [ARGS...]  run a Kafka CLI tool by its script name, e.g.
#                                         kafka-topics, kafka-consumer-groups, kafka-get-offsets,
#                                         kafka-console-producer, kafka-console-consumer (or a
#                                         main class name)
#   scripts/kafka.sh fetch                only fill the jar cache; prints its lib dir
#
# The jars come from Maven Central through scripts/kafka/pom.xml (Maven) on first use and
# are kept in ${TIDEMARK_CACHE:-~/.cache/tidemark}/kafka/VERSION/lib; later runs use only
# that cache. Starting an existing DIR again reuses its data and ports. Environment:
#   TIDEMARK_KAFKA_VERSION        default 4.4.0
#   TIDEMARK_KAFKA_JVM_OPTS       the broker's heap and GC, default
#                                 "-Xmx512m -Xms64m -XX:+UseSerialGC"
#   TIDEMARK_KAFKA_START_TIMEOUT  seconds to wait for the broker, default 60
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="${TIDEMARK_KAFKA_VERSION:-4.4.0}"
CACHE="${TIDEMARK_CACHE:-$HOME/.cache/tidemark}/kafka/$VERSION"
LIB="$CACHE/lib"
LOG4J="$HERE/kafka/log4j2.xml"
START_TIMEOUT="${TIDEMARK_KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT=30
# Serial GC: ~20% less memory than G1 here, with no loss of throughput on 2 cores.
JVM_OPTS="-Xmx512m -Xms64m -XX:+UseSerialGC"
# The first line of every server.properties this script writes; stop --clean checks it.
MARKER="# single-node test broker written by scripts/kafka.sh"

usage() {
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}
say() { echo "kafka.sh: $*" >&2; }
die() { echo "kafka.sh: error: $*" >&2; exit 1; }

# --- java and mvn -------------------------------------------------------------------------

java_major() {
    java -version 2>&1 | sed -n -E '1s/.*version "([0-9]+).*/\1/p'
}

# need java [mvn]: installs what is missing with apt-get when root, else says how.
need() {
    local missing=() pkgs=() tool
    for tool in "$@"; do
        case "$tool" in
            java)
                if ! command -v java >/dev/null; then
                    missing+=("java 17+"); pkgs+=(openjdk-17-jre-headless)
                elif [ "$(java_major)" -lt 17 ] 2>/dev/null; then
                    die "Kafka $VERSION needs Java 17 or newer; 'java' is $(java -version 2>&1 | head -1). Install e.g. openjdk-17-jre-headless and put it first on PATH"
                fi ;;
            mvn) command -v mvn >/dev/null || { missing+=("mvn (Maven)"); pkgs+=(maven); } ;;
        esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${pkgs[*]} (missing: ${missing[*]})"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2
        for tool in "$@"; do
            command -v "$tool" >/dev/null || die "'$tool' still not on PATH after installing ${pkgs[*]}"
        done
    else
        local list
        list="$(printf '%s and ' "${missing[@]}")"
        die "missing ${list% and }; install with: sudo apt-get install ${pkgs[*]}"
    fi
}

# --- the jar cache ------------------------------------------------------------------------

fetch_tmp=""
cleanup_fetch() { [ -z "$fetch_tmp" ] || rm -rf "$fetch_tmp"; }

# Downloads into a temp dir beside the cache and renames it into place, so an interrupted
# fetch never leaves a half-filled lib dir.
ensure_jars() {
    if [ -f "$LIB/kafka_2.13-$VERSION.jar" ]; then
        need java
        return 0
    fi
    need java mvn
    mkdir -p "$CACHE"
    # Leftovers of fetches killed outright (an interrupted one removes its own).
    find "$CACHE" -maxdepth 1 -name '.fetch.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
    fetch_tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
    trap cleanup_fetch EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    say "fetching Kafka $VERSION jars with Maven into $LIB (first use only)"
    if ! mvn -B -q -f "$HERE/kafka/pom.xml" -Dkafka.version="$VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$fetch_tmp/lib" >"$fetch_tmp/mvn.log" 2>&1; then
        tail -n 30 "$fetch_tmp/mvn.log" >&2
        die "Maven could not fetch Kafka $VERSION (see above)"
    fi
    local jar
    for jar in "kafka_2.13-$VERSION.jar" "kafka-tools-$VERSION.jar"; do
        [ -f "$fetch_tmp/lib/$jar" ] || die "Maven's download lacks $jar"
    done
    # Another fetch may have won the race; its lib is as good as ours.
    mv -T "$fetch_tmp/lib" "$LIB" 2>/dev/null || [ -f "$LIB/kafka_2.13-$VERSION.jar" ] ||
        die "could not move the jars into $LIB"
    cleanup_fetch
    fetch_tmp=""
    trap - EXIT INT TERM
}

# --- tools --------------------------------------------------------------------------------

tool_class() {
    case "${1%.sh}" in
        kafka-topics) echo org.apache.kafka.tools.TopicCommand ;;
        kafka-consumer-groups) echo org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
        kafka-share-groups) echo org.apache.kafka.tools.consumer.group.ShareGroupCommand ;;
        kafka-streams-groups) echo org.apache.kafka.tools.streams.StreamsGroupCommand ;;
        kafka-groups) echo org.apache.kafka.tools.GroupsCommand ;;
        kafka-console-consumer) echo org.apache.kafka.tools.consumer.ConsoleConsumer ;;
        kafka-console-share-consumer) echo org.apache.kafka.tools.consumer.ConsoleShareConsumer ;;
        kafka-console-producer) echo org.apache.kafka.tools.ConsoleProducer ;;
        kafka-get-offsets) echo org.apache.kafka.tools.GetOffsetShell ;;
        kafka-producer-perf-test) echo org.apache.kafka.tools.ProducerPerformance ;;
        kafka-consumer-perf-test) echo org.apache.kafka.tools.ConsumerPerformance ;;
        kafka-e2e-latency) echo org.apache.kafka.tools.EndToEndLatency ;;
        kafka-verifiable-producer) echo org.apache.kafka.tools.VerifiableProducer ;;
        kafka-verifiable-consumer) echo org.apache.kafka.tools.VerifiableConsumer ;;
        kafka-configs) echo org.apache.kafka.tools.ConfigCommand ;;
        kafka-delete-records) echo org.apache.kafka.tools.DeleteRecordsCommand ;;
        kafka-dump-log) echo org.apache.kafka.tools.DumpLogSegments ;;
        kafka-transactions) echo org.apache.kafka.tools.TransactionsCommand ;;
        kafka-acls) echo org.apache.kafka.tools.AclCommand ;;
        kafka-log-dirs) echo org.apache.kafka.tools.LogDirsCommand ;;
        kafka-leader-election) echo org.apache.kafka.tools.LeaderElectionCommand ;;
        kafka-reassign-partitions) echo org.apache.kafka.tools.reassign.ReassignPartitionsCommand ;;
        kafka-broker-api-versions) echo org.apache.kafka.tools.BrokerApiVersionsCommand ;;
        kafka-metadata-quorum) echo org.apache.kafka.tools.MetadataQuorumCommand ;;
        kafka-features) echo org.apache.kafka.tools.FeatureCommand ;;
        kafka-cluster) echo org.apache.kafka.tools.ClusterTool ;;
        kafka-client-metrics) echo org.apache.kafka.tools.ClientMetricsCommand ;;
        kafka-delegation-tokens) echo org.apache.kafka.tools.DelegationTokenCommand ;;
        kafka-replica-verification) echo org.apache.kafka.tools.ReplicaVerificationTool ;;
        kafka-jmx) echo org.apache.kafka.tools.JmxTool ;;
        kafka-storage) echo kafka.tools.StorageTool ;;
        *.*) echo "$1" ;;  # a main class
        *) return 1 ;;
    esac
}

# tool_cmd CLASS: sets cmd to the java command for a CLI tool: a small short-lived JVM
# (C1 only) unless the tool measures performance.
tool_cmd() {
    local opts
    case "$1" in
        *Performance|*EndToEndLatency|*Verifiable*) opts=(-Xmx512m -XX:+UseSerialGC) ;;
        *) opts=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1) ;;
    esac
    cmd=(java "${opts[@]}" -Djava.awt.headless=true -Dlog4j2.configurationFile="$LOG4J"
        -cp "$LIB/*" "$1")
}

# --- processes ----------------------------------------------------------------------------

# alive PID: the process exists and is not a zombie.
alive() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat:0:1}" != Z ]
}

# broker_pid DIR: prints the pid of the broker running from DIR, if any.
broker_pid() {
    local pid
    pid="$(cat "$1/pid" 2>/dev/null)" || return 1
    case "$pid" in ''|*[!0-9]*) return 1 ;; esac
    alive "$pid" || return 1
    # Guards against a reused pid: the process must be java on DIR's server.properties.
    if [ -r "/proc/$pid/cmdline" ]; then
        tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF "$1/server.properties" || return 1
    fi
    echo "$pid"
}

# terminate PID SECONDS: SIGTERM, then SIGKILL once SECONDS have passed.
terminate() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    say "broker $pid still running after $2 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
}

# --- start --------------------------------------------------------------------------------

accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port [OTHER]: a loopback port below Linux's ephemeral range that nothing listens on.
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 12000))
        [ "$p" != "${1:-}" ] && ! accepts "$p" && { echo "$p"; return 0; }
    done
    die "found no free port on 127.0.0.1"
}

# A cluster id as Kafka writes them: 16 random bytes, base64url, never starting with '-'.
cluster_id() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
        [ "${id:0:1}" != - ] && { echo "$id"; return 0; }
    done
}

write_config() {
    local dir="$1" port="$2" ctl="$3"
    cat >"$dir/server.properties" <<EOF
$MARKER
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=127.0.0.1:$ctl
log.dirs=$dir/data

num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1

# One node on a machine shared with the processes under test: its controller fsyncs its
# metadata log, and behind a burst of other fsyncs that can take tens of seconds; the
# controller must not fence its own broker for that (default 9 s).
broker.session.timeout.ms=60000

# Keep test data: no retention by time or size, committed offsets kept for a year, and
# records accepted whatever their timestamp (4.x rejects those over 1 h in the future).
log.retention.ms=-1
log.retention.bytes=-1
offsets.retention.minutes=525600
log.message.timestamp.before.max.ms=9223372036854775807
log.message.timestamp.after.max.ms=9223372036854775807
EOF
}

# prop FILE KEY
prop() { sed -n "s/^$2=//p" "$1" | head -1; }

# ours DIR: DIR holds a server.properties written by this script.
ours() { [ "$(head -1 "$1/server.properties" 2>/dev/null)" = "$MARKER" ]; }

fail_start() {
    local dir="$1" pid="${2:-}" errors
    shift 2
    say "error: $*"
    if [ -f "$dir/broker.log" ]; then
        errors="$(grep -m 3 -A 4 -E '^(\[[^]]*\] )?(ERROR|FATAL)' "$dir/broker.log" || true)"
        [ -z "$errors" ] || { say "first errors in $dir/broker.log:"; echo "$errors" >&2; }
        say "last lines of $dir/broker.log:"
        tail -n 15 "$dir/broker.log" >&2
    fi
    [ -z "$pid" ] || terminate "$pid" 5
    rm -f "$dir/pid"
    say "$dir is kept for its log; delete it with: scripts/kafka.sh stop $dir --clean"
    exit 1
}

cmd_start() {
    [ $# -le 1 ] || { usage >&2; exit 2; }
    local dir="${1:-}" reuse=false port ctl pid attempt deadline jvm bootstrap cmd check p
    ensure_jars
    if [ -z "$dir" ]; then
        dir="$(mktemp -d "${TMPDIR:-/tmp}/tidemark-kafka.XXXXXX")"
    else
        mkdir -p "$dir"
    fi
    dir="$(cd "$dir" && pwd)"
    if pid="$(broker_pid "$dir")"; then
        die "a broker already runs from $dir (pid $pid, $(cat "$dir/bootstrap" 2>/dev/null))"
    fi
    if ours "$dir" && [ -f "$dir/data/meta.properties" ]; then
        reuse=true
        port="$(prop "$dir/server.properties" advertised.listeners)"
        port="${port##*:}"
        ctl="$(prop "$dir/server.properties" controller.quorum.bootstrap.servers)"
        ctl="${ctl##*:}"
        say "restarting the broker in $dir on its ports $port and $ctl"
        for p in "$port" "$ctl"; do
            ! accepts "$p" || die "port $p of the broker in $dir is taken by another process"
        done
        [ ! -f "$dir/broker.log" ] || mv -f "$dir/broker.log" "$dir/broker.log.old"
    elif [ -n "$(ls -A "$dir")" ] && ! ours "$dir"; then
        die "$dir is neither empty nor a broker dir of this script; give a new or empty DIR"
    fi
    read -r -a jvm <<<"${TIDEMARK_KAFKA_JVM_OPTS:-$JVM_OPTS}"

    for attempt in 1 2 3; do
        if ! $reuse; then
            rm -rf "$dir/data"
            port="$(free_port)"
            ctl="$(free_port "$port")"
            write_config "$dir" "$port" "$ctl"
            tool_cmd kafka.tools.StorageTool
            "${cmd[@]}" format --standalone -t "$(cluster_id)" \
                -c "$dir/server.properties" >"$dir/broker.log" 2>&1 ||
                fail_start "$dir" "" "formatting $dir/data failed"
        fi
        bootstrap="127.0.0.1:$port"
        rm -f "$dir/pid"
        say "starting Kafka $VERSION in $dir on $bootstrap (controller 127.0.0.1:$ctl)"
        # setsid: the broker outlives this script and ignores the caller's Ctrl-C; the
        # wrapper writes the pid java then runs under.
        # shellcheck disable=SC2016
        setsid bash -c 'echo $$ >"$1/pid"; shift; exec "$@"' _ "$dir" \
            java "${jvm[@]}" -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$LOG4J" -Dtidemark.kafka.log.level=INFO \
            -cp "$LIB/*" kafka.Kafka "$dir/server.properties" \
            </dev/null >>"$dir/broker.log" 2>&1 &
        deadline=$((SECONDS + START_TIMEOUT))
        pid=""
        while [ -z "$pid" ] && ((SECONDS < deadline)); do
            pid="$(cat "$dir/pid" 2>/dev/null)" || sleep 0.05
        done
        [ -n "$pid" ] || fail_start "$dir" "" "the broker's JVM did not start"

        while ! accepts "$port"; do
            if ! alive "$pid"; then
                if ! $reuse && ((attempt < 3)) && grep -q "Address already in use" "$dir/broker.log"; then
                    say "port taken meanwhile; trying others"
                    continue 2
                fi
                fail_start "$dir" "" "the broker exited at start"
            fi
            ((SECONDS < deadline)) ||
                fail_start "$dir" "$pid" "no connection on $bootstrap within $START_TIMEOUT s"
            sleep 0.2
        done
        # Accepting connections is not yet serving metadata: wait for a topic listing, in
        # the background so that a broker dying meanwhile is noticed at once.
        tool_cmd "$(tool_class kafka-topics)"
        while :; do
            "${cmd[@]}" --bootstrap-server "$bootstrap" --list >/dev/null 2>"$dir/ready-check.log" &
            check=$!
            while alive "$check" && alive "$pid" && ((SECONDS < deadline)); do
                sleep 0.2
            done
            if alive "$check"; then
                kill "$check" 2>/dev/null || true
                wait "$check" 2>/dev/null || true
                alive "$pid" || fail_start "$dir" "" "the broker exited at start"
                cat "$dir/ready-check.log" >&2
                fail_start "$dir" "$pid" "the broker did not answer within $START_TIMEOUT s"
            fi
            wait "$check" && break
            alive "$pid" || fail_start "$dir" "" "the broker exited at start"
            ((SECONDS < deadline)) ||
                fail_start "$dir" "$pid" "the broker did not answer within $START_TIMEOUT s"
            sleep 0.5
        done
        rm -f "$dir/ready-check.log"
        echo "$bootstrap" >"$dir/bootstrap"
        say "ready: $bootstrap (pid $pid, log $dir/broker.log); stop with: scripts/kafka.sh stop $dir"
        echo "$bootstrap"
        return 0
    done
    fail_start "$dir" "" "could not bind free ports in 3 attempts"
}

# --- stop ---------------------------------------------------------------------------------

cmd_stop() {
    local dir="" clean=false pid
    while [ $# -gt 0 ]; do
        case "$1" in
            --clean) clean=true ;;
            -*) die "unknown option '$1' for stop" ;;
            *) [ -z "$dir" ] || { usage >&2; exit 2; }; dir="$1" ;;
        esac
        shift
    done
    [ -n "$dir" ] || { usage >&2; exit 2; }
    [ -d "$dir" ] || die "no such directory: $dir"
    dir="$(cd "$dir" && pwd)"
    if pid="$(broker_pid "$dir")"; then
        say "stopping the broker in $dir (pid $pid)"
        terminate "$pid" "$STOP_TIMEOUT"
    else
        say "no broker running from $dir"
    fi
    rm -f "$dir/pid"
    if $clean; then
        ours "$dir" ||
            die "not deleting $dir: it holds no server.properties of this script"
        rm -rf "$dir"
    fi
}

# --- main ---------------------------------------------------------------------------------

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    fetch) [ $# -eq 1 ] || { usage >&2; exit 2; }; ensure_jars; echo "$LIB" ;;
    tool)
        [ $# -ge 2 ] || { usage >&2; exit 2; }
        class="$(tool_class "$2")" || die "unknown tool '$2'; known: $(sed -n -E 's/^ +(kafka-[a-z0-9-]+)\).*/\1/p' "${BASH_SOURCE[0]}" | tr '\n' ' ')"
        shift 2
        ensure_jars
        tool_cmd "$class"
        exec "${cmd[@]}" "$@"
        ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A standalone Apache Flink session cluster (one JobManager + one TaskManager) on loopback, built
# from Flink's own jars on Maven Central (deploy/flink/cluster/pom.xml); no Flink distribution needed.
#
#   deploy/flink/local_cluster.sh start DIR   # prints the REST address (http://127.0.0.1:PORT) once
#                                             # the TaskManager has registered its slots
#   deploy/flink/local_cluster.sh stop DIR    # stops the two processes started in DIR
#
# DIR holds conf/config.yaml, log/, the pids and rest_port. Every socket binds 127.0.0.1.
# Environment: FLINK_VERSION (default 1.19.0: the Flink release beam-runners-flink-1.19 is built against;
# the job server submits with that release's client, so the cluster runs the same release),
# FLINK_SLOTS (task slots, default 2), FLINK_READY_TIMEOUT (seconds, default 180), JAVA (default java).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
FLINK_VERSION="${FLINK_VERSION:-1.19.0}"
FLINK_SLOTS="${FLINK_SLOTS:-2}"
FLINK_READY_TIMEOUT="${FLINK_READY_TIMEOUT:-180}"
JAVA="${JAVA:-java}"

# What Flink's own scripts pass to the JVM on Java 17 (config.yaml's env.java.opts.all default).
JAVA17_OPTS=(
  --add-exports=java.base/sun.net.util=ALL-UNNAMED
  --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=java.base/java.text=ALL-UNNAMED
  --add-opens=java.base/java.time=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED
)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_ports() {  # free_ports N: N distinct free TCP ports on 127.0.0.1, one a line
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))  # all held open until every port is chosen: no duplicates
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

classpath() {
  # Resolved once per pom.xml content; Maven downloads the jars into ~/.m2 the first time. A cached
  # classpath whose jars have gone (a cleaned ~/.m2) is resolved again.
  local key cache jar ok=1
  key="$(cat "$HERE/cluster/pom.xml" <(echo "$FLINK_VERSION") | sha1sum | cut -c1-12)"
  cache="${HOME}/.cache/s2naip/flink-${FLINK_VERSION}-${key}.classpath"
  if [ -s "$cache" ]; then
    while IFS= read -r -d: jar || [ -n "$jar" ]; do
      [ -f "$jar" ] || { ok=0; break; }
    done < "$cache"
  fi
  if [ ! -s "$cache" ] || [ "$ok" = 0 ]; then
    mkdir -p "$(dirname "$cache")"
    mvn -q -B -f "$HERE/cluster/pom.xml" dependency:build-classpath \
      -Dflink.version="$FLINK_VERSION" -Dmdep.outputFile="$cache.tmp" >&2 \
      || die "could not resolve Flink $FLINK_VERSION's jars from Maven Central"
    mv "$cache.tmp" "$cache"
  fi
  cat "$cache"
}

write_config() {
  local dir="$1" rpc_port="$2" rest_port="$3"
  mkdir -p "$dir/conf" "$dir/log" "$dir/tmp"
  cat > "$dir/conf/config.yaml" <<EOF
jobmanager.rpc.address: 127.0.0.1
jobmanager.rpc.port: $rpc_port
jobmanager.bind-host: 127.0.0.1
jobmanager.memory.process.size: 1024m
taskmanager.host: 127.0.0.1
taskmanager.bind-host: 127.0.0.1
taskmanager.memory.process.size: 2048m
taskmanager.numberOfTaskSlots: $FLINK_SLOTS
# Beam's translated batch jobs run many tasks at once, each blocking (sort-shuffle) result partition
# holding at least sort-shuffle.min-buffers network buffers (Flink's default 512): with Flink's
# default network share (10% of 2 GiB) parallelism 2 fails ("Insufficient number of network buffers:
# required 512, but only 461 available"), and with 512m alone an incremental build still did now and
# then (464 available). 512m and 64 buffers per partition leave room for 256 partitions.
taskmanager.memory.network.min: 512m
taskmanager.memory.network.max: 512m
taskmanager.network.sort-shuffle.min-buffers: 64
parallelism.default: 1
rest.address: 127.0.0.1
rest.bind-address: 127.0.0.1
rest.port: $rest_port
blob.server.port: 0
taskmanager.rpc.port: 0
taskmanager.data.port: 0
metrics.internal.query-service.port: 0
io.tmp.dirs: $dir/tmp
web.tmpdir: $dir/tmp
EOF
  cat > "$dir/conf/log4j.properties" <<EOF
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FileAppender
appender.file.name = FileAppender
appender.file.type = File
appender.file.fileName = \${sys:log.file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
EOF
}

resource_params() {  # resource_params DIR TM|JM -> two lines: JVM flags, then -D dynamic properties
  # What Flink's taskmanager.sh / jobmanager.sh do: derive the memory and CPU layout from config.yaml.
  "$JAVA" -classpath "$CP" org.apache.flink.runtime.util.bash.BashJavaUtils "GET_$2_RESOURCE_PARAMS" \
    --configDir "$1/conf" 2> "$1/log/bash-java-utils-$2.err" \
    | sed -n 's/^BASH_JAVA_UTILS_EXEC_RESULT://p'
}

launch() {  # launch DIR NAME TM|JM MAINCLASS
  local dir="$1" name="$2" kind="$3" main="$4" params jvm dyn
  params="$(resource_params "$dir" "$kind")"
  jvm="$(sed -n 1p <<< "$params")"
  dyn="$(sed -n 2p <<< "$params")"
  [ -n "$jvm" ] || die "could not derive the $name's memory settings (see $dir/log/bash-java-utils-$kind.err)"
  # In the background, in the caller's process group (so a killed test run takes it along);
  # stdin/stdout/stderr point to files, so a caller that reads this script's output is not held.
  # $jvm and $dyn are word lists ("-Xmx... -XX:...", "-D k=v -D k=v") without spaces inside words.
  # shellcheck disable=SC2086
  "$JAVA" $jvm "${JAVA17_OPTS[@]}" \
    -Dlog.file="$dir/log/$name.log" -Dlog4j.configurationFile="file:$dir/conf/log4j.properties" \
    -classpath "$CP" "$main" --configDir "$dir/conf" $dyn \
    > "$dir/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  local dir="$1"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if alive "$dir/jobmanager.pid" || alive "$dir/taskmanager.pid"; then
    die "a cluster is already running in $dir (stop it first)"
  fi
  command -v "$JAVA" > /dev/null || die "no java on PATH"
  CP="$(classpath)"
  local rpc_port rest_port
  { read -r rpc_port; read -r rest_port; } < <(free_ports 2)
  write_config "$dir" "$rpc_port" "$rest_port"
  echo "$rest_port" > "$dir/rest_port"
  launch "$dir" jobmanager JM org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint
  launch "$dir" taskmanager TM org.apache.flink.runtime.taskexecutor.TaskManagerRunner

  # Readiness: the REST API answers and reports a TaskManager with free slots. No fixed sleeps:
  # poll until ready, a process dies, or the deadline passes.
  local deadline=$((SECONDS + FLINK_READY_TIMEOUT))
  local url="http://127.0.0.1:$rest_port"
  while true; do
    for p in jobmanager taskmanager; do
      if ! alive "$dir/$p.pid"; then
        tail -n 40 "$dir/log/$p.log" "$dir/log/$p.out" >&2 2>/dev/null || true
        stop "$dir"
        die "the $p exited during startup (logs in $dir/log)"
      fi
    done
    if overview="$(curl -fsS --max-time 2 "$url/overview" 2>/dev/null)" \
       && python3 -c 'import json,sys; o=json.loads(sys.argv[1]); sys.exit(0 if o["taskmanagers"] >= 1 and o["slots-available"] >= 1 else 1)' "$overview"; then
      echo "$url"
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      stop "$dir"
      die "not ready after ${FLINK_READY_TIMEOUT}s (logs in $dir/log)"
    fi
    # the probe interval (not a wait for readiness): curl itself returns at once on a refused port
    sleep 0.5
  done
}

stop() {
  local dir="$1" p pid
  for p in taskmanager jobmanager; do
    if alive "$dir/$p.pid"; then
      pid="$(cat "$dir/$p.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/$p.pid"
  done
}

case "${1:-}" in
  start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
  classpath) classpath ;;
  *) die "usage: $0 start|stop DIR | classpath" ;;
esac

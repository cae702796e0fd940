#!/usr/bin/env bash
# Builds Beam's Flink job server as one executable jar from job-server/pom.xml (the runner artifacts
# Maven Central serves: beam-runners-flink-1.19:2.70.0, job-service 2.65.0, expansion-service 2.70.0)
# with the ordinary Maven client, and prints the jar's path. The jar is what `--flink_job_server_jar`
# takes. For registries that do not serve Beam's own shaded job-server jar; fetch_job_server.sh tries
# that one first and calls this script when it is not served.
#
#   deploy/flink/build_job_server.sh           # -> ~/.cache/s2naip/flink-job-server/<name>.jar
#   deploy/flink/build_job_server.sh --cached  # the path if that jar is built already, else exit 1 (no Maven)
#
# Cached: Maven's jars in the local repository (~/.m2, or $MAVEN_REPO_LOCAL), the built jar under
# $S2NAIP_CACHE_DIR (default ~/.cache/s2naip) at a path keyed by the versions and the POM's hash, so
# a second call prints the path at once and a changed POM builds a new jar. The build runs in a
# temporary folder (nothing is written into the checkout); the jar is moved in place atomically.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
POM="$HERE/job-server/pom.xml"
REPO_LOCAL="${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}"
CACHE_DIR="${S2NAIP_CACHE_DIR:-$HOME/.cache/s2naip}/flink-job-server"
MAIN_CLASS="org/apache/beam/runners/flink/FlinkJobServerDriver.class"

die() { echo "build_job_server.sh: $*" >&2; exit 1; }
prop() { sed -n "s:.*<$1>\(.*\)</$1>.*:\1:p" "$POM" | head -n 1; }

FLINK_MAJOR="$(prop flink.major)"
BEAM_VERSION="$(prop beam.version)"
JOB_SERVICE_VERSION="$(prop beam.job-service.version)"
KEY="$(sha1sum < "$POM" | cut -c1-12)"
JAR="$CACHE_DIR/beam-runners-flink-$FLINK_MAJOR-job-server-$BEAM_VERSION-job-service-$JOB_SERVICE_VERSION-$KEY.jar"

has_driver() {  # has_driver JAR: the jar holds the job server's main class
  python3 -c 'import sys, zipfile; sys.exit(sys.argv[2] not in zipfile.ZipFile(sys.argv[1]).namelist())' \
    "$1" "$MAIN_CLASS"
}

if [ "${1:-}" = --cached ]; then
  [ -s "$JAR" ] && echo "$JAR"
  exit
fi
[ $# -eq 0 ] || die "usage: $0 [--cached]"

if [ ! -s "$JAR" ]; then
  command -v mvn > /dev/null || die "no mvn on PATH (Debian: apt-get install maven openjdk-17-jdk-headless)"
  mkdir -p "$CACHE_DIR"
  BUILD="$(mktemp -d "$CACHE_DIR/build.XXXXXX")"
  trap 'rm -rf "$BUILD"' EXIT
  cp "$POM" "$BUILD/pom.xml"
  echo "build_job_server.sh: building the Flink $FLINK_MAJOR job server (Beam $BEAM_VERSION) with Maven" >&2
  mvn -q -B -f "$BUILD/pom.xml" -Dmaven.repo.local="$REPO_LOCAL" package >&2 \
    || die "Maven could not build the job server from $POM"
  built="$BUILD/target/s2naip-flink-job-server.jar"
  [ -s "$built" ] && has_driver "$built" || die "$built lacks $MAIN_CLASS"
  mv -f "$built" "$JAR"  # same file system: atomic, so concurrent callers see a whole jar
fi
echo "$JAR"

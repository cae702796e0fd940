#!/usr/bin/env bash
# Puts Beam's Flink job-server jar in the local Maven repository (~/.m2) with the ordinary Maven
# client and prints its path. The jar is what `--flink_job_server_jar` takes.
#
#   deploy/flink/fetch_job_server.sh            # -> ~/.m2/repository/org/apache/beam/.../....jar
#   BEAM_VERSION=2.77.0 FLINK_MAJOR=2.2 deploy/flink/fetch_job_server.sh
#
# BEAM_VERSION must equal the apache-beam pin of requirements.txt (tests/test_flink.py checks it);
# FLINK_MAJOR is the Flink line: Beam 2.77 publishes job servers for 1.19, 1.20, 2.0, 2.1 and 2.2.
# The jar is an uber jar (Flink's runtime included), so nothing transitive is fetched.
set -euo pipefail

BEAM_VERSION="${BEAM_VERSION:-2.77.0}"
FLINK_MAJOR="${FLINK_MAJOR:-2.2}"
ARTIFACT="beam-runners-flink-${FLINK_MAJOR}-job-server"
COORDS="org.apache.beam:${ARTIFACT}:${BEAM_VERSION}"
REPO_LOCAL="${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}"
JAR="$REPO_LOCAL/org/apache/beam/$ARTIFACT/$BEAM_VERSION/$ARTIFACT-$BEAM_VERSION.jar"

if [ ! -s "$JAR" ]; then
  command -v mvn > /dev/null || { echo "fetch_job_server.sh: no mvn on PATH" >&2; exit 1; }
  # -U: retry even if an earlier attempt's "not found" is cached in the local repository.
  if ! mvn -q -B -U dependency:get -Dartifact="$COORDS" -Dtransitive=false \
       -Dmaven.repo.local="$REPO_LOCAL" >&2; then
    echo "fetch_job_server.sh: Maven could not fetch $COORDS" >&2
    exit 1
  fi
fi
[ -s "$JAR" ] || { echo "fetch_job_server.sh: $JAR missing after the download" >&2; exit 1; }
echo "$JAR"

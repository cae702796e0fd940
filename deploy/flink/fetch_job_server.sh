#!/usr/bin/env bash
# Prints the path of a Beam Flink job-server jar (what `--flink_job_server_jar` takes), for Flink 1.19:
#
#  1. Beam's own shaded jar, org.apache.beam:beam-runners-flink-${FLINK_MAJOR}-job-server:${BEAM_VERSION}
#     (the launcher's Beam version), fetched with `mvn dependency:get` into ~/.m2: the first choice;
#  2. where the registry does not serve it, the jar that build_job_server.sh assembles from the
#     runner artifacts it does serve (beam-runners-flink-1.19:2.70.0, see README.md "Versions").
#
#   deploy/flink/fetch_job_server.sh            # -> the jar's path on stdout, progress on stderr
#   BEAM_VERSION=2.77.0 FLINK_MAJOR=1.19 deploy/flink/fetch_job_server.sh
#
# BEAM_VERSION must equal the apache-beam pin of requirements.txt (tests/test_flink.py checks it).
# FLINK_MAJOR is the Flink line and must match the cluster's (local_cluster.sh, flink-deployment.yaml:
# Flink 1.19.0); the built fallback exists for 1.19 only. Both jars are uber jars (Flink's runtime included).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
BEAM_VERSION="${BEAM_VERSION:-2.77.0}"
FLINK_MAJOR="${FLINK_MAJOR:-1.19}"
ARTIFACT="beam-runners-flink-${FLINK_MAJOR}-job-server"
COORDS="org.apache.beam:${ARTIFACT}:${BEAM_VERSION}"
REPO_LOCAL="${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}"
JAR="$REPO_LOCAL/org/apache/beam/$ARTIFACT/$BEAM_VERSION/$ARTIFACT-$BEAM_VERSION.jar"

if [ -s "$JAR" ]; then echo "$JAR"; exit 0; fi
command -v mvn > /dev/null || { echo "fetch_job_server.sh: no mvn on PATH" >&2; exit 1; }
# -U: ask again even if an earlier attempt's "not found" is cached in the local repository.
if mvn -q -B -U dependency:get -Dartifact="$COORDS" -Dtransitive=false \
     -Dmaven.repo.local="$REPO_LOCAL" > /dev/null 2>&1 && [ -s "$JAR" ]; then
  echo "$JAR"
  exit 0
fi
echo "fetch_job_server.sh: the registry does not serve $COORDS" >&2
if [ "$FLINK_MAJOR" != 1.19 ]; then
  echo "fetch_job_server.sh: no fallback for Flink $FLINK_MAJOR (build_job_server.sh builds the 1.19 one)" >&2
  exit 1
fi
echo "fetch_job_server.sh: building one from the runner artifacts instead (build_job_server.sh)" >&2
exec "$HERE/build_job_server.sh"

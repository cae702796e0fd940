#!/usr/bin/env bash
# Sets up the scheduled release of the s2naip dataset on Google Cloud (deploy/scheduler/README.md):
#
#   deploy/scheduler/setup.sh jobs        # Cloud Run jobs s2naip-plan and s2naip-fetch-nir (the worker image)
#   deploy/scheduler/setup.sh workflow    # deploy workflow.yaml as Cloud Workflows `s2naip-release`
#   deploy/scheduler/setup.sh schedule    # Cloud Scheduler job starting the workflow (monthly by default)
#   deploy/scheduler/setup.sh all         # jobs, workflow, schedule
#   deploy/scheduler/setup.sh run-now     # one release now (gcloud workflows run, waits for the result)
#
# Required: PROJECT, BUCKET, INPUT, IMAGE (the image of deploy/dataflow/launch.sh image) and
# TEMPLATE_PATH (the Flex Template spec of launch.sh template); for schedule (and all) SCHEDULER_SA.
# DRY_RUN=1 prints the commands.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "${1:-}" in
  jobs | workflow | schedule | all | run-now) ;;
  *) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

: "${PROJECT:?set PROJECT to the Google Cloud project id}"
: "${BUCKET:?set BUCKET (no gs://): holds pairs/, pairs/latest.json, worklists/, dataflow/}"
: "${INPUT:?set INPUT to the S2-NAIP set folder, gs://...}"
: "${IMAGE:?set IMAGE to the worker/launcher image (deploy/dataflow/launch.sh image)}"
: "${TEMPLATE_PATH:?set TEMPLATE_PATH to the Flex Template spec, gs://.../s2naip-build-pairs-TAG.json}"
REGION="${REGION:-us-central1}"
WORKFLOW="${WORKFLOW:-s2naip-release}"
SCHEDULE="${SCHEDULE:-0 6 1 * *}"          # cron, UTC: 06:00 on the 1st of every month
TIME_ZONE="${TIME_ZONE:-Etc/UTC}"
LATEST_OBJECT="${LATEST_OBJECT:-pairs/latest.json}"
NIR_ROOT="${NIR_ROOT:-gs://${BUCKET}/s2naip-nir}"
MANIFEST="${MANIFEST:-}"
CORRECTIONS="${CORRECTIONS:-}"
STAC_URL="${STAC_URL:-https://planetarycomputer.microsoft.com/api/stac/v1}"
SIGN="${SIGN:-none}"                       # planetary-computer needs that extra in the image
FORCE="${FORCE:-false}"                    # true: build even when no newer capture was found
PLAN_JOB="${PLAN_JOB:-s2naip-plan}"
FETCH_JOB="${FETCH_JOB:-s2naip-fetch-nir}"
# Service accounts (create them once; roles in README.md). Empty: the defaults of each service.
WORKFLOW_SA="${WORKFLOW_SA:-}"             # runs the workflow
SCHEDULER_SA="${SCHEDULER_SA:-}"           # Cloud Scheduler's identity (OAuth): roles/workflows.invoker
JOBS_SA="${JOBS_SA:-}"                     # the Cloud Run jobs (plan reads the run, fetch-nir submits to Dataflow)
WORKER_SA="${WORKER_SA:-}"                 # Dataflow workers of the build

run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The workflow's argument (a JSON object), built with python3 so that every value is JSON-escaped.
workflow_argument() {
  BUCKET="$BUCKET" TEMPLATE_PATH="$TEMPLATE_PATH" INPUT="$INPUT" IMAGE="$IMAGE" REGION="$REGION" \
  LATEST_OBJECT="$LATEST_OBJECT" NIR_ROOT="$NIR_ROOT" MANIFEST="$MANIFEST" CORRECTIONS="$CORRECTIONS" \
  STAC_URL="$STAC_URL" SIGN="$SIGN" FORCE="$FORCE" PLAN_JOB="$PLAN_JOB" FETCH_JOB="$FETCH_JOB" \
  WORKER_SA="$WORKER_SA" python3 - <<'EOF'
import json, os
e = os.environ
arg = {"bucket": e["BUCKET"], "template": e["TEMPLATE_PATH"], "input": e["INPUT"], "image": e["IMAGE"],
       "region": e["REGION"], "latest_object": e["LATEST_OBJECT"], "nir_root": e["NIR_ROOT"],
       "stac_url": e["STAC_URL"], "sign": e["SIGN"], "force": e["FORCE"] == "true",
       "plan_job": e["PLAN_JOB"], "fetch_job": e["FETCH_JOB"]}
for key, name in (("manifest", "MANIFEST"), ("corrections", "CORRECTIONS"), ("worker_service_account", "WORKER_SA")):
    if e[name]:
        arg[key] = e[name]
print(json.dumps(arg, sort_keys=True))
EOF
}

cmd_jobs() {
  # The image's entrypoint is Beam's worker boot: the jobs run the s2naip CLI instead. The workflow
  # replaces the arguments on every run (containerOverrides), the ones here are placeholders.
  local common=(--project="$PROJECT" --region="$REGION" --image="$IMAGE" --command=s2naip
                --max-retries=0 --tasks=1 --memory=4Gi --cpu=2)
  if [ -n "$JOBS_SA" ]; then common+=(--service-account="$JOBS_SA"); fi
  run gcloud run jobs deploy "$PLAN_JOB" "${common[@]}" --task-timeout=2h --args=plan,--help
  run gcloud run jobs deploy "$FETCH_JOB" "${common[@]}" --task-timeout=24h --args=fetch-nir,--help
}

cmd_workflow() {
  local args=(gcloud workflows deploy "$WORKFLOW" --project="$PROJECT" --location="$REGION"
              --source="$HERE/workflow.yaml" --call-log-level=log-errors-only)
  if [ -n "$WORKFLOW_SA" ]; then args+=(--service-account="$WORKFLOW_SA"); fi
  run "${args[@]}"
}

execution_body() {
  # The Workflows executions API takes the argument as a JSON *string*.
  workflow_argument | python3 -c 'import json, sys; print(json.dumps({"argument": sys.stdin.read().strip()}))'
}

require_scheduler_sa() {
  # Without an OAuth identity the scheduled call to the executions API is unauthenticated (403).
  if [ -z "$SCHEDULER_SA" ]; then
    echo "error: set SCHEDULER_SA to the service account Cloud Scheduler calls the workflow as (roles/workflows.invoker)" >&2
    exit 2
  fi
}

cmd_schedule() {
  require_scheduler_sa
  local args=(gcloud scheduler jobs create http "$WORKFLOW" --project="$PROJECT" --location="$REGION"
              --schedule="$SCHEDULE" --time-zone="$TIME_ZONE"
              --uri="https://workflowexecutions.googleapis.com/v1/projects/${PROJECT}/locations/${REGION}/workflows/${WORKFLOW}/executions"
              --http-method=POST --headers=Content-Type=application/json
              --message-body="$(execution_body)"
              --attempt-deadline=180s --max-retry-attempts=0
              --oauth-service-account-email="$SCHEDULER_SA"
              --oauth-token-scope=https://www.googleapis.com/auth/cloud-platform)
  run "${args[@]}"
}

cmd_run_now() {
  run gcloud workflows run "$WORKFLOW" --project="$PROJECT" --location="$REGION" --data="$(workflow_argument)"
}

case "$1" in
  jobs) cmd_jobs ;;
  workflow) cmd_workflow ;;
  schedule) cmd_schedule ;;
  all) require_scheduler_sa; cmd_jobs; cmd_workflow; cmd_schedule ;;
  run-now) cmd_run_now ;;
esac

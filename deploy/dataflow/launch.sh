#!/usr/bin/env bash
# Builds and launches `s2naip build` on Dataflow as a Flex Template with a custom worker container.
#
#   deploy/dataflow/launch.sh names      # print export IMAGE=... TEMPLATE_PATH=... (for eval)
#   deploy/dataflow/launch.sh grant      # IAM for SERVICE_ACCOUNT: image pull, Dataflow worker, the bucket
#   deploy/dataflow/launch.sh image      # build and push the worker/launcher image
#   deploy/dataflow/launch.sh template   # gcloud dataflow flex-template build (spec JSON on GCS)
#   deploy/dataflow/launch.sh run        # gcloud dataflow flex-template run (starts the job)
#   deploy/dataflow/launch.sh all        # image, template, run
#   deploy/dataflow/launch.sh direct     # no template: submit from this machine (Python 3.11 + requirements.txt)
#
# Everything is set by environment variables (below); nothing is specific to one project.
# Required: PROJECT, BUCKET, and for run/direct INPUT (and usually MANIFEST).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deploy/dataflow"

case "${1:-}" in
  names | grant | image | template | run | all | direct) ;;
  *) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

# --- where ----------------------------------------------------------------------------------------
: "${PROJECT:?set PROJECT to the Google Cloud project id}"
: "${BUCKET:?set BUCKET to a bucket name (no gs://) for templates, staging and temp files}"
REGION="${REGION:-us-central1}"
REPOSITORY="${REPOSITORY:-s2naip}"   # Artifact Registry Docker repository in REGION
VERSION="$(sed -n 's/^PIPELINE_VERSION = "\(.*\)"$/\1/p' "$ROOT/transforms/version.py")"
TAG="${TAG:-${VERSION}-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo local)}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/${REPOSITORY}/s2naip-pairs:${TAG}}"
TEMPLATE_PATH="${TEMPLATE_PATH:-gs://${BUCKET}/dataflow/templates/s2naip-build-pairs-${TAG}.json}"
STAGING_LOCATION="${STAGING_LOCATION:-gs://${BUCKET}/dataflow/staging}"
TEMP_LOCATION="${TEMP_LOCATION:-gs://${BUCKET}/dataflow/tmp}"
# Worker (and launcher) service account, e.g. s2naip-dataflow@PROJECT.iam.gserviceaccount.com:
# needs roles/dataflow.worker, roles/artifactregistry.reader on REPOSITORY (the launcher VM and the
# workers pull IMAGE as this account), read on the input, write on the output and the staging
# bucket (`launch.sh grant` binds all but the input's). Empty: the Compute Engine default account.
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
BUILDER="${BUILDER:-docker}"         # image builder: docker (local docker build + push) or cloudbuild

# --- the build's options (metadata.json) ----------------------------------------------------------
INPUT="${INPUT:-}"                   # gs://.../s2naip/train_urban_set
OUTPUT="${OUTPUT:-gs://${BUCKET}/pairs/$(date -u +%Y%m%d-%H%M%S)}"
MANIFEST="${MANIFEST:-}"             # gs://.../manifests/train.txt (s2naip index); empty: workers list INPUT
CORRECTIONS="${CORRECTIONS:-}"       # gs://.../corrections.json[,gs://...] (s2naip review exports)
NIR_INPUT="${NIR_INPUT:-}"
SELECTION="${SELECTION:-}"           # robust (default) | paper | companion
ALPHA="${ALPHA:-}"
TOP_K="${TOP_K:-}"
LR_TIMESTEPS="${LR_TIMESTEPS:-}"        # Sentinel-2 timesteps per pair (default 1)
ALLOW_FEWER="${ALLOW_FEWER:-}"          # true | false
BANDS="${BANDS:-}"                   # rgbn | rgb
SPLIT="${SPLIT:-}"
NUM_SHARDS="${NUM_SHARDS:-}"
READ_THREADS="${READ_THREADS:-}"     # reader threads per SDK process (default 16 for gs:// inputs)
DOWNSAMPLE="${DOWNSAMPLE:-}"         # bicubic_aa | bicubic_torch
FORMAT="${FORMAT:-}"                 # e.g. parquet,tfrecord (comma-separated)
TFRECORD_GZIP="${TFRECORD_GZIP:-}"   # true | false
OVERWRITE="${OVERWRITE:-}"           # true: replace a run already in OUTPUT
SINCE="${SINCE:-}"                   # incremental: gs://.../pairs/v1 or gs://.../pairs/latest.json
LATEST="${LATEST:-}"                 # gs://.../pairs/latest.json, moved to OUTPUT after its _SUCCESS

# --- workers: sized for the full rebuild (~1.1M tiles, CPU-bound per tile, ~70 KB of output each) --
MACHINE_TYPE="${MACHINE_TYPE:-n2-standard-4}"
MAX_WORKERS="${MAX_WORKERS:-100}"
NUM_WORKERS="${NUM_WORKERS:-10}"
DISK_SIZE_GB="${DISK_SIZE_GB:-50}"   # the image is a few GB; shuffle goes to the Dataflow Shuffle service
LAUNCHER_MACHINE_TYPE="${LAUNCHER_MACHINE_TYPE:-}"
FLEXRS_GOAL="${FLEXRS_GOAL:-}"       # COST_OPTIMIZED: FlexRS (discounted workers, start within 6 h; docs/cloud.md)
NETWORK="${NETWORK:-}"
SUBNETWORK="${SUBNETWORK:-}"         # regions/REGION/subnetworks/NAME
DISABLE_PUBLIC_IPS="${DISABLE_PUBLIC_IPS:-}"   # 1: workers without public IPs (needs Private Google Access)
JOB_NAME="${JOB_NAME:-s2naip-pairs-$(date -u +%Y%m%d-%H%M%S)}"
EXPERIMENTS="${EXPERIMENTS:-use_runner_v2}"

run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# "name value" pairs of the build's options that are set.
build_params() {
  local pairs=(
    input "$INPUT" output "$OUTPUT" manifest "$MANIFEST" corrections "$CORRECTIONS" nir_input "$NIR_INPUT"
    selection "$SELECTION" alpha "$ALPHA" top_k "$TOP_K" lr_timesteps "$LR_TIMESTEPS" allow_fewer "$ALLOW_FEWER" bands "$BANDS" split "$SPLIT"
    num_shards "$NUM_SHARDS" downsample "$DOWNSAMPLE" format "$FORMAT" tfrecord_gzip "$TFRECORD_GZIP"
    read_threads "$READ_THREADS"
    overwrite "$OVERWRITE" since "$SINCE" latest "$LATEST"
  )
  local i
  for ((i = 0; i < ${#pairs[@]}; i += 2)); do
    if [ -n "${pairs[i+1]}" ]; then
      case "${pairs[i]}=${pairs[i+1]}" in
        format=* | corrections=*) ;;  # list-valued options; passed with gcloud's ^~^ delimiter syntax
        *,*) echo "error: ${pairs[i]}=${pairs[i+1]}: commas are not allowed in template parameters" >&2; exit 2 ;;
      esac
      printf '%s\n%s\n' "${pairs[i]}" "${pairs[i+1]}"
    fi
  done
}

require_input() {
  if [ -z "$INPUT" ]; then
    echo "error: set INPUT (gs://.../s2naip/<set folder>) and preferably MANIFEST" >&2
    exit 2
  fi
}

cmd_names() {
  printf 'export IMAGE=%q\nexport TEMPLATE_PATH=%q\n' "$IMAGE" "$TEMPLATE_PATH"
}

cmd_grant() {
  if [ -z "$SERVICE_ACCOUNT" ]; then
    echo "error: set SERVICE_ACCOUNT (the launcher's and workers' account) to grant it its roles" >&2
    exit 2
  fi
  local member="serviceAccount:$SERVICE_ACCOUNT"
  run gcloud projects add-iam-policy-binding "$PROJECT" --member="$member" --role=roles/dataflow.worker \
    --condition=None
  # Flex Template launches and custom worker containers pull IMAGE with this account.
  run gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" --project="$PROJECT" \
    --location="$REGION" --member="$member" --role=roles/artifactregistry.reader
  # Templates, staging and temp files (and, by default, the output) are in BUCKET.
  run gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --project="$PROJECT" \
    --member="$member" --role=roles/storage.objectAdmin
}

cmd_image() {
  case "$BUILDER" in
    docker)
      # The image is built with its own name: a launch that names no worker image uses it.
      run docker build --platform=linux/amd64 -f "$HERE/Dockerfile" --build-arg "S2NAIP_IMAGE=$IMAGE" \
        -t "$IMAGE" "$ROOT"
      run docker push "$IMAGE"
      ;;
    cloudbuild)
      run gcloud builds submit "$ROOT" --project="$PROJECT" --region="$REGION" \
        --config="$HERE/cloudbuild.yaml" --substitutions="_IMAGE=$IMAGE"
      ;;
    *) echo "error: BUILDER must be docker or cloudbuild" >&2; exit 2 ;;
  esac
}

cmd_template() {
  # The worker image doubles as the launcher image (FLEX_TEMPLATE_PYTHON_PY_FILE is set in it).
  run gcloud dataflow flex-template build "$TEMPLATE_PATH" \
    --project="$PROJECT" \
    --image="$IMAGE" \
    --sdk-language=PYTHON \
    --metadata-file="$HERE/metadata.json"
}

cmd_run() {
  require_input
  local args=(
    gcloud dataflow flex-template run "$JOB_NAME"
    --project="$PROJECT"
    --region="$REGION"
    --template-file-gcs-location="$TEMPLATE_PATH"
    --staging-location="$STAGING_LOCATION"
    --temp-location="$TEMP_LOCATION"
    --worker-machine-type="$MACHINE_TYPE"
    --num-workers="$NUM_WORKERS"
    --max-workers="$MAX_WORKERS"
    --additional-experiments="$EXPERIMENTS"
    --additional-user-labels="app=s2naip-pairs,version=${VERSION//./_}"
    # Beam options for the workers: the same image as SDK container, and the disk size.
    --parameters="sdk_container_image=$IMAGE"
    --parameters="disk_size_gb=$DISK_SIZE_GB"
  )
  if [ -n "$SERVICE_ACCOUNT" ]; then args+=(--service-account-email="$SERVICE_ACCOUNT"); fi
  if [ -n "$LAUNCHER_MACHINE_TYPE" ]; then args+=(--launcher-machine-type="$LAUNCHER_MACHINE_TYPE"); fi
  if [ -n "$FLEXRS_GOAL" ]; then args+=(--flexrs-goal="$FLEXRS_GOAL"); fi
  if [ -n "$NETWORK" ]; then args+=(--network="$NETWORK"); fi
  if [ -n "$SUBNETWORK" ]; then args+=(--subnetwork="$SUBNETWORK"); fi
  if [ -n "$DISABLE_PUBLIC_IPS" ]; then args+=(--disable-public-ips); fi
  local params name value
  params="$(build_params)"
  while IFS= read -r name && IFS= read -r value; do
    case "$value" in
      *,*) args+=(--parameters="^~^$name=$value") ;;  # gcloud: '~' delimits, commas stay in the value
      *) args+=(--parameters="$name=$value") ;;
    esac
  done <<< "$params"
  run "${args[@]}"
}

cmd_direct() {
  # Same job without a template: this machine builds the graph (it needs Python 3.11 and
  # requirements.txt installed, and read access to nothing but the staging bucket).
  require_input
  local args=(
    "${PYTHON:-python3}" -m pipelines.build_pairs
    --runner=DataflowRunner
    --project="$PROJECT"
    --region="$REGION"
    --job_name="$JOB_NAME"
    --staging_location="$STAGING_LOCATION"
    --temp_location="$TEMP_LOCATION"
    --sdk_container_image="$IMAGE"
    --sdk_location=container
    --experiments="$EXPERIMENTS"
    --machine_type="$MACHINE_TYPE"
    --num_workers="$NUM_WORKERS"
    --max_num_workers="$MAX_WORKERS"
    --disk_size_gb="$DISK_SIZE_GB"
  )
  if [ -n "$SERVICE_ACCOUNT" ]; then args+=(--service_account_email="$SERVICE_ACCOUNT"); fi
  if [ -n "$FLEXRS_GOAL" ]; then args+=(--flexrs_goal="$FLEXRS_GOAL"); fi
  if [ -n "$NETWORK" ]; then args+=(--network="$NETWORK"); fi
  if [ -n "$SUBNETWORK" ]; then args+=(--subnetwork="$SUBNETWORK"); fi
  if [ -n "$DISABLE_PUBLIC_IPS" ]; then args+=(--no_use_public_ips); fi
  local params name value
  params="$(build_params)"
  while IFS= read -r name && IFS= read -r value; do
    args+=("--$name=$value")
  done <<< "$params"
  (cd "$ROOT" && run "${args[@]}")
}

case "${1:-}" in
  names) cmd_names ;;
  grant) cmd_grant ;;
  image) cmd_image ;;
  template) cmd_template ;;
  run) cmd_run ;;
  all) cmd_image; cmd_template; cmd_run ;;
  direct) cmd_direct ;;
esac

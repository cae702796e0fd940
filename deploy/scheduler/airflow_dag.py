"""Apache Airflow alternative to workflow.yaml: the scheduled release of the s2naip dataset.

    resolve_since -> plan -> has_work -> needs_nir -> fetch_nir -> build -> verify_latest

* `resolve_since` reads `gs://<bucket>/<latest_object>` ({"run": ..., "published": ...}) and pushes
  `since` (that run), and this release's `output` and `worklist` folders (XCom).
* `plan` runs `s2naip plan --since <since>` in the Cloud Run job `s2naip-plan` (the worker image;
  deploy/scheduler/setup.sh jobs creates it), writing the work list.
* `has_work` reads the work list's plan.json: no newer capture (and `force` false) skips the rest.
* `needs_nir` skips `fetch_nir` only when the plan lists no tile; `fetch_nir` runs
  `s2naip fetch-nir --manifest <worklist>/fetch_nir_manifest.txt` on Dataflow from the Cloud Run job
  `s2naip-fetch-nir`.
* `build` launches the Flex Template of deploy/dataflow/ with `since`, the new `output` and `latest`
  (DataflowStartFlexTemplateOperator, waits for the job, deferred where [operators]
  default_deferrable is set, as on Composer); the job itself moves latest.json after
  its _SUCCESS, so a failed job leaves it on the previous version.
* `verify_latest` checks that latest.json now names the new output.

Only Airflow and its Google provider (with the apache-beam provider the Dataflow hooks import) are
needed where the DAG runs (e.g. Cloud Composer); not this project. Settings are DAG params (the
defaults below come from Airflow Variables `s2naip_*` when set), so a manual run can override them.
`max_active_runs=1`: two releases never run at once.
"""
from __future__ import annotations

import json

import pendulum

try:  # Airflow 3
    from airflow.sdk import DAG, Param, Variable
except ImportError:  # Airflow 2.x
    from airflow import DAG
    from airflow.models import Variable
    from airflow.models.param import Param
try:
    from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
except ImportError:  # Airflow 2.x without the standard provider
    from airflow.operators.python import PythonOperator, ShortCircuitOperator
from airflow.providers.google.cloud.hooks.gcs import GCSHook
from airflow.providers.google.cloud.operators.cloud_run import CloudRunExecuteJobOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

DAG_ID = "s2naip_release"
GCP_CONN_ID = "google_cloud_default"


def _setting(name: str, default):
    """An Airflow Variable `s2naip_<name>`, or `default` (also when no metadata DB is reachable,
    e.g. when the file is only parsed)."""
    try:
        return Variable.get(f"s2naip_{name}", default)
    except Exception:  # noqa: BLE001 - parsing the DAG must not need the variables
        return default


PARAMS = {
    "project": Param(_setting("project", "my-project"), type="string"),
    "region": Param(_setting("region", "us-central1"), type="string"),
    "bucket": Param(_setting("bucket", "my-bucket"), type="string", description="no gs://"),
    "latest_object": Param(_setting("latest_object", "pairs/latest.json"), type="string"),
    "template": Param(_setting("template", "gs://my-bucket/dataflow/templates/s2naip-build-pairs.json"),
                      type="string", description="Flex Template spec (deploy/dataflow/launch.sh template)"),
    "input": Param(_setting("input", "gs://my-bucket/s2naip/train_urban_set"), type="string"),
    "image": Param(_setting("image", "us-central1-docker.pkg.dev/my-project/s2naip/s2naip-pairs:latest"),
                   type="string"),
    "nir_root": Param(_setting("nir_root", "gs://my-bucket/s2naip-nir"), type="string"),
    "stac_url": Param(_setting("stac_url", "https://planetarycomputer.microsoft.com/api/stac/v1"), type="string"),
    "collection": Param(_setting("collection", "naip"), type="string"),
    "sign": Param(_setting("sign", "none"), enum=["none", "planetary-computer"]),
    "plan_job": Param(_setting("plan_job", "s2naip-plan"), type="string"),
    "fetch_job": Param(_setting("fetch_job", "s2naip-fetch-nir"), type="string"),
    "worker_service_account": Param(
        _setting("worker_service_account", "s2naip-dataflow@my-project.iam.gserviceaccount.com"),
        type="string", description="the Dataflow workers' service account"),
    "max_workers": Param(int(_setting("max_workers", 100)), type="integer"),
    "force": Param(False, type="boolean", description="build even when no newer capture was found"),
}

SINCE = "{{ ti.xcom_pull(task_ids='resolve_since')['since'] }}"
OUTPUT = "{{ ti.xcom_pull(task_ids='resolve_since')['output'] }}"
WORKLIST = "{{ ti.xcom_pull(task_ids='resolve_since')['worklist'] }}"
STAMP = "{{ ti.xcom_pull(task_ids='resolve_since')['stamp'] }}"


def _read_json(bucket: str, name: str) -> dict:
    data = GCSHook(gcp_conn_id=GCP_CONN_ID).download(bucket_name=bucket, object_name=name)
    return json.loads(data)


def resolve_since(params: dict, **context) -> dict:
    """since = the run latest.json names; the new release's folders, named by the run's time."""
    pointer = _read_json(params["bucket"], params["latest_object"])
    if not isinstance(pointer, dict) or not pointer.get("run"):
        raise ValueError(f"gs://{params['bucket']}/{params['latest_object']} is not a latest pointer")
    when = context.get("logical_date") or context.get("data_interval_end") or pendulum.now("UTC")
    stamp = "v" + pendulum.instance(when).in_timezone("UTC").format("YYYYMMDDHHmmss")
    base = f"gs://{params['bucket']}"
    return {"since": pointer["run"], "stamp": stamp, "output": f"{base}/pairs/{stamp}",
            "worklist": f"{base}/worklists/{stamp}"}


def _plan_summary(params: dict, ti) -> dict:
    worklist = ti.xcom_pull(task_ids="resolve_since")["worklist"]
    prefix = f"gs://{params['bucket']}/"
    return _read_json(params["bucket"], worklist[len(prefix):] + "/plan.json")


def has_work(params: dict, ti, **_) -> bool:
    """Continue when the plan found a newer capture, or when forced."""
    summary = _plan_summary(params, ti)
    if not summary.get("complete", False):
        raise RuntimeError(f"the plan is incomplete ({summary.get('errors')} STAC errors)")
    return bool(params["force"]) or summary["with_newer_capture"] > 0


def needs_nir(params: dict, ti, **_) -> bool:
    return _plan_summary(params, ti)["fetch_nir_tiles"] > 0


def verify_latest(params: dict, ti, **_) -> str:
    output = ti.xcom_pull(task_ids="resolve_since")["output"]
    pointer = _read_json(params["bucket"], params["latest_object"])
    if pointer.get("run") != output:
        raise RuntimeError(f"the build finished but latest.json names {pointer.get('run')}, not {output}")
    return output


def _cloud_run_args(*args: str) -> dict:
    return {"container_overrides": [{"args": list(args)}]}


with DAG(
    dag_id=DAG_ID,
    description="Scheduled incremental release of the s2naip dataset (plan, fetch-nir, build --since)",
    schedule="0 6 1 * *",  # 06:00 UTC on the 1st of every month
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["s2naip"],
) as dag:
    t_resolve = PythonOperator(task_id="resolve_since", python_callable=resolve_since)
    t_plan = CloudRunExecuteJobOperator(
        task_id="plan",
        project_id="{{ params.project }}",
        region="{{ params.region }}",
        job_name="{{ params.plan_job }}",
        overrides=_cloud_run_args("plan", "--naip-stac-url", "{{ params.stac_url }}",
                                  "--collection", "{{ params.collection }}",
                                  "--since", SINCE, "--output", WORKLIST),
        gcp_conn_id=GCP_CONN_ID,
    )
    t_has_work = ShortCircuitOperator(task_id="has_work", python_callable=has_work)
    t_needs_nir = ShortCircuitOperator(task_id="needs_nir", python_callable=needs_nir,
                                       ignore_downstream_trigger_rules=False)  # skips fetch_nir only
    t_fetch = CloudRunExecuteJobOperator(
        task_id="fetch_nir",
        project_id="{{ params.project }}",
        region="{{ params.region }}",
        job_name="{{ params.fetch_job }}",
        overrides=_cloud_run_args(
            "fetch-nir", "--manifest", WORKLIST + "/fetch_nir_manifest.txt", "--output", "{{ params.nir_root }}",
            "--stac-url", "{{ params.stac_url }}", "--collection", "{{ params.collection }}",
            "--sign", "{{ params.sign }}", "--runner", "DataflowRunner", "--project", "{{ params.project }}",
            "--region", "{{ params.region }}", "--temp_location", "gs://{{ params.bucket }}/dataflow/tmp",
            "--staging_location", "gs://{{ params.bucket }}/dataflow/staging",
            "--sdk_container_image", "{{ params.image }}", "--sdk_location", "container",
            "--experiments", "use_runner_v2"),
        gcp_conn_id=GCP_CONN_ID,
    )
    t_build = DataflowStartFlexTemplateOperator(
        task_id="build",
        project_id="{{ params.project }}",
        location="{{ params.region }}",
        body={
            "launchParameter": {
                "jobName": "s2naip-pairs-" + STAMP,
                "containerSpecGcsPath": "{{ params.template }}",
                "parameters": {
                    "input": "{{ params.input }}",
                    "nir_input": "{{ params.nir_root }}",
                    "output": OUTPUT,
                    "since": SINCE,
                    "latest": "gs://{{ params.bucket }}/{{ params.latest_object }}",
                    "sdk_container_image": "{{ params.image }}",
                    "disk_size_gb": "50",
                },
                "environment": {
                    "tempLocation": "gs://{{ params.bucket }}/dataflow/tmp",
                    "stagingLocation": "gs://{{ params.bucket }}/dataflow/staging",
                    "machineType": "n2-standard-4",
                    "numWorkers": 10,
                    "maxWorkers": "{{ params.max_workers }}",
                    "additionalExperiments": ["use_runner_v2"],
                    "serviceAccountEmail": "{{ params.worker_service_account }}",
                    "additionalUserLabels": {"app": "s2naip-pairs", "release": STAMP},
                },
            }
        },
        append_job_name=False,
        # No wait_until_finished: the operator then waits for a batch job either way, blocking or
        # deferred (`deferrable` defaults to [operators] default_deferrable, True on Composer), and
        # wait_until_finished=True with deferrable=True is refused when the DAG is parsed.
        gcp_conn_id=GCP_CONN_ID,
        trigger_rule="none_failed",  # runs when fetch_nir was skipped (nothing to fetch)
    )
    t_verify = PythonOperator(task_id="verify_latest", python_callable=verify_latest)

    t_resolve >> t_plan >> t_has_work >> t_needs_nir >> t_fetch >> t_build >> t_verify

"""deploy/scheduler/: the Cloud Workflows release (workflow.yaml), its setup script (gcloud commands
of Cloud Run jobs, the workflow and the Cloud Scheduler job) and the Airflow DAG alternative.

Nothing is deployed: the workflow is validated statically with PyYAML (structure, jumps, every
expression's names, the Flex Template parameters against deploy/dataflow/metadata.json, the CLI
arguments it passes against the commands' own parsers); setup.sh runs with DRY_RUN=1, and its
schedule with the real gcloud against a fake Cloud Scheduler API on loopback; the DAG is
checked with `ast` always, and imported (its task graph and templated fields) where Airflow and its
Google provider are installed (not in the project's CI: that test skips there).
"""
from __future__ import annotations

import ast
import base64
import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fake_google_apis import FakeGoogleApis, gcloud_env, run_script

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "deploy" / "scheduler"
WORKFLOW = HERE / "workflow.yaml"
DAG_FILE = HERE / "airflow_dag.py"
METADATA = REPO / "deploy" / "dataflow" / "metadata.json"
# Beam options the launch passes as template parameters (as deploy/dataflow/launch.sh does).
BEAM_PARAMETERS = {"sdk_container_image", "disk_size_gb"}
# Build options of the incremental build (`--since`, `--latest`) that metadata.json gets when the
# build is wired to transforms.build.increments (see the wiring notes); accepted here until then.
INCREMENTAL_PARAMETERS = {"since", "latest"}
DAG_TASKS = ["resolve_since", "plan", "has_work", "needs_nir", "fetch_nir", "build", "verify_latest"]

# Workflows expression vocabulary: standard library namespaces, functions, operators, literals.
WORKFLOWS_NAMES = {"sys", "text", "map", "json", "time", "http", "list", "math", "base64", "hash", "uuid",
                   "default", "if", "get_type", "int", "string", "double", "len", "keys", "bool",
                   "and", "or", "not", "in", "true", "false", "null"}


# ---------------------------------------------------------------------------------------------
# workflow.yaml


def load_workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def walk_steps(steps):
    """Every (name, body) of a steps list, nested steps (switch conditions, try blocks) included."""
    for item in steps:
        for name, body in item.items():
            yield name, body
            if isinstance(body, dict):
                if "steps" in body:
                    yield from walk_steps(body["steps"])
                for condition in body.get("switch", []) or []:
                    if "steps" in condition:
                        yield from walk_steps(condition["steps"])


def walk_values(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from walk_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_values(value)
    else:
        yield node


def expressions(node) -> list[str]:
    return [v[2:-1] for v in walk_values(node) if isinstance(v, str) and v.startswith("${") and v.endswith("}")]


def names_in(expression: str) -> set[str]:
    """The first segment of every name an expression uses (string literals removed)."""
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    code = re.sub(r"'(?:[^'\\]|\\.)*'", "''", code)
    assert code.count("(") == code.count(")") and code.count("[") == code.count("]"), expression
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*)", code):
        names.add(m.group(1))
    return names


def assigned_names(steps) -> set[str]:
    names = set()
    for _, body in walk_steps(steps):
        if not isinstance(body, dict):
            continue
        for entry in body.get("assign", []) or []:
            names.update(re.split(r"[.\[]", key)[0] for key in entry)
        for condition in body.get("switch", []) or []:
            for entry in condition.get("assign", []) or []:
                names.update(re.split(r"[.\[]", key)[0] for key in entry)
        if "result" in body:
            names.add(body["result"])
    return names


def find_step(steps, name: str) -> dict:
    return next(body for step, body in walk_steps(steps) if step == name)


PLACEHOLDERS = {"${sign}": "none", "${collection}": "naip", "${stacUrl}": "https://stac.example/api",
                "${project}": "example-project", "${region}": "us-central1"}


def placeholder(value: str) -> str:
    """A CLI argument of the workflow with its expression replaced by a plausible value."""
    if isinstance(value, str) and value.startswith("${"):
        return PLACEHOLDERS.get(value, "gs://bucket/x")
    return value


def test_workflow_structure_jumps_and_names():
    wf = load_workflow()
    main = wf["main"]
    assert main["params"] == ["args"]
    steps = main["steps"]
    names = [name for name, _ in walk_steps(steps)]
    assert len(names) == len(set(names)), "step names must be unique"
    for name, body in walk_steps(steps):
        targets = [body.get("next")] + [c.get("next") for c in body.get("switch", []) or []]
        for target in filter(None, targets):
            assert target in names or target == "end", f"{name}: next {target} does not exist"
    known = assigned_names(steps) | {"args"} | WORKFLOWS_NAMES
    for expr in expressions(steps):
        unknown = names_in(expr) - known
        assert not unknown, f"${{{expr}}} uses {unknown}"
    # since comes from latest.json, read before anything else runs
    order = [name for name, _ in walk_steps(steps)]
    assert order.index("read_latest") < order.index("resolve_since") < order.index("plan") < order.index("launch_build")
    read = find_step(steps, "read_latest")
    assert read["call"] == "http.get" and read["args"]["query"] == {"alt": "media"}
    assert "latestObject" in read["args"]["url"] and read["args"]["auth"] == {"type": "OAuth2"}
    assert {"since": "${pointer.run}"} in find_step(steps, "resolve_since")["assign"]


def test_workflow_launches_the_flex_template_with_since():
    steps = load_workflow()["main"]["steps"]
    launch = find_step(steps, "launch_build")
    assert launch["call"] == "googleapis.dataflow.v1b3.projects.locations.flexTemplates.launch"
    parameter = launch["args"]["body"]["launchParameter"]
    assert parameter["containerSpecGcsPath"] == "${template}" and parameter["parameters"] == "${parameters}"
    params = find_step(steps, "build_parameters")["assign"][0]["parameters"]
    assert params["since"] == "${since}" and params["output"] == "${output}" and params["latest"] == "${latestUrl}"
    optional = {key.split(".", 1)[1] for name in ("optional_parameters", "optional_corrections")
                for c in find_step(steps, name)["switch"] for entry in c["assign"] for key in entry}
    metadata = {p["name"] for p in json.loads(METADATA.read_text())["parameters"]}
    unknown = (set(params) | optional) - metadata - BEAM_PARAMETERS - INCREMENTAL_PARAMETERS
    assert not unknown, f"not template parameters: {unknown}"
    assert all(isinstance(v, str) for v in params.values())  # template parameters are strings
    # the job is polled until a terminal state; failure keeps latest.json and fails the workflow
    check = find_step(steps, "check_job")["switch"]
    assert check[0]["next"] == "read_latest_after" and "raise" in check[1]
    assert find_step(steps, "wait")["next"] == "get_job"
    verify = find_step(steps, "verify_latest")["switch"][0]
    assert verify["condition"] == "${after.run != output}" and "raise" in verify
    env = find_step(steps, "build_environment")["assign"][0]["environment"]
    assert env["additionalExperiments"] == ["use_runner_v2"]


def test_workflow_cli_arguments_parse():
    from pipelines import fetch_nir, plan

    steps = load_workflow()["main"]["steps"]
    plan_args = find_step(steps, "plan")["args"]["body"]["overrides"]["containerOverrides"][0]["args"]
    assert plan_args[0] == "plan"
    parsed = plan.build_parser().parse_args([placeholder(a) for a in plan_args[1:]])
    assert parsed.since and parsed.output and parsed.stac_url
    assert plan_args[plan_args.index("--since") + 1] == "${since}"
    fetch_args = find_step(steps, "fetch_nir")["args"]["body"]["overrides"]["containerOverrides"][0]["args"]
    assert fetch_args[0] == "fetch-nir"
    parsed, beam_args = fetch_nir.build_parser().parse_known_args([placeholder(a) for a in fetch_args[1:]])
    assert parsed.manifest and parsed.output and parsed.sign
    assert "--runner" in beam_args and "DataflowRunner" in beam_args and "--sdk_container_image" in beam_args
    gate = find_step(steps, "gate")["switch"][0]
    assert "with_newer_capture" in gate["condition"] and "force" in gate["condition"] and "return" in gate


def duration_seconds(text: str) -> int:
    """gcloud's duration: 2h, 24h, 90m, 3600s."""
    value, unit = re.fullmatch(r"(\d+)([smh])", text).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_workflow_waits_for_the_cloud_run_jobs_as_long_as_they_may_run():
    """A connector call gives up after 30 minutes by default: each jobs.run call waits for its
    job's whole task timeout (setup.sh) plus start-up, polling at a modest rate."""
    steps = load_workflow()["main"]["steps"]
    deployed = {c[4]: duration_seconds(flag(c, "--task-timeout")) for c in dry_run("jobs")}
    assert deployed == {"s2naip-plan": 2 * 3600, "s2naip-fetch-nir": 24 * 3600}
    for step, job in (("plan", "s2naip-plan"), ("fetch_nir", "s2naip-fetch-nir")):
        body = find_step(steps, step)
        assert body["call"] == "googleapis.run.v2.projects.locations.jobs.run"
        connector = body["args"]["connector_params"]
        assert set(connector) <= {"timeout", "polling_policy"}  # a wait, never skip_polling
        assert deployed[job] < connector["timeout"] <= deployed[job] + 3600, step
        policy = connector["polling_policy"]
        assert set(policy) == {"initial_delay", "multiplier", "max_delay"}
        assert 0 < policy["initial_delay"] <= policy["max_delay"] <= 600 and policy["multiplier"] >= 1


def test_workflow_stops_on_an_incomplete_plan():
    """plan.json's `complete` is false when a STAC search failed: no build from a partial work list
    (the Airflow DAG's has_work raises the same way)."""
    steps = load_workflow()["main"]["steps"]
    order = [name for name, _ in walk_steps(steps)]
    assert order.index("parse_plan") < order.index("check_plan_complete") < order.index("gate")
    (check,) = find_step(steps, "check_plan_complete")["switch"]
    assert check["condition"] == '${not(default(map.get(planSummary, "complete"), false))}'
    assert "raise" in check and "next" not in check and "incomplete" in check["raise"]
    assert names_in(check["raise"][2:-1]) <= assigned_names(steps) | WORKFLOWS_NAMES


# ---------------------------------------------------------------------------------------------
# setup.sh


def dry_run(command: str, **env) -> list[list[str]]:
    base = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "PROJECT": "example-project", "BUCKET": "example-bucket",
            "INPUT": "gs://example-bucket/s2naip/train", "IMAGE": "us-central1-docker.pkg.dev/p/s2naip/img:1",
            "TEMPLATE_PATH": "gs://example-bucket/dataflow/templates/t.json",
            "SCHEDULER_SA": "sched@example-project.iam.gserviceaccount.com"}
    out = subprocess.run(["bash", str(HERE / "setup.sh"), command], env={**base, **env}, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def flag(cmd: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(name + "="))


def test_setup_script_commands():
    cmds = dry_run("all", MANIFEST="gs://example-bucket/manifests/train.txt")
    kinds = [" ".join(c[:4]) for c in cmds]
    assert kinds == ["gcloud run jobs deploy", "gcloud run jobs deploy", "gcloud workflows deploy s2naip-release",
                     "gcloud scheduler jobs create"]
    assert cmds[0][4] == "s2naip-plan" and flag(cmds[0], "--command") == "s2naip"
    assert flag(cmds[2], "--source") == str(WORKFLOW)
    schedule = cmds[3]
    assert flag(schedule, "--uri") == ("https://workflowexecutions.googleapis.com/v1/projects/example-project/"
                                       "locations/us-central1/workflows/s2naip-release/executions")
    assert flag(schedule, "--schedule") == "0 6 1 * *"
    assert flag(schedule, "--oauth-service-account-email").startswith("sched@")
    body = json.loads(flag(schedule, "--message-body"))
    argument = json.loads(body["argument"])  # the executions API takes the argument as a JSON string
    assert argument["bucket"] == "example-bucket" and argument["template"].endswith("t.json")
    assert argument["manifest"].endswith("train.txt") and argument["force"] is False
    # the workflow reads exactly these keys
    wf_keys = {k for pair in re.findall(r'args, "(\w+)"|args\.(\w+)', WORKFLOW.read_text()) for k in pair if k}
    assert set(argument) <= wf_keys, set(argument) - wf_keys
    assert {"bucket", "template", "input", "image"} <= set(argument)
    run_now = dry_run("run-now")[0]
    assert run_now[:4] == ["gcloud", "workflows", "run", "s2naip-release"]
    assert json.loads(flag(run_now, "--data"))["input"] == "gs://example-bucket/s2naip/train"


# ---------------------------------------------------------------------------------------------
# The Airflow DAG


@pytest.fixture
def google_apis():
    fake = FakeGoogleApis()
    yield fake
    fake.close()


@pytest.mark.parametrize("command", ["schedule", "all"])
def test_setup_script_requires_the_scheduler_identity(command):
    """Without SCHEDULER_SA the schedule would call the executions API unauthenticated: refused
    with one line, before anything is deployed."""
    base = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "PROJECT": "example-project", "BUCKET": "example-bucket",
            "INPUT": "gs://example-bucket/s2naip/train", "IMAGE": "us-central1-docker.pkg.dev/p/s2naip/img:1",
            "TEMPLATE_PATH": "gs://example-bucket/dataflow/templates/t.json"}
    for environ in (base, {**base, "SCHEDULER_SA": ""}):
        done = subprocess.run(["bash", str(HERE / "setup.sh"), command], env=environ, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: set SCHEDULER_SA") and done.stderr.count("\n") == 1
    assert dry_run("jobs", SCHEDULER_SA="")  # the other commands do not need it


def test_schedule_as_cloud_scheduler_receives_it(google_apis, tmp_path):
    """`setup.sh schedule` with the real gcloud: the job Cloud Scheduler creates calls the workflow
    executions API with an OAuth token of SCHEDULER_SA."""
    account = "s2naip-scheduler@example-project.iam.gserviceaccount.com"
    run_script(HERE / "setup.sh", "schedule", google_apis, {
        **gcloud_env(google_apis, tmp_path), "PROJECT": "example-project", "BUCKET": "example-bucket",
        "INPUT": "gs://example-bucket/s2naip/train", "IMAGE": "us-central1-docker.pkg.dev/p/s2naip/img:1",
        "TEMPLATE_PATH": "gs://example-bucket/dataflow/templates/t.json", "SCHEDULER_SA": account})
    (create,) = google_apis.requests
    assert create["method"] == "POST" and create["path"] == "/v1/projects/example-project/locations/us-central1/jobs"
    job = json.loads(create["body"])
    assert job["name"] == "projects/example-project/locations/us-central1/jobs/s2naip-release"
    target = job["httpTarget"]
    assert target["uri"] == ("https://workflowexecutions.googleapis.com/v1/projects/example-project/"
                             "locations/us-central1/workflows/s2naip-release/executions")
    assert target["httpMethod"] == "POST"
    assert target["oauthToken"] == {"serviceAccountEmail": account,
                                    "scope": "https://www.googleapis.com/auth/cloud-platform"}
    argument = json.loads(json.loads(base64.b64decode(target["body"]))["argument"])
    assert argument["template"] == "gs://example-bucket/dataflow/templates/t.json" and argument["force"] is False
    assert job["retryConfig"]["retryCount"] == 0 and job["schedule"] == "0 6 1 * *"


def test_airflow_dag_static():
    tree = ast.parse(DAG_FILE.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]

    def callee(call):
        return getattr(call.func, "id", None) or getattr(call.func, "attr", None)

    tasks = {}
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        if "task_id" in kw and isinstance(kw["task_id"], ast.Constant):
            tasks[kw["task_id"].value] = callee(call)
    assert set(tasks) == set(DAG_TASKS)
    assert tasks["build"] == "DataflowStartFlexTemplateOperator"
    assert tasks["plan"] == tasks["fetch_nir"] == "CloudRunExecuteJobOperator"
    assert tasks["has_work"] == tasks["needs_nir"] == "ShortCircuitOperator"
    # the dependency chain, variable names mapped to task ids
    var_task = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            kw = {k.arg: k.value for k in node.value.keywords}
            if "task_id" in kw:
                var_task[node.targets[0].id] = kw["task_id"].value
    chain_expr = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.BinOp))
    order = []
    node = chain_expr
    while isinstance(node, ast.BinOp):
        assert isinstance(node.op, ast.RShift)
        order.insert(0, var_task[node.right.id])
        node = node.left
    order.insert(0, var_task[node.id])
    assert order == DAG_TASKS
    dag_call = next(c for c in calls if callee(c) == "DAG")
    dag_kw = {k.arg: k.value for k in dag_call.keywords}
    assert ast.literal_eval(dag_kw["max_active_runs"]) == 1 and ast.literal_eval(dag_kw["catchup"]) is False
    # wait_until_finished=True is refused with deferrable=True (Composer's default_deferrable): the
    # build waits for the job either way without it.
    build = next(c for c in calls if callee(c) == "DataflowStartFlexTemplateOperator")
    build_kw = {k.arg: k.value for k in build.keywords}
    assert "wait_until_finished" not in build_kw and "deferrable" not in build_kw
    source = DAG_FILE.read_text()
    assert '"since": SINCE' in source and '"latest": "gs://{{ params.bucket }}/{{ params.latest_object }}"' in source


def test_airflow_dag_task_graph():
    pytest.importorskip("airflow")
    pytest.importorskip("airflow.providers.google.cloud.operators.dataflow")
    os.environ.setdefault("AIRFLOW_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "s2naip-airflow-home"))
    spec = importlib.util.spec_from_file_location("s2naip_airflow_dag", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag
    assert dag.dag_id == "s2naip_release" and dag.max_active_runs == 1 and not dag.catchup
    assert sorted(dag.task_ids) == sorted(DAG_TASKS)
    for upstream, downstream in zip(DAG_TASKS, DAG_TASKS[1:]):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert dag.get_task("resolve_since").upstream_task_ids == set()
    build = dag.get_task("build")
    assert type(build).__name__ == "DataflowStartFlexTemplateOperator"
    assert getattr(build.trigger_rule, "value", build.trigger_rule) == "none_failed"
    parameters = build.body["launchParameter"]["parameters"]
    assert parameters["since"] == module.SINCE and "xcom_pull(task_ids='resolve_since')" in parameters["since"]
    assert parameters["output"] == module.OUTPUT
    assert "body" in build.template_fields
    assert not dag.get_task("needs_nir").ignore_downstream_trigger_rules
    plan_args = dag.get_task("plan").overrides["container_overrides"][0]["args"]
    assert plan_args[:1] == ["plan"] and module.SINCE in plan_args
    assert set(module.PARAMS) >= {"project", "region", "bucket", "latest_object", "template", "input", "image",
                                  "force"}
    # the templates render to the launch request of one release
    release = {"since": "gs://b/pairs/v20260101060000", "output": "gs://b/pairs/v20260201060000",
               "worklist": "gs://b/worklists/v20260201060000", "stamp": "v20260201060000"}

    class FakeTaskInstance:
        def xcom_pull(self, task_ids):
            assert task_ids == "resolve_since"
            return release

    params = {name: p.value for name, p in module.PARAMS.items()}
    context = {"params": params, "ti": FakeTaskInstance()}
    body = build.render_template(build.body, context)
    rendered = body["launchParameter"]
    assert rendered["parameters"]["since"] == release["since"] and rendered["parameters"]["output"] == release["output"]
    assert rendered["parameters"]["latest"] == f"gs://{params['bucket']}/{params['latest_object']}"
    assert rendered["jobName"] == "s2naip-pairs-v20260201060000" and rendered["containerSpecGcsPath"] == params["template"]
    args = dag.get_task("plan").render_template(plan_args, context)
    assert args[args.index("--since") + 1] == release["since"] and args[args.index("--output") + 1] == release["worklist"]
    # resolve_since and the gates, with latest.json and plan.json served by a fake GCS hook
    objects = {"pairs/latest.json": {"run": release["since"], "published": "2026-01-01T07:00:00Z"},
               "worklists/v20260201060000/plan.json": {"complete": True, "with_newer_capture": 0,
                                                       "fetch_nir_tiles": 0}}
    module._read_json = lambda bucket, name: objects[name]
    import pendulum

    got = module.resolve_since({**params, "bucket": "b"}, logical_date=pendulum.datetime(2026, 2, 1, 6, tz="UTC"))
    assert got == release
    assert module.has_work({**params, "bucket": "b", "force": False}, FakeTaskInstance()) is False
    assert module.has_work({**params, "bucket": "b", "force": True}, FakeTaskInstance()) is True
    assert module.needs_nir({**params, "bucket": "b"}, FakeTaskInstance()) is False
    objects["pairs/latest.json"] = {"run": release["output"]}
    assert module.verify_latest({**params, "bucket": "b"}, FakeTaskInstance()) == release["output"]

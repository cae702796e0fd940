"""A fake of the Google APIs that gcloud calls in deploy/ scripts, on loopback, and the environment
that sends the real Google Cloud CLI to it.

* `FakeGoogleApis`: an HTTP server on a free 127.0.0.1 port (listening before it is handed out, so
  no readiness wait) that records every request and answers what the deploy scripts call: Dataflow
  flexTemplates.launch, IAM get/set policy (Resource Manager, Artifact Registry, Cloud Storage
  buckets), Cloud Storage multipart uploads and Cloud Scheduler jobs.create. Anything else is a 404.
* `gcloud_env`: a throw-away gcloud config, a dummy access token, no prompts, no update checks or
  usage reports, and `CLOUDSDK_API_ENDPOINT_OVERRIDES_*` for every API above pointing at the fake.
* `run_script`: runs a deploy script for real (no DRY_RUN) and checks every request was answered and
  carried the dummy token.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

FAKE_TOKEN = "fake-loopback-token-not-a-secret"
JOB_ID = "2026-12-05_00_00_00-1234567890"
API_NAMES = ("DATAFLOW", "STORAGE", "ARTIFACTREGISTRY", "CLOUDRESOURCEMANAGER", "CLOUDSCHEDULER")


class FakeGoogleApis:
    """Records every request; answers Dataflow's flexTemplates.launch, IAM get/set policy (resource
    manager, Artifact Registry, Cloud Storage buckets), Cloud Storage multipart uploads and Cloud
    Scheduler's jobs.create; anything else is a 404 (and fails the test)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.objects: dict[str, bytes] = {}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_request(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urlsplit(self.path)
                record = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                          "authorization": self.headers.get("Authorization"), "body": raw}
                fake.requests.append(record)
                try:
                    status, answer = fake.answer(record, self.headers.get("Content-Type", ""))
                except Exception as e:  # noqa: BLE001 - a malformed request fails the test, not the thread
                    status, answer = 500, {"error": {"code": 500, "message": repr(e)}}
                record["status"] = status
                out = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = handle_request

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # listening from here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, record: dict, content_type: str) -> tuple[int, dict]:
        path, method = record["path"], record["method"]
        if method == "POST" and path.endswith("/flexTemplates:launch"):
            body = json.loads(record["body"])
            return 200, {"job": {"id": JOB_ID, "name": body["launchParameter"]["jobName"], "projectId": record["path"].split("/")[3]}}
        if path.endswith(":getIamPolicy") or (method == "GET" and path.endswith("/iam")):
            return 200, {"etag": "BwAAAA==", "bindings": [], "version": 1}
        if path.endswith(":setIamPolicy"):
            return 200, json.loads(record["body"])["policy"]
        if method == "PUT" and path.endswith("/iam"):
            return 200, json.loads(record["body"])
        if method == "POST" and re.fullmatch(r"/v1/projects/[^/]+/locations/[^/]+/jobs", path):  # Cloud Scheduler
            return 200, json.loads(record["body"])
        if method == "POST" and path.startswith("/upload/storage/v1/b/") and record["query"]["uploadType"] == ["multipart"]:
            bucket = path.split("/")[5]
            name = record["query"]["name"][0]
            size, media = multipart_related(content_type, record["body"])
            assert int(json.loads(size)["size"]) == len(media)
            self.objects[f"gs://{bucket}/{name}"] = media
            import google_crc32c

            return 200, {"bucket": bucket, "name": name, "size": str(len(media)), "generation": "1",
                         "md5Hash": base64.b64encode(hashlib.md5(media).digest()).decode(),
                         "crc32c": base64.b64encode(google_crc32c.Checksum(media).digest()).decode()}
        return 404, {"error": {"code": 404, "message": f"the fake does not serve {method} {path}"}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def multipart_related(content_type: str, body: bytes) -> list[bytes]:
    """The payloads of a multipart/related body (the boundary may be quoted either way)."""
    boundary = re.search(r"boundary=['\"]?([^'\";]+)", content_type).group(1).encode()
    payloads = []
    for part in body.split(b"--" + boundary)[1:-1]:
        part = part.lstrip(b"\r\n")
        _, _, payload = part.partition(b"\r\n\r\n" if b"\r\n\r\n" in part else b"\n\n")
        for line_end in (b"\r\n", b"\n"):  # the line end before a boundary belongs to the boundary
            if payload.endswith(line_end):
                payload = payload[:-len(line_end)]
                break
        payloads.append(payload)
    return payloads


def gcloud_env(apis: FakeGoogleApis, tmp_path: Path) -> dict[str, str]:
    """The real gcloud with a throw-away config and a dummy token, every API it calls sent to `apis`."""
    if not shutil.which("gcloud"):
        pytest.skip("the Google Cloud CLI (gcloud) is not installed")
    token = tmp_path / "token"
    token.write_text(FAKE_TOKEN)
    return {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true", "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_SURVEY_DISABLE_PROMPTS": "true",
        **{f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api}": apis.url for api in API_NAMES},
    }


def run_script(script: Path, command: str, apis: FakeGoogleApis, environ: dict[str, str]) -> str:
    """`script command` (no DRY_RUN: gcloud really runs); every request answered, with the token."""
    done = subprocess.run(["bash", str(script), command], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert apis.requests, "gcloud sent nothing"
    assert all(r["authorization"] == f"Bearer {FAKE_TOKEN}" for r in apis.requests)
    unserved = [(r["method"], r["path"], r["status"]) for r in apis.requests if r["status"] != 200]
    assert not unserved, unserved
    return done.stdout

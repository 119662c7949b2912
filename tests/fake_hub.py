"""A stand-in for the Hugging Face hub on 127.0.0.1: serves dataset files under the hub's
download URLs (/datasets/ORG/NAME/resolve/REVISION/PATH), for HF_ENDPOINT."""

import contextlib
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class Handler(BaseHTTPRequestHandler):
    files = {}  # (repo, revision, filename) -> bytes
    requests = []

    def find(self):
        """(repo, revision, file contents or None)."""
        parts = self.path.split("?")[0].split("/")  # '', datasets, org, name, resolve, revision, path...
        if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
            return None, None, None
        repo, revision = f"{parts[2]}/{parts[3]}", unquote(parts[5])
        return repo, revision, self.files.get((repo, revision, unquote("/".join(parts[6:]))))

    def answer(self, body_too):
        self.requests.append((self.command, self.path))
        repo, revision, data = self.find()
        if data is None:  # as the hub answers: no such repo (its API), no such file (a download)
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound" if self.path.startswith("/api/") else "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        # One commit for every file of a revision, as on the hub (the cache keeps files by commit).
        self.send_header("X-Repo-Commit", hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest())
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body_too:
            self.wfile.write(data)

    def do_HEAD(self):
        self.answer(body_too=False)

    def do_GET(self):
        self.answer(body_too=True)

    def log_message(self, *args):
        pass


# For a process that downloads from the stand-in: nothing else to reach.
NO_TELEMETRY = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}


@contextlib.contextmanager
def serve(files):
    """Yield (endpoint URL, list of requests served) while a server answers from `files`."""
    handler = type("FilesHandler", (Handler,), {"files": files, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


HUB_FIXTURES = Path(__file__).parent / "data" / "hub"
REVISIONS = {"Rowan/hellaswag": "refs/convert/parquet"}  # the hub's parquet export; else main


def parquet_bytes(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def fixture_files() -> dict:
    """{(repo, revision, filename): bytes} from tests/data/hub/ORG/NAME/PATH: a PATH ending in
    .parquet.jsonl holds the rows of the parquet file PATH (JSON to keep the fixture readable)."""
    files = {}
    for path in sorted(HUB_FIXTURES.rglob("*.jsonl")):
        org, name, *rest = path.relative_to(HUB_FIXTURES).parts
        filename, data = "/".join(rest), path.read_bytes()
        if filename.endswith(".parquet.jsonl"):
            filename = filename.removesuffix(".jsonl")
            data = parquet_bytes([json.loads(line) for line in data.decode().splitlines()])
        repo = f"{org}/{name}"
        files[(repo, REVISIONS.get(repo, "main"), filename)] = data
    return files

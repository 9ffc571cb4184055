"""Offline stand-ins for the Hugging Face Hub: a hand-made HF cache, and a small Hub-compatible HTTP
server on 127.0.0.1 that answers HEAD/GET on ``/<org>/<repo>/resolve/<revision>/<file>`` with the
headers huggingface_hub reads (X-Repo-Commit, ETag/X-Linked-Etag, Content-Length, X-Error-Code)."""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote


def make_hf_cache(cache_dir: Path, repo_id: str, files: Dict[str, bytes], commit: str, ref: str = "main") -> Path:
    """Lay files out as huggingface_hub does: blobs by etag, a snapshot per commit, refs naming commits."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


class FakeHub:
    """Serves ``{repo_id: {revision_or_commit: (commit, {filename: bytes})}}``; records every request."""

    def __init__(self) -> None:
        self.repos: Dict[str, Dict[str, Tuple[str, Dict[str, bytes]]]] = {}
        self.requests: List[Tuple[str, str]] = []
        self.raw: Dict[str, bytes] = {}  # plain URLs (e.g. original .pth files) -> bytes
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _answer(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                status, headers, body = hub.respond(unquote(self.path))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def do_GET(self):  # noqa: N802
                self._answer(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: Dict[str, bytes], commit: str, revisions: Tuple[str, ...] = ("main",)) -> None:
        for rev in revisions + (commit,):
            self.repos.setdefault(repo_id, {})[rev] = (commit, files)

    def respond(self, path: str) -> Tuple[int, Dict[str, str], bytes]:
        if path in self.raw:
            return 200, {"Content-Type": "application/octet-stream"}, self.raw[path]
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"not found"
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo_id not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"not found"
        if revision not in self.repos[repo_id]:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"not found"
        commit, files = self.repos[repo_id][revision]
        if filename not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                         "X-Error-Message": "Entry not found"}, b"not found"
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest()
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                     "X-Linked-Size": str(len(data)), "Content-Type": "application/octet-stream"}, data

    def gets(self, needle: Optional[str] = None) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and (needle is None or needle in path))

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

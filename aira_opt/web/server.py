"""The page, its packages and the models over HTTP on loopback: `aira-opt web`.

Routes: `/` and the page's own files; `/vendor/<package>/dist/...` from node_modules (packages.VENDORED only);
`/models/index.json` (the models and the thread count); `/models/<name>/...` (layout.WebModel's files). With more
than one thread it sends the cross-origin isolation headers that multi-threaded WebAssembly needs
(SharedArrayBuffer): COOP same-origin and COEP require-corp."""

from __future__ import annotations

import json
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from aira_opt.core.errors import OptionError
from aira_opt.core.progress import ProgressCallback
from aira_opt.folders import ExportFolder
from aira_opt.web.layout import WebFile, WebModel, web_models
from aira_opt.web.packages import PAGE, VENDORED, ensure_packages

MIME = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
        ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".wasm": "application/wasm",
        ".css": "text/css; charset=utf-8", ".png": "image/png", ".map": "application/json",
        ".jinja": "text/plain; charset=utf-8"}
OCTETS = "application/octet-stream"  # .onnx, .onnx_data
PAGE_FILES = ("index.html", "app.mjs", "aira-loop.mjs", "style.css")


class WebApp:
    """What each path answers: a WebFile, or None (404)."""

    def __init__(self, models: dict[str, WebModel], modules: Path, threads: int = 1):
        self.models, self.modules, self.threads = models, modules, threads

    @property
    def isolated(self) -> bool:
        return self.threads > 1

    def index(self) -> dict:
        return {"threads": self.threads, "models": [
            {"name": m.name, "precision": m.precision, "dtype": m.dtype, "graph": m.graph_name,
             "source_model": m.folder.manifest.source_name or m.name,
             "external_data": m.external_data is not None} for m in self.models.values()]}

    def resolve(self, url_path: str) -> WebFile | None:
        parts = PurePosixPath(unquote(urlsplit(url_path).path)).parts[1:]  # drop the leading "/"
        if any(p in ("..", ".") for p in parts):
            return None
        if not parts:
            return WebFile(source=PAGE / "index.html")
        if len(parts) == 1 and parts[0] in PAGE_FILES:
            return WebFile(source=PAGE / parts[0])
        if parts[0] == "models" and parts[1:] == ("index.json",):
            return WebFile(content=json.dumps(self.index()).encode())
        if parts[0] == "models" and len(parts) > 2 and parts[1] in self.models:
            return self.models[parts[1]].files.get("/".join(parts[2:]))
        if parts[0] == "vendor":
            rel = "/".join(parts[1:])
            if any(rel.startswith(prefix + "/") for prefix in VENDORED) and (self.modules / rel).is_file():
                return WebFile(source=self.modules / rel)
        return None


def _handler(app: WebApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "aira-opt-web"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            file = app.resolve(self.path)
            if file is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            name = self.path.split("?")[0]
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", MIME.get(PurePosixPath(name).suffix, OCTETS)
                             if name != "/" else MIME[".html"])
            self.send_header("Content-Length", str(file.size))
            self.send_header("Cache-Control", "no-cache")
            if app.isolated:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.end_headers()
            if not body:
                return
            try:
                if file.content is not None:
                    self.wfile.write(file.content)
                else:
                    with open(file.source, "rb") as f:
                        shutil.copyfileobj(f, self.wfile, 1 << 20)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page went away mid-download

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            pass  # quiet: the command prints its address, the browser shows the rest

    return Handler


class WebServer:
    """A ThreadingHTTPServer for a WebApp, on `host` (loopback unless told otherwise) and `port` (0: any free)."""

    def __init__(self, app: WebApp, host: str = "127.0.0.1", port: int = 0):
        self.httpd = ThreadingHTTPServer((host, port), _handler(app))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> WebServer:
        """Serve on a background thread (tests, benchmarks); `stop` ends it."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_server(folders: list[ExportFolder], host: str, port: int, threads: int,
                progress: ProgressCallback | None = None) -> WebServer:
    """The server for `aira-opt web`: every folder checked and its layout made before the port opens; the page's
    packages installed on first use."""
    app = WebApp(web_models(folders), ensure_packages(progress), threads)
    try:
        return WebServer(app, host, port)
    except OSError as exc:
        raise OptionError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from exc

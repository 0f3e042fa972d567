"""Run a real `tritonserver` on a model repository: find the binary, prepare its Python backend for this
interpreter, start it, wait until the model is ready, stop it gracefully.

The binary comes from the `nvidia-pytriton` wheel (which bundles Triton with its Python backend), or from
`tritonserver` on PATH (NVIDIA's container), or from an explicit path. Two things would otherwise break the
Python backend, and are handled here rather than left to users:
- the wheel ships one backend stub per Python version; the one matching this interpreter is put in place;
- the stub links `libpython3.X.so.1.0` by name, which the loader may resolve to a system Python whose standard
  library does not match this interpreter's (model initialization then fails deep in `threading`); the
  interpreter's own libpython goes first on LD_LIBRARY_PATH, and an interpreter without one is refused with
  what to do instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aira_opt.core.errors import AiraOptError, Terminated
from aira_opt.folders import EngineFolder, ExportFolder
from aira_opt.serve.repository import ServingOptions, write_repository
from aira_opt.source.models import cache_dir

PYTRITON_VERSION = "0.7.0"  # its wheel bundles Triton server 2.51 and the Python backend
# Its own dependencies are left out: its client pins protobuf < 7, which transformers 5 cannot work with, and only
# the server binary is used.
INSTALL = f"pip install 'aira-opt[serve]' && pip install --no-deps nvidia-pytriton=={PYTRITON_VERSION}"
EXIT_TIMEOUT_S = 30  # how long in-flight requests may take to finish once shutdown starts
LOCAL_HOST = "127.0.0.1"  # serve's default: this machine only; --host 0.0.0.0 opens it to the network


class ServerError(AiraOptError):
    """Triton would not start, or its model did not become ready."""


@dataclass(frozen=True)
class Ports:
    """Triton's three endpoints; the defaults are Triton's own."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def problems(self) -> list[str]:
        values = [self.http, self.grpc, self.metrics]
        found = [f"port {p} is not in 1-65535" for p in values if not 0 < p < 65536]
        if len(set(values)) != 3:
            found.append(f"the HTTP, gRPC and metrics ports must differ, got {values}")
        return found


@dataclass(frozen=True)
class TritonInstall:
    """Where the server binary is, and the Python backend folder it should load."""

    binary: Path
    backends: Path  # holds python/libtriton_python.so (and the stub once prepared)
    stub: Path | None  # the wheel's stub for this Python, copied into place by prepare_backends
    libraries: Path | None  # the wheel's bundled shared libraries


def find_tritonserver(explicit: Path | None = None) -> TritonInstall:
    """The server to run: an explicit binary, else the nvidia-pytriton wheel's, else `tritonserver` on PATH."""
    if explicit is not None:
        binary = Path(explicit)
        if not binary.is_file():
            raise ServerError(f"no tritonserver binary at '{binary}'")
        return TritonInstall(binary, binary.resolve().parent.parent / "backends", None, None)
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton has no Triton Python backend for Python {version}; "
                              "use Python 3.8-3.13")
        return TritonInstall(dist / "bin" / "tritonserver", dist / "backends", stub, dist.parent.parent / "nvidia_pytriton.libs")
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), Path("/opt/tritonserver/backends"), None, None)
    raise ServerError(f"serving needs Triton Inference Server: {INSTALL}; or run inside NVIDIA's tritonserver "
                      "container (tritonserver on PATH), or pass --tritonserver PATH")


def prepare_backends(install: TritonInstall) -> Path:
    """A backend folder for this interpreter: the wheel's Python backend with this Python's stub beside it
    (links into a cache folder, as PyTriton copies them into its workspace)."""
    if install.stub is None:
        return install.backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache_dir() / "tritonserver" / f"{PYTRITON_VERSION}-py{version}" / "backends"
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in [*sorted((install.backends / "python").iterdir()), install.stub]:
        if source.name == "__pycache__":
            continue
        target = python / source.name
        if not (target.is_symlink() and target.resolve() == source.resolve()):
            target.unlink(missing_ok=True)
            target.symlink_to(source.resolve())
    return folder


def libpython_folder() -> Path | None:
    """The folder holding this interpreter's own shared libpython, or None when it is built statically."""
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and (Path(libdir) / name).exists():
        return Path(libdir)
    return None


def server_environment(install: TritonInstall) -> dict[str, str]:
    """The server's environment: this interpreter's libpython and the wheel's libraries first on the loader's
    path, and this environment's site-packages for the stub (model.py adds them)."""
    env = dict(os.environ)
    if install.stub is not None:
        import numpy

        if int(numpy.__version__.split(".")[0]) >= 2:
            raise ServerError(f"Triton's Python backend (nvidia-pytriton {PYTRITON_VERSION}) is built for numpy 1.x "
                              f"and garbles tensors under numpy {numpy.__version__}: pip install 'numpy<2' "
                              "(the serve extra does)")
        own = libpython_folder()
        if own is None:
            raise ServerError(
                f"this Python ({sys.executable}) has no shared libpython, which Triton's Python backend loads; "
                "use a Python built with --enable-shared (Debian's python3, or pyenv with "
                "PYTHON_CONFIGURE_OPTS=--enable-shared), or NVIDIA's tritonserver container")
        paths = [str(own)] + ([str(install.libraries)] if install.libraries else [])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    sites = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    env["AIRA_OPT_SITE_PACKAGES"] = os.pathsep.join(p for p in sites if Path(p).is_dir())
    return env


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


class TritonServer:
    """One tritonserver process over a repository; a context manager that always stops it."""

    def __init__(self, repository: Path, ports: Ports = Ports(), install: TritonInstall | None = None,
                 log_path: Path | None = None, host: str = LOCAL_HOST, exit_timeout_s: int = EXIT_TIMEOUT_S):
        problems = ports.problems()
        if problems:
            raise ServerError("; ".join(problems))
        self.repository = Path(repository)
        self.ports = ports
        self.install = install or find_tritonserver()
        self.log_path = log_path or self.repository.parent / "tritonserver.log"
        self.host = host
        self.exit_timeout_s = exit_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [str(self.install.binary), "--model-repository", str(self.repository),
                "--backend-directory", str(prepare_backends(self.install)),
                "--http-port", str(self.ports.http), "--grpc-port", str(self.ports.grpc),
                "--metrics-port", str(self.ports.metrics), "--http-address", self.host, "--grpc-address", self.host,
                "--metrics-address", self.host,
                "--exit-timeout-secs", str(self.exit_timeout_s), "--allow-metrics", "true", "--log-info", "true"]

    @property
    def url(self) -> str:
        return f"http://{LOCAL_HOST if self.host in (LOCAL_HOST, '0.0.0.0') else self.host}:{self.ports.http}"

    def start(self) -> TritonServer:
        busy = [f"{what} port {port}" for what, port in (("HTTP", self.ports.http), ("gRPC", self.ports.grpc),
                                                         ("metrics", self.ports.metrics)) if _port_in_use(port)]
        if busy:
            raise ServerError(f"{', '.join(busy)} already in use; choose others (--http-port, --grpc-port, "
                              "--metrics-port)")
        env = server_environment(self.install)
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Its own session: Ctrl-C reaches only us, and we stop it the graceful way. It runs in the repository's
        # folder: the Python stub puts its working directory first on sys.path, where a stray .py file of the
        # user's (a `transformers.py`, say) would shadow a real module.
        self.process = subprocess.Popen(self.command(), stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, cwd=self.repository)
        return self

    def wait_ready(self, model: str, timeout_s: float = 300.0, progress: bool = False) -> None:
        """Block until `model` is ready; if the server dies or the time runs out, stop it and say why."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                self.stop()
                raise ServerError(f"tritonserver exited before '{model}' was ready: {self.last_error()}")
            if _get(f"{self.url}/v2/models/{model}/ready") == 200:
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"'{model}' was not ready after {timeout_s:.0f} s: {self.last_error()}")

    def last_error(self) -> str:
        """The most telling line of the server's log, for a one-line message: why the model failed to load, else
        its first error (not the ones every CPU-only start logs about CUDA, NVML and DCGM)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        benign = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory")
        errors = [ln.strip() for ln in lines if (ln.startswith("E") or "error" in ln.lower())
                  and not any(b in ln for b in benign)]
        failed = [ln for ln in errors if "failed to load" in ln or "Failed to initialize" in ln]
        line = (failed or errors or lines or ["no log"])[0].split("\\n")[0]
        return line[:400] + f" (log: {self.log_path})"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM: Triton refuses new requests, lets in-flight ones finish (up to its exit timeout), then exits."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(count: int) -> list[int]:
    """Ports free on localhost right now, for a server started beside others (tests, load tests)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def serve_folder(source: ExportFolder | EngineFolder, name: str | None, options: ServingOptions, ports: Ports,
                 echo: Callable[[str], None], tritonserver: Path | None = None, log_path: Path | None = None,
                 ready_timeout_s: float = 600.0, host: str = LOCAL_HOST) -> None:
    """`aira-opt serve`: a repository over the folder (in a temporary place, linking the folder), a server on it,
    and its addresses printed; runs until Ctrl-C or SIGTERM, then shuts down gracefully and cleans up."""
    install = find_tritonserver(tritonserver)
    with tempfile.TemporaryDirectory(prefix="aira-opt-serve-") as tmp:
        model = write_repository(source, Path(tmp) / "repository", name, options, link=True).name
        server = TritonServer(Path(tmp) / "repository", ports, install, log_path or Path(tmp) / "tritonserver.log",
                              host=host)
        echo(f"starting Triton Inference Server ({install.binary}) for '{model}' from {source.path} on {host}; "
             f"log: {server.log_path}")
        server.start()
        try:
            server.wait_ready(model, ready_timeout_s)
            base = f"http://localhost:{ports.http}"
            echo(f"ready: '{model}'\n"
                 f"  HTTP     {base}  (POST /v2/models/{model}/generate, /generate_stream)\n"
                 f"  gRPC     localhost:{ports.grpc}\n"
                 f"  metrics  http://localhost:{ports.metrics}/metrics\n"
                 f"try: curl -s {base}/v2/models/{model}/generate -d '{{\"text_input\": \"What is the capital of "
                 f"Brazil?\"}}'\nCtrl-C or SIGTERM stops it (requests in flight finish first).")
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
            raise ServerError(f"tritonserver exited unexpectedly: {server.last_error()}")
        except (KeyboardInterrupt, Terminated):
            echo("stopping: new requests are refused, requests in flight finish")
            code = server.stop()
            echo("stopped" + ("" if code == 0 else f" (tritonserver exit status {code})"))
        finally:
            server.stop()

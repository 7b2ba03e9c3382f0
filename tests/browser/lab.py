"""A headless JupyterLab server for browser tests: 127.0.0.1, a free port, a random token, and every
Jupyter/JupyterLab directory (config, data, runtime, settings, workspaces, IPython) inside a tmp dir,
so no user state (old workspaces, kernels, news pop-ups) leaks in and nothing is written outside it."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# user settings written before start: no "get Jupyter news?" toast, no update check, and every cell
# kept in the DOM (JupyterLab 4's windowing would drop off-screen cells, and our waits read the DOM)
SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


class Deadline:
    """One time budget for the whole test; every wait gets what is left of it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def ms(self, cap: float | None = None) -> float:
        s = self.left() if cap is None else min(cap, self.left())
        return max(1.0, s * 1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, root: Path, port: int, token: str, log: Path, proc: subprocess.Popen):
        self.root, self.port, self.token, self.log, self.proc = root, port, token, log, proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 5):
        req = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"}, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


@contextmanager
def jupyter_lab(root: Path, home: Path, env: dict[str, str], deadline: Deadline, start_timeout: float = 90):
    """Start `python -m jupyter lab` serving `root`; yield a Lab; shut it (and its kernels) down after."""
    port, token = free_port(), secrets.token_hex(16)
    dirs = {k: home / v for k, v in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                                      ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                                      ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")]}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for plugin, values in SETTINGS.items():
        pkg, name = plugin.rsplit("/", 1)
        f = dirs["JUPYTERLAB_SETTINGS_DIR"] / pkg / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    full_env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "JUPYTER_PLATFORM_DIRS": "0", **env}
    full_env.pop("JUPYTER_TOKEN", None)
    log = home / "jupyter-server.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands, read cell models
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    lab = Lab(root, port, token, log, proc)
    try:
        # poll the REST API until the server answers (it exits early on a port clash or bad flag)
        limit = time.monotonic() + min(start_timeout, deadline.left())
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{lab.log_tail()}")
            try:
                lab.api("status", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > limit:
                    raise RuntimeError(f"jupyter lab did not answer within {start_timeout:.0f}s:\n{lab.log_tail()}")
                time.sleep(0.25)  # poll interval, not a wait for a result
        yield lab
    finally:
        stop(lab)


def stop(lab: Lab) -> None:
    """Shut kernels down through the API (kernels run in their own sessions), then the server."""
    proc = lab.proc
    if proc.poll() is None:
        try:
            for k in lab.api("kernels"):
                lab.api(f"kernels/{k['id']}", method="DELETE", timeout=15)
        except Exception:
            pass
        try:
            lab.api("shutdown", method="POST")
        except Exception:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait in [(signal.SIGTERM, 10), (signal.SIGKILL, 10)]:
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass

"""`gear serve RUN_DIR`: a local web page to explore a trained run (sample, reconstruct, curves).

``explorer`` and ``curves`` hold what the page does and import no web framework; ``app`` lays it out with Gradio
(the optional ``serve`` extra). ``serve`` checks the port, the login and the run before it starts anything.

Beyond this machine (a ``--host`` that is not loopback) the page asks for a login: ``--auth-file FILE`` of
``user:password`` lines, checked by Gradio's own login, unless ``--no-auth`` says that anyone who reaches the port
may use it.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def check_port(host: str, port: int) -> None:
    """ValueError unless a server could listen on host:port now (bound with SO_REUSEADDR, as uvicorn binds)."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}): "
                         "another program holds the port; pass --port with a free one") from None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and lines starting with # skipped) as Gradio's ``auth`` list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--auth-file {path}: no such file (write one user:password line per login)")
    logins = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth-file {path}, line {number}: write user:password (both non-empty)")
        logins.append((user, password))
    if not logins:
        raise ValueError(f"--auth-file {path} holds no login: write one user:password line per login")
    return logins


def check_login(host: str, auth_file: str | None, no_auth: bool) -> list[tuple[str, str]] | None:
    """The logins to require (None: none). A host beyond loopback needs ``auth_file`` or an explicit ``no_auth``."""
    if auth_file and no_auth:
        raise ValueError("--auth-file and --no-auth contradict each other: pass one of them")
    if auth_file:
        return read_auth_file(auth_file)
    if not no_auth and not is_loopback(host):
        raise ValueError(f"--host {host} serves the page beyond this machine: pass --auth-file FILE (user:password "
                         "lines) to require a login, or --no-auth to let anyone who reaches the port use it")
    return None


def serve(run_dir: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu", block: bool = True,
          auth_file: str | None = None, no_auth: bool = False):
    """Load the run, then serve its page until interrupted (block=False: return the running Gradio app)."""
    from gear.serve.explorer import RunExplorer

    logins = check_login(host, auth_file, no_auth)
    check_port(host, port)
    explorer = RunExplorer(run_dir, device=device)
    try:
        from gear.serve.app import build_app, launch
    except ImportError as err:
        raise ImportError(f"gear serve needs gradio ({err}): pip install -e '.[serve]' or run `make serve`") from None
    demo = build_app(explorer)
    launch(demo, host, port, auth=logins)
    if block:
        login = f", login required ({len(logins)} users)" if logins else ""
        print(f"serving {run_dir} on http://{host}:{port}{login} (Ctrl+C to stop)", flush=True)
        demo.block_thread()  # until Ctrl+C, then closes the server
    return demo

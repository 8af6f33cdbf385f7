"""`gear serve RUN_DIR`: a local web page to explore a trained run (sample, reconstruct, curves).

``explorer`` and ``curves`` hold what the page does and import no web framework; ``app`` lays it out with Gradio
(the optional ``serve`` extra). ``serve`` checks the port and the run before it starts anything.
"""

from __future__ import annotations

import socket

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


def serve(run_dir: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu", block: bool = True):
    """Load the run, then serve its page until interrupted (block=False: return the running Gradio app)."""
    from gear.serve.explorer import RunExplorer

    check_port(host, port)
    explorer = RunExplorer(run_dir, device=device)
    try:
        from gear.serve.app import build_app, launch
    except ImportError as err:
        raise ImportError(f"gear serve needs gradio ({err}): pip install -e '.[serve]' or run `make serve`") from None
    demo = build_app(explorer)
    launch(demo, host, port)
    if block:
        print(f"serving {run_dir} on http://{host}:{port} (Ctrl+C to stop)", flush=True)
        demo.block_thread()  # until Ctrl+C, then closes the server
    return demo

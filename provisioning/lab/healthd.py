"""A tiny HTTP health endpoint for lab hosts (the primary site, the witness).

Real sites expose a health URL that hotsite's HTTP probe polls; this stands in
for it: ``GET /health`` -> 200 ``{"status": "ok", "site": NAME}``, anything
else -> 404.  Stdlib only, so it runs with the venv's python inside a network
namespace (``ip netns exec NS python healthd.py ...``).  ``--workdir`` lets the
lab's cleanup find this process by its command line, and holds the switch for
a grey failure: while ``<workdir>/<site>.unhealthy`` exists, ``/health``
answers 503 with the file's text as the reason (the site's SBC keeps
answering SIP: only the site's own health says it cannot serve).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(site: str, workdir: str = "") -> type[BaseHTTPRequestHandler]:
    healthy = json.dumps({"status": "ok", "site": site}).encode()
    switch = Path(workdir) / f"{site}.unhealthy" if workdir else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "hotsite-lab-healthd/1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] != "/health":
                self.send_error(404, "try /health")
                return
            code, body = 200, healthy
            if switch is not None and switch.exists():
                reason = switch.read_text().strip() or "unhealthy"
                code, body = 503, json.dumps({"status": "down", "site": site, "reason": reason}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # probes poll every second: keep the log file small

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--site", required=True)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(args.site, args.workdir))
    server.daemon_threads = True
    print(f"healthd {args.site} listening on {args.bind}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()

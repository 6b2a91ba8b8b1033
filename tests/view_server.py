"""The viewer's app served by uvicorn in a thread on a free loopback port, for the tests."""

from __future__ import annotations

import http.client
import json
import threading
import time

from wsikit.view.app import bind, build_app, make_server
from wsikit.view.data import ViewJob


class Server:
    """The app of ``job`` served by uvicorn in a thread on 127.0.0.1:<free port>."""

    def __init__(self, job: ViewJob, token: str | None = "secret-token") -> None:
        self.job, self.token = job, token
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = make_server(build_app(job, token))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def get(self, path: str, token: bool = True, headers: dict | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        hdrs = {"x-wsikit-token": self.token} if token and self.token else {}
        conn.request("GET", path, headers={**hdrs, **(headers or {})})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), body

    def json(self, path: str) -> dict:
        status, _, body = self.get(path)
        assert status == 200, (path, status, body[:200])
        return json.loads(body)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

"""An embedded S3 for zero-config runs: moto's S3 backend served on a random loopback port.

Only ``moto[s3]`` and ``werkzeug`` are needed: the small WSGI app below routes path-style requests
straight to moto's S3 handlers, so moto's Flask server (flask, flask-cors, …) is not used.
Objects live in this process (moto keeps objects under ~5 MiB in memory and spills larger ones
to temporary files); they are gone when the process exits. All EmbeddedS3 instances of one process
share moto's one backend.

Memory, measured with 1 GiB uploaded in 128 presigned 8 MiB parts: part PUTs stay bounded (max RSS
~360 MiB for the whole process, parts spill to disk), but moto's CompleteMultipartUpload joins the
parts in memory (bytearray, then bytes, then the key's buffer): peak RSS ~4.4 GiB, and a GET reads
the whole object into memory. Fine for zero-config runs with modest files; use MinIO/R2/S3 for more.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self

from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.request import Request as MotoRequest
from moto.s3.exceptions import BucketAlreadyExists
from moto.s3.models import s3_backends
from moto.s3.responses import S3Response
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Response

from storage.s3 import StorageConfig

#: Loopback only: the embedded S3 is for this machine's processes.
DEFAULT_HOST = "127.0.0.1"
#: Region moto's backend is addressed with.
EMBEDDED_REGION = "us-east-1"
#: Dummy credentials: moto accepts any and checks no signature.
EMBEDDED_ACCESS_KEY_ID = "ggt-embedded"
EMBEDDED_SECRET_ACCESS_KEY = "ggt-embedded-secret"
#: Seconds start() waits for the server thread to listen.
START_TIMEOUT = 10.0

#: Path-style routes, as moto's own server maps them: "/" lists buckets, "/b" is a bucket, "/b/k…" a key.
_BUCKET_PATH = re.compile(r"^/[^/]+/?$")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _ServerRequest(MotoRequest):
    """moto's request type, marked as coming from a real WSGI server (as moto's Flask app does)."""

    from_wsgi_server = True


def s3_wsgi_app() -> WsgiApp:
    """A WSGI app serving moto's S3 backend with path-style addressing.

    Conditional writes (If-Match / If-None-Match) are serialised so that moto's check-then-put
    is atomic among them; job records rely on that.
    """
    conditional_lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = _ServerRequest(environ)
        path = request.path
        if path == "/":
            handler = S3Response.bucket_dispatch
        elif _BUCKET_PATH.match(path):
            handler = S3Response.ambiguous_dispatch
        else:
            handler = S3Response.key_dispatch
        conditional = request.method in ("PUT", "POST") and (
            "If-Match" in request.headers or "If-None-Match" in request.headers
        )
        try:
            if conditional:
                request.get_data()  # read the body before taking the lock
                with conditional_lock:
                    result = handler(request, request.raw_url, dict(request.headers))
            else:
                result = handler(request, request.raw_url, dict(request.headers))
        except HTTPException as exc:  # moto's S3 errors render themselves as S3 XML
            return exc.get_response(environ)(environ, start_response)
        status, headers, body = result if len(result) == 3 else (200, {}, result)
        response = Response(response=body, status=status, headers=headers)
        if request.method == "HEAD" and "content-length" in headers:
            response.headers["Content-Length"] = headers["content-length"]
        return response(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    """Werkzeug's handler without a log line per request."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class EmbeddedS3:
    """moto's S3 on ``127.0.0.1:<random port>`` in a thread, with one bucket created.

    ``with EmbeddedS3(bucket="getgoodtape") as s3: s3.config`` — or ``start()`` / ``stop()``.
    """

    def __init__(self, *, bucket: str, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.bucket = bucket
        self._host = host
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL to give S3 clients, e.g. ``http://127.0.0.1:41234``."""
        if self._server is None:
            raise RuntimeError("EmbeddedS3 is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def config(self) -> StorageConfig:
        """A StorageConfig for this S3 and bucket, with the dummy credentials."""
        return StorageConfig(
            endpoint=self.endpoint,
            region=EMBEDDED_REGION,
            bucket=self.bucket,
            access_key_id=EMBEDDED_ACCESS_KEY_ID,
            secret_access_key=EMBEDDED_SECRET_ACCESS_KEY,
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket in moto's backend directly (no request); an existing one is kept."""
        try:
            s3_backends[DEFAULT_ACCOUNT_ID]["aws"].create_bucket(name, EMBEDDED_REGION)
        except BucketAlreadyExists:
            pass

    def start(self) -> None:
        """Listen on the loopback port and serve in a daemon thread; creates the bucket."""
        if self._server is not None:
            return
        self.create_bucket(self.bucket)
        server = make_server(
            self._host, self._port, s3_wsgi_app(), threaded=True, request_handler=_QuietHandler
        )
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="embedded-s3", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop serving and close the socket (the objects stay in moto's backend until exit)."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=START_TIMEOUT)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def random_bucket_name(prefix: str = "ggt") -> str:
    """A fresh, valid bucket name (lower case, ≤ 63 characters) for isolated runs and tests."""
    return f"{prefix}-{secrets.token_hex(6)}"

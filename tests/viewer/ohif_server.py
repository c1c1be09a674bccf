"""One origin for OHIF and Orthanc: serves the prebuilt ``@ohif/app`` dist and forwards
``/dicom-web/*`` to Orthanc's DICOMweb plugin (Orthanc 1.10 has no CORS setting).

Test harness only (tests/viewer): the viewer is fetched by ``scripts/install_servers.sh``
(``npm pack @ohif/app@OHIF_VERSION`` into ``tests/viewer/.ohif/``, ignored by git). Run by hand to
look at results in OHIF::

    .venv/bin/python -m tests.viewer.ohif_server --orthanc http://127.0.0.1:8042 --user u --password p
"""

from __future__ import annotations

import argparse
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(__file__).parent / ".ohif" / "package" / "dist"

_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc behind the same-origin proxy',
      name: 'orthanc',
      wadoUriRoot: '%(root)s/dicom-web',
      qidoRoot: '%(root)s/dicom-web',
      wadoRoot: '%(root)s/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: false },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def _handler(dist: Path, orthanc: str, auth: tuple[str, str], client: httpx.Client) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            return

        def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith("/dicom-web/"):
                self._proxy()
            elif path == "/app-config.js":
                root = f"http://{self.headers.get('Host', '127.0.0.1')}"
                self._send(200, (_CONFIG % {"root": root}).encode(), "application/javascript")
            else:
                self._static(path)

        def _static(self, path: str) -> None:
            target = (dist / path.lstrip("/")).resolve()
            if not target.is_relative_to(dist) or not target.is_file():
                target = dist / "index.html"  # the viewer's client-side routes
            kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if target.suffix == ".wasm":
                kind = "application/wasm"
            self._send(200, target.read_bytes(), kind)

        def _proxy(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host")}
            try:
                upstream = client.get(orthanc + self.path, headers=headers, auth=auth)
            except httpx.HTTPError:
                self._send(502, b"orthanc unreachable", "text/plain")
                return
            self._send(
                upstream.status_code,
                upstream.content,
                upstream.headers.get("content-type", "application/octet-stream"),
            )

    return Handler


class OhifServer:
    """OHIF dist + DICOMweb proxy on 127.0.0.1 (a thread); ``url`` is its origin."""

    def __init__(self, orthanc_url: str, user: str, password: str, *, port: int = 0, dist: Path = OHIF_DIST) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"OHIF {OHIF_VERSION} dist missing at {dist}: run scripts/install_servers.sh")
        self._client = httpx.Client(timeout=30)
        handler = _handler(dist.resolve(), orthanc_url.rstrip("/"), (user, password), self._client)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orthanc", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    with OhifServer(args.orthanc, args.user, args.password, port=args.port) as server:
        print(f"OHIF on {server.url}")
        threading.Event().wait()


if __name__ == "__main__":
    main()

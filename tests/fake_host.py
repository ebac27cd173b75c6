"""A file host on a loopback port for download tests: Range requests, a connection cut mid-body, and a
fake of Google Drive's large-file confirmation in its three forms. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DRIVE_UUID = "5d6e1f2a-test"
DRIVE_TOKEN = "Xy12"


@dataclass
class Seen:
    path: str
    range: str | None
    if_range: str | None


@dataclass
class FakeHost:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> content
    drive_files: dict[str, bytes] = field(default_factory=dict)  # Drive file id -> content
    drive_style: str = "form"  # form | link | cookie | quota
    cut_once: set[str] = field(default_factory=set)  # paths whose next full body stops halfway
    ignore_range: bool = False
    seen: list[Seen] = field(default_factory=list)

    def start(self) -> FakeHost:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def drive_url(self, file_id: str) -> str:
        return f"{self.url}/uc?export=download&id={file_id}"

    def file_requests(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


def closed_port_url() -> str:
    """A loopback URL nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _handler(host: FakeHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            host.seen.append(Seen(parts.path, self.headers.get("Range"), self.headers.get("If-Range")))
            if parts.path == "/uc":
                return self._drive_uc(query)
            if parts.path == "/download":
                return self._drive_download(query)
            if parts.path not in host.files:
                return self._send(404, b"not found", "text/plain")
            self._file(parts.path, host.files[parts.path])

        def _drive_uc(self, query: dict[str, str]) -> None:
            content = host.drive_files.get(query.get("id", ""))
            if content is None:
                return self._send(404, b"<html><title>Not found</title></html>", "text/html")
            confirmed = query.get("confirm") == DRIVE_TOKEN
            if host.drive_style == "link" and confirmed:
                return self._file(self.path, content)
            if (
                host.drive_style == "cookie"
                and confirmed
                and "download_warning" in self.headers.get("Cookie", "")
            ):
                return self._file(self.path, content)
            self._send(200, _warning_page(host, query["id"]).encode(), "text/html; charset=utf-8")

        def _drive_download(self, query: dict[str, str]) -> None:
            content = host.drive_files.get(query.get("id", ""))
            ok = (
                host.drive_style == "form" and query.get("confirm") == "t" and query.get("uuid") == DRIVE_UUID
            )
            if content is None or not ok:
                return self._send(400, b"<html><title>Bad request</title></html>", "text/html")
            self._file(self.path, content)

        def _file(self, key: str, content: bytes) -> None:
            etag = '"' + hashlib.sha256(content).hexdigest()[:16] + '"'
            start = _range_start(self.headers.get("Range"))
            if host.ignore_range or self.headers.get("If-Range") not in (None, etag):
                start = None
            if start is not None and start >= len(content):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = content[start or 0 :]
            self.send_response(206 if start is not None else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            if start is not None:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.end_headers()
            if key in host.cut_once:  # half the body, then the connection drops
                host.cut_once.discard(key)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

        def _send(self, status: int, body: bytes, content_type: str, cookie: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if host.drive_style == "cookie" and status == 200:
                self.send_header("Set-Cookie", f"download_warning_13058_abc={DRIVE_TOKEN}; Path=/")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    return int(header[len("bytes=") : -1])


def _warning_page(host: FakeHost, file_id: str) -> str:
    """Shaped like Drive's pages: a title, a message, and (but for 'quota') one way to the file."""
    if host.drive_style == "quota":
        return "<html><head><title>Google Drive - Quota exceeded</title></head><body>Try later</body></html>"
    head = "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
    text = "<p>Google Drive can't scan this file for viruses.</p>"
    if host.drive_style == "form":
        way = (
            f'<form id="download-form" action="{host.url}/download" method="get">'
            '<input type="submit" id="uc-download-link" value="Download anyway"/>'
            f'<input type="hidden" name="id" value="{file_id}">'
            '<input type="hidden" name="export" value="download">'
            '<input type="hidden" name="confirm" value="t">'
            f'<input type="hidden" name="uuid" value="{DRIVE_UUID}">'
            "</form>"
        )
    elif host.drive_style == "link":
        href = f"/uc?export=download&amp;confirm={DRIVE_TOKEN}&amp;id={file_id}"
        way = f'<a id="uc-download-link" href="{href}">Download anyway</a>'
    else:  # cookie: the token is only in the Set-Cookie header
        way = ""
    return head + text + way + "</body></html>"

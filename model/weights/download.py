"""One file over HTTP(S) with the standard library: a progress bar, resumable, clear errors offline.

The bytes go to a `.part` file. A connection lost mid-body is resumed with an HTTP Range request from
where it stopped (up to `retries` times in one call); a `.part` left by an earlier call is resumed the same
way. Beside it, `<part>.json` keeps the URL and the server's validator (ETag or Last-Modified), sent as
If-Range so that a file changed upstream restarts from zero instead of being spliced. A server that
ignores Range (200 instead of 206) also restarts from zero. Google Drive's confirmation page is followed
(model.weights.gdrive).
Checking what arrived (size, hash, loader) is the caller's job: model.weights.named.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from model.errors import DownloadError
from model.weights.gdrive import confirmation_url, page_title

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PAGE_LIMIT_BYTES = 2 << 20  # an HTML page larger than this is not a confirmation page
MAX_PAGE_HOPS = 3
USER_AGENT = "selavpr-weights/1 (+https://github.com/Lu-Feng/SelaVPR)"
MIRROR_HINT = "download it elsewhere and pass the file, or set the mirror"


@dataclass(frozen=True)
class DownloadOutcome:
    part: Path  # the complete file, still under its .part name
    size_bytes: int
    resumed_from: int  # bytes already on disk when the first body arrived (0: a fresh download)
    attempts: int


class _Interrupted(Exception):
    """The body stopped early; `received` bytes are on disk."""

    def __init__(self, received: int, reason: str) -> None:
        super().__init__(reason)
        self.received, self.reason = received, reason


@dataclass
class _Response:
    body: http.client.HTTPResponse | urllib.error.HTTPError
    offset: int  # where this body starts in the file
    total: int | None  # the whole file's size when the server said it


def host_of(url: str) -> str:
    return urlsplit(url).hostname or url


def unreachable(url: str, label: str, reason: object) -> DownloadError:
    return DownloadError(f"cannot reach {host_of(url)} to fetch {label}; {MIRROR_HINT} ({reason})")


def download(
    url: str, part: Path, *, label: str, progress: bool = True, retries: int = 3, timeout: float = 30.0
) -> DownloadOutcome:
    """Fetch `url` into `part`, resuming what is there. Raises DownloadError; a partial file is kept."""
    session = _Session(timeout)
    meta = _PartMeta(part)
    offset = meta.resumable_offset(url)
    resumed_from, attempts = None, 0
    while True:
        attempts += 1
        try:
            response = _open_file(session, url, offset, meta.validator, label)
            if response is None:  # 416 for a part that is already whole
                return DownloadOutcome(part, offset, offset, attempts)
            if response.offset == 0:
                meta.start(url, response.body.headers)
            resumed_from = response.offset if resumed_from is None else resumed_from
            size = _stream(response, part, label, progress)
            meta.clear()
            return DownloadOutcome(part, size, resumed_from, attempts)
        except _Interrupted as exc:
            offset = exc.received
            if attempts > retries:
                raise DownloadError(
                    f"lost the connection to {host_of(url)} after {exc.received} bytes of {label} "
                    f"({exc.reason}); the partial file {part} is kept: run the same command again to resume"
                ) from None
            log.warning("%s: connection lost at %d bytes (%s); resuming", label, exc.received, exc.reason)
            time.sleep(min(0.5 * 2**attempts, 10.0))


class _Session:
    """An opener that keeps cookies (Drive's warning cookie) and honours the usual proxy variables."""

    def __init__(self, timeout: float) -> None:
        self.cookies = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.timeout = timeout

    def get(self, url: str, offset: int, validator: str | None, label: str):
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        try:
            return self.opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                return exc
            raise DownloadError(
                f"{host_of(url)} answered HTTP {exc.code} ({exc.reason}) when asked for {label} ({url})"
            ) from None
        except urllib.error.URLError as exc:
            raise unreachable(url, label, exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(url, label, exc) from None
        except ValueError as exc:
            raise DownloadError(f"{label}: not a usable URL: {url} ({exc})") from None


def _open_file(
    session: _Session, url: str, offset: int, validator: str | None, label: str
) -> _Response | None:
    """The response carrying the file's bytes, through any Drive confirmation pages on the way."""
    target = url
    for _ in range(MAX_PAGE_HOPS + 1):
        body = session.get(target, offset, validator, label)
        if body.status == 416:
            return _whole_part_or_restart(body, offset)
        if not _is_html(body):
            return _placed(body, offset)
        page = body.read(PAGE_LIMIT_BYTES).decode("utf-8", errors="replace")
        page_url = body.geturl()
        body.close()
        following = confirmation_url(page, page_url, session.cookies)
        if following is None or following == target:
            raise DownloadError(
                f"{host_of(page_url)} sent a web page ({page_title(page) or 'untitled'!r}) instead of "
                f"{label}: the file may have moved, be over its download quota or need a sign-in; "
                f"{MIRROR_HINT}"
            )
        log.info("%s: following the download confirmation page of %s", label, host_of(page_url))
        target = following
    raise DownloadError(f"{host_of(url)}: more than {MAX_PAGE_HOPS} confirmation pages for {label}")


def _is_html(body) -> bool:
    return body.headers.get_content_type() in ("text/html", "application/xhtml+xml")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _placed(body, offset: int) -> _Response:
    """Where the body starts: 206 continues the part; 200 (Range ignored or If-Range failed) restarts."""
    if body.status == 206:
        match = _CONTENT_RANGE.match(body.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            total = None if match.group(3) == "*" else int(match.group(3))
            return _Response(body, offset, total)
        body.close()
        raise _Interrupted(0, f"unexpected Content-Range {body.headers.get('Content-Range')!r}")
    length = body.headers.get("Content-Length")
    return _Response(body, 0, int(length) if length and length.isdigit() else None)


def _whole_part_or_restart(body, offset: int) -> None:
    """416 to `Range: bytes=N-`: the part is already whole when the file is N bytes long."""
    match = re.match(r"bytes\s+\*/(\d+)", body.headers.get("Content-Range", ""))
    body.close()
    if match and int(match.group(1)) == offset:
        return None
    raise _Interrupted(0, "the server refused to resume the partial file")


def _stream(response: _Response, part: Path, label: str, progress: bool) -> int:
    """Append (206) or write from zero (200) until the body ends; raises _Interrupted when it ends early."""
    part.parent.mkdir(parents=True, exist_ok=True)
    received = response.offset
    with (
        open(part, "ab" if response.offset else "wb") as out,
        tqdm(
            total=response.total,
            initial=received,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
            file=sys.stderr,
            mininterval=0.5,
        ) as bar,
        response.body as body,
    ):
        while True:
            try:
                chunk = body.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                out.flush()
                raise _Interrupted(received, type(exc).__name__) from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if response.total is not None and received < response.total:
        raise _Interrupted(received, f"the body ended at {received} of {response.total} bytes")
    if response.total is not None and received > response.total:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{label}: received {received} bytes, more than the {response.total} announced")
    return received


class _PartMeta:
    """`<part>.json`: which URL the partial file came from and the server's validator for If-Range."""

    def __init__(self, part: Path) -> None:
        self.part = part
        self.path = part.with_name(part.name + ".json")
        self.validator: str | None = None

    def resumable_offset(self, url: str) -> int:
        """Bytes to resume from: 0 when there is no part, or it came from another URL (a new mirror)."""
        if not self.part.is_file():
            return 0
        try:
            meta = json.loads(self.path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("url") != url:
            self.part.unlink()
            return 0
        self.validator = meta.get("validator")
        return self.part.stat().st_size

    def start(self, url: str, headers) -> None:
        etag = headers.get("ETag")
        self.validator = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"url": url, "validator": self.validator}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

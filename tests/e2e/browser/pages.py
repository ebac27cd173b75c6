"""Helpers for driving the page: open it with the origin guard, pick files, drop files."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

RECORD_CSP_VIOLATIONS = """
    window.cspViolations = [];
    document.addEventListener("securitypolicyviolation",
        (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@dataclass
class OffOrigin:
    """Every request the page makes that does not go to the server's own origin (aborted, recorded),
    and every script error or Content-Security-Policy violation on the page (see `problems`)."""

    origin: str
    seen: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        page.add_init_script(RECORD_CSP_VIOLATIONS)
        page.on("pageerror", lambda error: self.script_errors.append(str(error)))
        page.route("**/*", self.handle)

    def problems(self, page) -> list[str]:
        violations = page.evaluate("window.cspViolations || []") if not page.is_closed() else []
        return self.seen + self.script_errors + violations

    def handle(self, route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or f"{parts.scheme}://{parts.netloc}" == self.origin:
            route.continue_()
        else:
            self.seen.append(url)
            route.abort()


def open_page(page, base: str) -> OffOrigin:
    guard = OffOrigin(base)
    guard.watch(page)
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready=true]")
    return guard


def drop_file(page, selector: str, path: Path, mime: str = "image/jpeg") -> None:
    """What a drag from the desktop delivers: a drop event whose DataTransfer holds the file."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([data, name, mime]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [data, path.name, mime],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})

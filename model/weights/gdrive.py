"""Google Drive's large-file confirmation, handled without a Drive client.

`https://drive.google.com/uc?export=download&id=ID` sends a small file directly. For a file too large to
virus-scan (every checkpoint here) it answers with an HTML warning page instead, and the file comes from a
second request that the page spells out. Drive has used three forms of that page; each is handled:

1. a `<form id="download-form" action=".../download">` with hidden inputs (`id`, `export`, `confirm`,
   `uuid`): the file is `action?<inputs>` (the current form);
2. a "Download anyway" link whose URL carries `confirm=TOKEN`: follow it;
3. no token in the page but a `download_warning*` cookie: repeat the request with `confirm=<cookie value>`
   (the cookie goes back with it).

Anything else (a quota-exceeded, sign-in or "file not found" page) has no way through; the caller says so.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit


class _ConfirmationPage(HTMLParser):
    """Collects the download form (action and inputs), links that carry a confirm token, and the title."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.form_action: str | None = None
        self.form_inputs: list[tuple[str, str]] = []
        self.confirm_links: list[str] = []
        self.title = ""
        self._in_form = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form" and self.form_action is None and _is_download_form(attr):
            self.form_action, self._in_form = attr.get("action", ""), True
        elif tag == "input" and self._in_form and attr.get("name"):
            self.form_inputs.append((attr["name"], attr.get("value", "")))
        elif tag == "a" and "confirm=" in attr.get("href", ""):
            self.confirm_links.append(attr["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _is_download_form(attr: dict[str, str]) -> bool:
    return attr.get("id") == "download-form" or "download" in attr.get("action", "")


def confirmation_url(page: str, page_url: str, cookies: CookieJar | None = None) -> str | None:
    """The URL that fetches the file behind a Drive warning page, or None when the page offers none."""
    parsed = _ConfirmationPage()
    parsed.feed(page)
    if parsed.form_action is not None and any(name == "confirm" for name, _ in parsed.form_inputs):
        action = urljoin(page_url, parsed.form_action)
        return f"{action}{'&' if '?' in action else '?'}{urlencode(parsed.form_inputs)}"
    if parsed.confirm_links:
        return urljoin(page_url, html.unescape(parsed.confirm_links[0]))
    token = _cookie_token(cookies)
    return _with_query(page_url, confirm=token) if token else None


def page_title(page: str) -> str:
    parsed = _ConfirmationPage()
    parsed.feed(page)
    return " ".join(parsed.title.split())[:120]


def _cookie_token(cookies: CookieJar | None) -> str | None:
    for cookie in cookies or ():
        if cookie.name.startswith("download_warning") and cookie.value:
            return cookie.value
    return None


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params] + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))

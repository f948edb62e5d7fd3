"""The dashboard over plain HTTP (no browser): every asset is served by the scheduler itself, the
script is native ES modules that all load, no file names another host, and the single page answers
every /ui/ path while nothing outside static/ is served.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

from fastapi.testclient import TestClient

from scheduler_fixtures import make_settings
from services.scheduler.app import create_app
from services.scheduler.dashboard import STATIC_DIR

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an XML namespace name, never fetched


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append((tag, value))


def test_every_asset_is_served_locally(tmp_path):
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'scheduler.db'}"))
    with TestClient(app) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in index.headers["content-security-policy"]
        parser = _Refs()
        parser.feed(index.text)
        assets = [(tag, ref) for tag, ref in parser.refs if not ref.startswith("#")]
        assert {ref for _, ref in assets} >= {"/static/app.js", "/static/style.css", "/static/favicon.svg"}
        for tag, ref in assets:
            parts = urlsplit(ref)
            assert not parts.scheme and not parts.netloc, f"<{tag}> refers to another host: {ref}"
            resp = client.get(ref)
            assert resp.status_code == 200, (ref, resp.status_code)
            assert len(resp.content) > 0
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")

        # the script is native ES modules, no build step: the page loads the entry module, the policy lets
        # same-origin modules run, and every module it imports (transitively) is served as JavaScript
        assert '<script type="module" src="/static/app.js"></script>' in index.text
        assert "script-src 'self'" in index.headers["content-security-policy"]
        served, todo = set(), ["/static/app.js"]
        while todo:
            ref = todo.pop()
            if ref in served:
                continue
            served.add(ref)
            resp = client.get(ref)
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/javascript"), (ref, resp.status_code)
            for spec in re.findall(r'^(?:import|export)\s[^;]*?\sfrom\s+"([^"]+)";', resp.text, re.M):
                assert spec.startswith(("./", "../")) and spec.endswith(".js"), f"{ref} imports {spec!r}: only relative .js modules"
                todo.append(urljoin(ref, spec))
        modules = {f"/static/{path.relative_to(STATIC_DIR).as_posix()}" for path in STATIC_DIR.rglob("*.js")}
        assert served == modules, f"modules nothing imports: {sorted(modules - served)}"
        # the bound: no module of the dashboard is a 2,000-line file again
        sizes = {path.relative_to(STATIC_DIR).as_posix(): len(path.read_text(encoding="utf-8").splitlines()) for path in STATIC_DIR.rglob("*.js")}
        assert max(sizes.values()) < 500, sizes

        # no file of the dashboard names another host (scripts, styles, fonts, images)
        for path in STATIC_DIR.rglob("*"):
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                urls = [u for u in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"')]*", text) if u != SVG_NAMESPACE]
                assert not urls, f"{path.name} names other hosts: {urls}"
                assert "@import" not in text and "@font-face" not in text, path.name

        # the single page answers every /ui/ path; nothing outside static/ is served
        for path in ("/ui/", "/ui/experiments/1", "/ui/compare"):
            resp = client.get(path)
            assert resp.status_code == 200 and '<script type="module" src="/static/app.js"' in resp.text, path
        assert client.get("/static/missing.js").status_code == 404
        assert client.get("/static/../router.py").status_code == 404
        assert client.get("/static/%2e%2e/router.py").status_code == 404
        # the API is still the API
        assert client.get("/api/v1/experiments").json()["total"] == 0

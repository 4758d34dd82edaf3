"""The dashboard's ASGI application (Starlette, running on trio through anyio).

Owns the routes and the rules every request goes through:

- no session (or an expired, altered or foreign cookie): pages redirect to
  /login, the JSON API and the stream answer 401;
- every page, the stream (re-checked while it runs) and the JSON API need a
  SubjectAccessReview allowing the user `get vpblunodes`; the rotate action
  needs `patch vpblunodes` on that node, and is then done with the user's own
  token; a refusal is a 403 page that says which permission is missing;
- every POST carries the session's CSRF token (login: a double-submit cookie)
  and, when the browser sends one, a same-origin Origin header;
- login attempts are rate limited per client address (429 with Retry-After);
- responses are no-store, framing is denied, and the Content-Security-Policy
  allows this origin only: the assets ship in the package (no CDN).

The JSON API (/api/mesh) also takes `Authorization: Bearer <token>` (reviewed
like a login, each time), for `vpblu meshtop --dashboard` and scripts.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import attrs
import jinja2
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vpblu.core.sources import ROTATE_NOW_ANNOTATION
from vpblu.dashboard.access import (
    ROTATE,
    VIEW,
    Access,
    AccessUnavailable,
    UserApi,
    UserCallFailed,
)
from vpblu.dashboard.feed import FeedUnavailable, MeshFeed
from vpblu.dashboard.sessions import (
    LoginLimiter,
    Session,
    SessionBox,
    SessionTooLarge,
    csrf_ok,
    token_expiry,
)

log = logging.getLogger(__name__)

COOKIE = "vpblu_session"
LOGIN_COOKIE = "vpblu_login"
STREAM_POLL = 0.25
KEEPALIVE = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
MAX_TOKEN = 8192
MAX_FORM = 16384

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes forms send Origin: null
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; "
                                "style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'"),
}


@attrs.frozen(slots=True)
class Dashboard:
    """What the app needs; `secure`: served over TLS (cookies get Secure)."""

    access: Access
    feed: MeshFeed
    box: SessionBox
    user_api: UserApi | None
    limiter: LoginLimiter = attrs.field(factory=LoginLimiter)
    secure: bool = True
    wall_clock: Callable[[], float] = time.time


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vpblu.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.filters["age"] = _age
    env.filters["rate"] = _rate
    return env


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size * (2 if unit != "d" else 1):
            return f"{s // size}{unit}"
    return f"{s}s"


def _rate(value: float | None) -> str:
    v = float(value or 0.0)
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if v < 1000:
            return f"{v:.0f} {unit}" if unit == "B/s" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} TB/s"


def build_app(d: Dashboard) -> Starlette:
    templates = _templates()

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = templates.get_template(name).render(**context)
        return HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)

    def set_session(response: Response, value: str, max_age: int) -> None:
        response.set_cookie(COOKIE, value, max_age=max_age, httponly=True,
                            secure=d.secure, samesite="strict", path="/")

    def session_of(request: Request) -> Session | None:
        return d.box.open(request.cookies.get(COOKIE), d.wall_clock())

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # not sent (older browsers, scripts): the CSRF token decides
            return True
        host = request.headers.get("host", "")
        return urlsplit(origin).netloc == host

    def to_login(request: Request) -> Response:
        target = request.url.path
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303,
                                headers=_SECURITY_HEADERS)

    def refused(session: Session, what: str, reason: str, status: int = 403) -> HTMLResponse:
        return page("refused.html", status, user=session.identity.username, what=what,
                    reason=reason, csrf=session.csrf)

    def unavailable(error: Exception) -> HTMLResponse:
        return page("unavailable.html", 503, error=str(error))

    async def viewer(request: Request) -> Session | Response:
        """The request's session if it may view, else the response to send."""
        session = session_of(request)
        if session is None:
            return to_login(request)
        try:
            decision = await d.access.authorize(session.identity, VIEW)
        except AccessUnavailable as exc:
            return unavailable(exc)
        if not decision.allowed:
            return refused(session, "view the mesh (get vpblunodes.vpblu.io)", decision.reason)
        return session

    async def with_view(request: Request, template: str, **extra: Any) -> Response:
        session = await viewer(request)
        if isinstance(session, Response):
            return session
        try:
            view = await d.feed.current()
        except FeedUnavailable as exc:
            return unavailable(exc)
        return page(template, user=session.identity.username, csrf=session.csrf, view=view,
                    view_json=view, **extra)

    async def mesh_page(request: Request) -> Response:
        return await with_view(request, "mesh.html", page_name="mesh", node=None)

    async def policies_page(request: Request) -> Response:
        return await with_view(request, "policies.html", page_name="policies", node=None)

    async def events_page(request: Request) -> Response:
        return await with_view(request, "events.html", page_name="events", node=None)

    async def node_page(request: Request) -> Response:
        name = str(request.path_params["name"])
        message = request.query_params.get("rotated")
        return await with_view(request, "node.html", page_name="node", node=name,
                               message=f"Rotation requested for {name}." if message else "")

    async def login_form(request: Request, status: int = 200, error: str = "") -> Response:
        nonce = secrets.token_urlsafe(24)
        nxt = request.query_params.get("next", "/")
        response = page("login.html", status, csrf=nonce, error=error,
                        next=nxt if nxt.startswith("/") and not nxt.startswith("//") else "/")
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=600, httponly=True, secure=d.secure,
                            samesite="strict", path="/login")
        return response

    async def login_get(request: Request) -> Response:
        return await login_form(request)

    async def login_post(request: Request) -> Response:
        client = request.client.host if request.client else "?"
        now = d.wall_clock()
        if not d.limiter.allow(client, now):
            wait = max(1, int(d.limiter.retry_after(client) + 0.999))
            response = page("login.html", 429, csrf="", next="/",
                            error=f"Too many sign-in attempts: try again in {wait} s.")
            response.headers["Retry-After"] = str(wait)
            return response
        form = await _form(request)
        cookie_nonce = request.cookies.get(LOGIN_COOKIE, "")
        presented = str(form.get("csrf") or "")
        if not (same_origin(request) and cookie_nonce and presented
                and secrets.compare_digest(cookie_nonce, presented)):
            log.info("dashboard: a sign-in form from %s without its CSRF pair "
                     "(origin %r, host %r, cookie %s, field %s)", client,
                     request.headers.get("origin"), request.headers.get("host"),
                     bool(cookie_nonce), bool(presented))
            return await login_form(request, 403, "The sign-in form expired: try again.")
        token = str(form.get("token") or "").strip()
        if not token or len(token) > MAX_TOKEN:
            return await login_form(request, 401, "Paste a bearer token.")
        try:
            identity = await d.access.authenticate(token)
        except AccessUnavailable as exc:
            return unavailable(exc)
        if identity is None:
            log.info("dashboard: a sign-in from %s with a token the API server refused", client)
            return await login_form(request, 401, "The API server did not accept this token.")
        session = d.box.new(identity, token, now, not_after=token_expiry(token))
        if session.expires <= now:
            return await login_form(request, 401, "This token has expired.")
        try:
            decision = await d.access.authorize(identity, VIEW)
        except AccessUnavailable as exc:
            return unavailable(exc)
        if not decision.allowed:
            log.info("dashboard: %s signed in without the right to view", identity.username)
            return refused(session, "view the mesh (get vpblunodes.vpblu.io)", decision.reason)
        try:
            sealed = d.box.seal(session)
        except SessionTooLarge as exc:
            return await login_form(request, 400, str(exc))
        log.info("dashboard: %s signed in from %s", identity.username, client)
        nxt = str(form.get("next") or "/")
        done = RedirectResponse(nxt if nxt.startswith("/") and not nxt.startswith("//")
                                else "/", status_code=303, headers=_SECURITY_HEADERS)
        set_session(done, sealed, max(1, int(session.expires - now)))
        done.delete_cookie(LOGIN_COOKIE, path="/login")
        return done

    async def logout(request: Request) -> Response:
        session = session_of(request)
        if session is not None:
            form = await _form(request)
            if not (same_origin(request) and csrf_ok(session, str(form.get("csrf") or ""))):
                return refused(session, "sign out", "the form's CSRF token is missing or wrong")
        out = RedirectResponse("/login", status_code=303, headers=_SECURITY_HEADERS)
        out.delete_cookie(COOKIE, path="/", secure=d.secure, httponly=True,
                               samesite="strict")
        return out

    async def rotate(request: Request) -> Response:
        name = str(request.path_params["name"])
        session = session_of(request)
        if session is None:
            return to_login(request)
        form = await _form(request)
        if not (same_origin(request) and csrf_ok(session, str(form.get("csrf") or ""))):
            return refused(session, f"rotate {name}'s key",
                           "the form's CSRF token is missing or wrong")
        try:
            decision = await d.access.authorize(session.identity, ROTATE, name)
        except AccessUnavailable as exc:
            return unavailable(exc)
        if not decision.allowed:
            return refused(session, f"rotate {name}'s key (patch vpblunodes.vpblu.io)",
                           decision.reason)
        if d.user_api is None:
            return unavailable(RuntimeError("actions are not configured"))
        value = f"dashboard-{int(d.wall_clock())}-{secrets.token_hex(3)}"
        try:
            await d.user_api.annotate_vpblu_node(session.token, name,
                                                 {ROTATE_NOW_ANNOTATION: value})
        except UserCallFailed as exc:
            return refused(session, f"rotate {name}'s key", exc.message, status=exc.status
                           if exc.status in (403, 404, 409, 422) else 502)
        log.info("dashboard: %s asked to rotate %s now (%s)", session.identity.username, name,
                 value)
        return RedirectResponse(f"/nodes/{quote(name)}?rotated=1", status_code=303,
                                headers=_SECURITY_HEADERS)

    async def api_mesh(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
            try:
                identity = await d.access.authenticate(token) if token else None
            except AccessUnavailable as exc:
                return JSONResponse({"error": str(exc)}, 503, headers=_SECURITY_HEADERS)
        else:
            session = session_of(request)
            identity = session.identity if session is not None else None
        if identity is None:
            return JSONResponse({"error": "sign in, or send a bearer token the API server "
                                          "accepts"}, 401, headers=_SECURITY_HEADERS)
        try:
            decision = await d.access.authorize(identity, VIEW)
            if not decision.allowed:
                return JSONResponse({"error": f"{identity.username} may not get vpblunodes",
                                     "reason": decision.reason}, 403, headers=_SECURITY_HEADERS)
            return JSONResponse(await d.feed.current(), headers=_SECURITY_HEADERS)
        except (AccessUnavailable, FeedUnavailable) as exc:
            return JSONResponse({"error": str(exc)}, 503, headers=_SECURITY_HEADERS)

    async def stream(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return JSONResponse({"error": "sign in"}, 401, headers=_SECURITY_HEADERS)
        try:
            if not (await d.access.authorize(session.identity, VIEW)).allowed:
                return JSONResponse({"error": "may not view"}, 403, headers=_SECURITY_HEADERS)
        except AccessUnavailable as exc:
            return JSONResponse({"error": str(exc)}, 503, headers=_SECURITY_HEADERS)
        return StreamingResponse(_events(d, session), media_type="text/event-stream",
                                 headers={**_SECURITY_HEADERS, "X-Accel-Buffering": "no"})

    static = StaticFiles(directory=str(resources.files("vpblu.dashboard") / "static"))
    routes = [
        Route("/", mesh_page),
        Route("/policies", policies_page),
        Route("/events", events_page),
        Route("/nodes/{name:str}", node_page),
        Route("/nodes/{name:str}/rotate", rotate, methods=["POST"]),
        Route("/login", login_get, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/mesh", api_mesh),
        Route("/api/stream", stream),
        Mount("/static", static, name="static"),
    ]
    return Starlette(routes=routes)


async def _form(request: Request) -> dict[str, str]:
    """An url-encoded form of at most MAX_FORM bytes (the only kind the pages
    send); anything else is an empty form, which every check then refuses."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
            "application/x-www-form-urlencoded"):
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return {}
    try:
        return dict(parse_qsl(body.decode(), max_num_fields=16))
    except (UnicodeDecodeError, ValueError):
        return {}


async def _events(d: Dashboard, session: Session) -> AsyncIterator[str]:
    """The stream: the document whenever it changed, a comment every
    KEEPALIVE, and an end when the session expires or the user may no longer
    view. It looks every STREAM_POLL (a cache lookup while the feed's document
    is fresh), so a change is sent within the feed's REFRESH plus STREAM_POLL
    plus one read of the API server."""
    sent = ""
    seen: object = None
    quiet_since = trio.current_time()
    yield "retry: 2000\n\n"
    while d.wall_clock() < session.expires:
        try:
            if not (await d.access.authorize(session.identity, VIEW)).allowed:
                yield "event: refused\ndata: {}\n\n"
                return
            view = await d.feed.current()
        except (AccessUnavailable, FeedUnavailable) as exc:
            seen = None
            yield f"event: unavailable\ndata: {json.dumps(str(exc))}\n\n"
        else:
            text = sent if view is seen else json.dumps(view, separators=(",", ":"),
                                                        sort_keys=True)
            seen = view
            if text != sent:
                sent = text
                quiet_since = trio.current_time()
                yield f"event: mesh\ndata: {text}\n\n"
            elif trio.current_time() - quiet_since >= KEEPALIVE:
                quiet_since = trio.current_time()
                yield ": keepalive\n\n"
        await trio.sleep(STREAM_POLL)
    yield "event: expired\ndata: {}\n\n"


"""An httpx transport that sends requests through aiohttp's connection pool, and the lean
request layer (``Http``) the model client drives a transport with.

The client keeps httpx's API (requests, responses, errors, the mock transport tests use), but
httpx's own pool (httpcore over anyio) spends most of a coordinator's CPU per model call: for
every request it polls each idle keep-alive connection with a system call or two, so the cost
grows with the number of requests in flight. aiohttp's pool hands out an idle connection
without touching the others. Errors become the httpx errors the client's retry rules and
messages are written for: a refused connection is a ``ConnectError``, a server that drops the
connection mid-reply a ``RemoteProtocolError`` or ``ReadError`` (both retried), a socket
timeout a ``ConnectTimeout`` or ``ReadTimeout`` (not retried).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx

KEEPALIVE_SECONDS = 30.0  # an idle connection to a model server is kept this long
# What httpx's client sends with every request, less the compressed encodings it offers (a
# reply deflated on the server is inflated here: CPU on both ends for bytes on the loopback).
DEFAULT_HEADERS = {"Accept": "*/*", "Connection": "keep-alive", "User-Agent": "suwen"}
JSON_BODY = {"Content-Type": "application/json"}


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # before its base ServerTimeoutError
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except aiohttp.ServerTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ServerDisconnectedError as exc:
        message = "server disconnected without sending a complete response"
        raise httpx.RemoteProtocolError(message, request=request) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
    except aiohttp.ClientError as exc:
        raise httpx.TransportError(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp reads it; closing it before its end drops the connection
    (it cannot be reused with unread bytes on it), after its end returns it to the pool."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Plain-HTTP(S) requests without proxies, through one aiohttp session per transport.
    Create and use it on one event loop (the client makes one per loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
            # httpx already decoded nothing and set every header it sends; aiohttp must not
            # add its own or decompress behind httpx's back. No proxy from the environment.
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        session = self._open_session()
        with _as_httpx_errors(request):
            body = await request.aread()
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def abandon(self) -> None:
        """Let go of a session whose event loop has ended without closing it (one client used
        from several ``asyncio.run`` calls): its connections went with the loop, and aiohttp
        would otherwise report it as leaked when it is garbage collected."""
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        connector = session.connector
        session.detach()  # the session now counts as closed
        if isinstance(connector, aiohttp.TCPConnector):
            # On an ended loop closing the connector only marks it closed and never suspends,
            # so its coroutine runs to the end right here, on no loop.
            closing = connector.close()
            try:
                closing.send(None)
            except StopIteration:
                pass
            else:
                closing.close()


class Http:
    """Requests straight to one httpx transport, with the same headers and timeouts on each.

    ``httpx.AsyncClient`` wraps every request in layers a model client does not use (URL
    merging, a cookie jar, auth and redirect handling, event hooks) that cost a coordinator
    more CPU than the transport's own work; this keeps httpx's requests, responses and errors
    (and so its mock transport) without them. Redirects are not followed: a vLLM server sends
    none, and a prompt must not be re-sent to wherever one points."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, headers: dict[str, str], timeout: httpx.Timeout
    ) -> None:
        self.transport = transport
        self._headers = httpx.Headers({**DEFAULT_HEADERS, **headers})
        self._json_headers = httpx.Headers({**DEFAULT_HEADERS, **headers, **JSON_BODY})
        self._timeout = timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}  # a few endpoints per server, parsed once

    async def get(self, url: str) -> httpx.Response:
        return await self.request("GET", url)

    async def post(self, url: str, body: bytes) -> httpx.Response:
        """POST a JSON body (bytes already encoded)."""
        return await self.request("POST", url, body)

    async def request(
        self, method: str, url: str, body: bytes | None = None, *, stream: bool = False
    ) -> httpx.Response:
        """The response, read to its end and closed; with ``stream``, open for the caller to
        read and close."""
        request = httpx.Request(
            method,
            self._url(url),
            headers=self._headers if body is None else self._json_headers,
            content=body,
            extensions={"timeout": self._timeout},
        )
        response = await self.transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def aclose(self) -> None:
        await self.transport.aclose()

"""The model client's request layer: ``Http`` sends a request and returns a ``Reply``.

Two kinds, the same behaviour: ``AiohttpHttp`` (what the client uses) speaks to the servers
through aiohttp's connection pool directly; ``TransportHttp`` drives an httpx transport (the
mock and recording transports tests give the client).

Neither uses ``httpx.AsyncClient``: it wraps every request in layers a model client does not
use (URL merging, a cookie jar, auth and redirect handling, event hooks), and httpx's own pool
(httpcore over anyio) polls each idle keep-alive connection with a system call or two per
request. The aiohttp path builds no httpx request or response either: those objects cost a
coordinator driving hundreds of model calls a second more CPU than the socket work. Errors
stay httpx's, which the client's retry rules and messages are written for: a refused
connection is a ``ConnectError``, a server that drops the connection mid-reply a
``RemoteProtocolError`` or ``ReadError`` (both retried), a socket timeout a ``ConnectTimeout``
or ``ReadTimeout`` (not retried). Redirects are not followed: a vLLM server sends none, and a
prompt must not be re-sent to wherever one points.
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx

KEEPALIVE_SECONDS = 30.0  # an idle connection to a model server is kept this long
# What httpx's client sends with every request, less the compressed encodings it offers (a
# reply deflated on the server is inflated here: CPU on both ends for bytes on the loopback).
DEFAULT_HEADERS = {"Accept": "*/*", "Connection": "keep-alive", "User-Agent": "suwen"}
JSON_BODY = {"Content-Type": "application/json"}


class Reply(abc.ABC):
    """A server's reply: its status, and its body read whole (``content``) or line by line."""

    def __init__(self, status_code: int, reason_phrase: str) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self._content: bytes | None = None

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError("the reply's body has not been read")
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    @abc.abstractmethod
    async def aread(self) -> bytes:
        """The whole body (read once, then kept)."""

    @abc.abstractmethod
    def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines as they arrive, without their line ends."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Done with the reply: its connection goes back to the pool if it was read to its
        end, and is dropped otherwise (it cannot be reused with unread bytes on it)."""


class Http(abc.ABC):
    """Requests to the model servers, with the same headers and timeouts on each."""

    async def get(self, url: str) -> Reply:
        return await self.request("GET", url)

    async def post(self, url: str, body: bytes) -> Reply:
        """POST a JSON body (bytes already encoded)."""
        return await self.request("POST", url, body)

    async def request(
        self, method: str, url: str, body: bytes | None = None, *, stream: bool = False
    ) -> Reply:
        """The reply, read to its end and closed; with ``stream``, open for the caller to
        read and close."""
        reply = await self._send(method, url, body)
        if not stream:
            try:
                await reply.aread()
            finally:
                await reply.aclose()
        return reply

    @abc.abstractmethod
    async def _send(self, method: str, url: str, body: bytes | None) -> Reply: ...

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connections (on the event loop they were opened on)."""

    @abc.abstractmethod
    def abandon(self) -> None:
        """Let go of connections whose event loop has ended without closing them."""


# -- aiohttp, straight -------------------------------------------------------------------------


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # before its base ServerTimeoutError
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except aiohttp.ServerTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except aiohttp.ServerDisconnectedError as exc:
        message = "server disconnected without sending a complete response"
        raise httpx.RemoteProtocolError(message) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:
        raise httpx.TransportError(str(exc) or type(exc).__name__) from exc


class _AiohttpReply(Reply):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response.status, response.reason or "")
        self._response = response

    async def aread(self) -> bytes:
        if self._content is None:
            with _as_httpx_errors():
                self._content = await self._response.read()
        return self._content

    async def aiter_lines(self) -> AsyncIterator[str]:
        # Split here rather than with aiohttp's readline, which refuses a line longer than
        # its buffer; a line ends at LF (a CR before it is dropped), so no UTF-8 sequence is
        # ever cut in two.
        pending = b""
        with _as_httpx_errors():
            async for chunk in self._response.content.iter_any():
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line.removesuffix(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.removesuffix(b"\r").decode("utf-8", "replace")

    async def aclose(self) -> None:
        self._response.release()


class AiohttpHttp(Http):
    """Plain-HTTP(S) requests without proxies, through one aiohttp session. Create and use it
    on one event loop (the client makes one per loop)."""

    def __init__(self, headers: dict[str, str], *, connect: float, read: float) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._headers = {**DEFAULT_HEADERS, **headers}
        self._json_headers = {**self._headers, **JSON_BODY}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
            # Only the headers set here are sent, and nothing is decompressed behind the
            # client's back. No proxy from the environment.
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                timeout=self._timeout,
            )
        return self._session

    async def _send(self, method: str, url: str, body: bytes | None) -> Reply:
        session = self._open_session()
        with _as_httpx_errors():
            response = await session.request(
                method,
                url,
                headers=self._headers if body is None else self._json_headers,
                data=body,
                allow_redirects=False,
            )
        return _AiohttpReply(response)

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


# -- an httpx transport ------------------------------------------------------------------------


class _HttpxReply(Reply):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code, response.reason_phrase)
        self._response = response

    async def aread(self) -> bytes:
        if self._content is None:
            self._content = await self._response.aread()
        return self._content

    def aiter_lines(self) -> AsyncIterator[str]:
        return self._response.aiter_lines()

    async def aclose(self) -> None:
        await self._response.aclose()


class TransportHttp(Http):
    """Requests through an httpx transport (tests give the client a mock or recording one)."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, headers: dict[str, str], timeout: httpx.Timeout
    ) -> None:
        self.transport = transport
        self._headers = httpx.Headers({**DEFAULT_HEADERS, **headers})
        self._json_headers = httpx.Headers({**DEFAULT_HEADERS, **headers, **JSON_BODY})
        self._timeout = timeout.as_dict()

    async def _send(self, method: str, url: str, body: bytes | None) -> Reply:
        request = httpx.Request(
            method,
            url,
            headers=self._headers if body is None else self._json_headers,
            content=body,
            extensions={"timeout": self._timeout},
        )
        response = await self.transport.handle_async_request(request)
        response.request = request
        return _HttpxReply(response)

    async def aclose(self) -> None:
        await self.transport.aclose()

    def abandon(self) -> None:
        """Nothing: the transport's connections are its own."""

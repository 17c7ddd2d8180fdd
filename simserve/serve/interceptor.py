"""Around every RPC: auth (bearer token), request ids, metrics and one JSON log line."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from typing import Any, Callable

import grpc

from simserve.serve.metrics import Metrics

log = logging.getLogger("simserve.server")
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes work without a token


class Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, token: str) -> None:
        self.metrics, self.token = metrics, token
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (its handler, the wrapped one)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        # A method's handler is the same object on every call: wrap it once, not per RPC
        # (building closures and a handler per call was measurable on the event loop).
        hit = self._wrapped.get(details.method)
        if hit is None or hit[0] is not handler:
            hit = self._wrapped[details.method] = (handler, self._wrap(details.method, handler))
        return hit[1]

    def _wrap(self, method: str, handler):
        def wrap(behaviour, streaming_request: bool):
            async def inner(request, context):
                md = dict(context.invocation_metadata() or ())
                call = _Call(self.metrics, method, md.get("x-request-id") or os.urandom(8).hex())
                context = call.begin(context)
                try:
                    if self.token and not method.startswith(OPEN_METHODS) and not _token_ok(md.get("authorization"), self.token):
                        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
                    if streaming_request:
                        request = _parsed_or_abort(request, context, method)
                    elif isinstance(request, _Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
                    return await behaviour(request, context)
                except BaseException as e:
                    call.failed(e)
                    raise
                finally:
                    call.end()

            return inner

        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), parse, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True), parse, handler.response_serializer)
        return handler  # server-streaming health watches and reflection's stream-stream: no wrapping


def _token_ok(given: str | bytes | None, token: str) -> bool:
    """Constant-time: how long a wrong token takes to refuse says nothing about the right one."""
    given_b = given.encode() if isinstance(given, str) else (given or b"")
    return hmac.compare_digest(given_b, f"Bearer {token}".encode())


class _Call:
    """One RPC's bookkeeping: its request id in the trailers, its status in the metrics and the log."""

    def __init__(self, metrics: Metrics, method: str, request_id: str) -> None:
        self.metrics, self.method, self.request_id = metrics, method, request_id
        self.code = ""

    def begin(self, context) -> "_Recorded":
        self.t0 = time.perf_counter()
        self.metrics.in_flight.labels(self.method).inc()
        context.set_trailing_metadata((("x-request-id", self.request_id),))
        self.context = _Recorded(context)
        return self.context

    def failed(self, e: BaseException) -> None:
        if self.context.status is None:
            self.code = "CANCELLED" if isinstance(e, asyncio.CancelledError) else "UNKNOWN"
        if self.code == "UNKNOWN":
            log.error("unhandled error", exc_info=e, extra={"request_id": self.request_id, "method": self.method})

    def end(self) -> None:
        context = self.context
        code = context.status.name if context.status is not None else self.code or "OK"
        ms = (time.perf_counter() - self.t0) * 1e3
        self.metrics.in_flight.labels(self.method).dec()
        self.metrics.requests.labels(self.method, code).inc()
        self.metrics.latency.labels(self.method).observe(ms / 1e3)
        if not self.method.startswith(OPEN_METHODS):
            extra = {"request_id": self.request_id, "method": self.method, "code": code, "ms": round(ms, 2), "peer": context.peer()}
            if context.details:
                extra["error"] = context.details  # what the client was told: the log alone explains a failure
            log.info("rpc", extra=extra)


class _Recorded:
    """A handler's context that notes the status the handler aborts with, for the log and metrics."""

    def __init__(self, context) -> None:
        self._context, self.status, self.details = context, None, ""

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self.status, self.details = code, details
        return self._context.abort(code, details, trailing_metadata)  # a coroutine

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self.details = details
        self._context.set_details(details)

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class _Malformed:
    """Request bytes that are not the method's message. gRPC would answer INTERNAL
    ("Exception deserializing request!"); it is the client's error, so the handler
    answers INVALID_ARGUMENT instead."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self, method: str) -> str:
        return f"the request is not a valid {method.rsplit('/', 1)[-1]} message ({type(self.error).__name__}: {self.error})"


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or anything a parser raises on garbage
            return _Malformed(e)

    return parse


async def _parsed_or_abort(requests, context, method: str):
    async for r in requests:
        if isinstance(r, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, r.message(method))
        yield r

"""The HTTP front door: an OpenAI-compatible API in a Ray Serve ingress deployment.

It authenticates the caller, resolves `model` to the base model or one of the tenant's
adapters, applies the chat template, and streams the request from an engine replica
through a Ray handle, passing the adapter id as the multiplexed model id (the placement
router, router/placement.py, uses it). Replicas answer with plain dicts: either an
`{"error": ...}` or the fields of a replica.RequestOutput.
"""


import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from transformers import AutoTokenizer

from router.auth import KeyRing, Tenant
from router.errors import APIError, model_not_found
from router.protocol import ChatCompletionRequest, CompletionRequest, ResponseBuilder
from router.registry import AdapterRegistry

app = FastAPI(title="lorafleet")


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=param).response()


class AdapterRegistration(BaseModel):
    id: str
    uri: str


def _entry_json(entry: Any) -> dict[str, Any]:
    return {"id": entry.id, "object": "adapter", "uri": entry.uri, "revision": entry.revision}


def _sse_data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        engine: DeploymentHandle,
        *,
        model_name: str,
        model_dir: str,
        adapters: Mapping[str, str],
        tenants: Sequence[dict[str, Any]],
        key_hashes: Mapping[str, str],
        auth_required: bool = True,
        default_max_tokens: int = 16,
        first_output_timeout_s: float = 120.0,
        api_url: str = "http://127.0.0.1:8000",
    ):
        self._engine = engine
        self._model_name = model_name
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._registry = AdapterRegistry(adapters)
        self._keys = KeyRing(
            [Tenant(t["name"], tuple(t.get("adapters", ())), bool(t.get("admin", False))) for t in tenants],
            key_hashes,
            required=auth_required,
        )
        self._default_max_tokens = default_max_tokens
        self._first_output_timeout_s = first_output_timeout_s
        threading.Thread(target=self._announce, args=(api_url,), daemon=True, name="lorafleet-announce").start()

    def _announce(self, api_url: str) -> None:
        """Print where the API is and a ready-to-paste curl line once an engine replica answers."""
        while True:
            try:
                self._engine.stats.remote().result(timeout_s=600)
                break
            except Exception:  # not up yet: the replicas are still starting
                time.sleep(1.0)
        adapters = self._registry.ids()
        model = adapters[0] if adapters else self._model_name
        auth = " -H 'Authorization: Bearer $LORAFLEET_API_KEY'" if self._keys.required else ""
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Who are you?"}],
                           "max_tokens": 48})
        print(
            f"\nlorafleet is up: OpenAI-compatible API at {api_url}/v1\n"
            f"  base model: {self._model_name}; adapters: {', '.join(adapters) or '(none)'}\n"
            f"  try:\ncurl -s {api_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n",
            flush=True,
        )

    # -- callers and models -------------------------------------------------------------

    def _tenant(self, request: Request) -> Tenant:
        tenant = self._keys.tenant_for(request.headers.get("authorization"))
        if tenant is None:
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return tenant

    def _admin(self, request: Request) -> Tenant:
        tenant = self._tenant(request)
        if not tenant.admin:
            raise APIError(403, "This endpoint needs an admin key")
        return tenant

    def _adapter_for(self, tenant: Tenant, model: str) -> dict[str, Any] | None:
        """None for the base model; the adapter (name, uri, revision) otherwise; 404 if unknown."""
        if model == self._model_name:
            return None
        entry = self._registry.get(model)
        if entry is None or not tenant.may_use(model):
            raise model_not_found(model)
        return {"name": entry.id, "uri": entry.uri, "revision": entry.revision}

    # -- generation -----------------------------------------------------------------------

    async def _start(
        self, prompt: str | list[int], body: CompletionRequest | ChatCompletionRequest, adapter: dict | None
    ) -> tuple[DeploymentResponseGenerator, dict[str, Any]]:
        """Send the request to a replica; return the stream and its first output (errors raised)."""
        handle = self._engine.options(stream=True, multiplexed_model_id=adapter["name"] if adapter else "")
        stream = handle.generate.remote(
            prompt, body.sampling_params(self._default_max_tokens), adapter, uuid.uuid4().hex
        )
        try:
            first = await asyncio.wait_for(stream.__anext__(), self._first_output_timeout_s)
        except (TimeoutError, DeploymentUnavailableError, RayActorError) as exc:
            stream.cancel()
            raise APIError(503, f"No engine replica is ready ({type(exc).__name__}); retry later",
                           retry_after=5) from exc
        except BackPressureError as exc:
            raise APIError(429, "All replicas' queues are full; retry later", retry_after=1) from exc
        if "error" in first:
            raise APIError.from_dict(first["error"])
        return stream, first

    async def _respond(
        self, prompt: str | list[int], body: CompletionRequest | ChatCompletionRequest,
        adapter: dict | None, chat: bool,
    ) -> Any:
        stream, first = await self._start(prompt, body, adapter)
        builder = ResponseBuilder(body.model, chat)
        # Which engine replica served the request: for operators and the placement tests.
        headers = {"x-lorafleet-replica": first.get("replica", "")}
        if body.stream:
            return StreamingResponse(self._sse(stream, first, builder, body.include_usage),
                                     media_type="text/event-stream", headers=headers)
        outputs = [first]
        try:
            async for out in stream:
                outputs.append(out)
        finally:
            stream.cancel()
        last = outputs[-1]
        if "error" in last:
            raise APIError.from_dict(last["error"])
        text = "".join(o["text"] for o in outputs)
        body_json = builder.full(text, last["finish_reason"], last["prompt_tokens"], last["completion_tokens"])
        return JSONResponse(body_json, headers=headers)

    async def _sse(
        self, stream: DeploymentResponseGenerator, first: dict[str, Any], builder: ResponseBuilder,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        # Leaving this generator early (a client that disconnects) cancels the replica's
        # stream, which aborts the request in its engine.
        try:
            out, is_first = first, True
            while True:
                if "error" in out:
                    yield _sse_data(APIError.from_dict(out["error"]).body())
                    break
                if out["text"] or out["finished"] or is_first:
                    yield _sse_data(builder.chunk(out["text"], out["finish_reason"], first=is_first))
                is_first = False
                if out["finished"]:
                    if include_usage:
                        yield _sse_data(builder.usage_chunk(out["prompt_tokens"], out["completion_tokens"]))
                    break
                out = await stream.__anext__()
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()

    # -- routes ---------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        tenant = self._tenant(request)
        adapter = self._adapter_for(tenant, body.model)
        return await self._respond(body.prompt, body, adapter, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        tenant = self._tenant(request)
        adapter = self._adapter_for(tenant, body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        return await self._respond(list(prompt), body, adapter, chat=True)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        tenant = self._tenant(request)
        data = [{"id": self._model_name, "object": "model", "created": 0, "owned_by": "lorafleet"}]
        data += [
            {"id": i, "object": "model", "created": 0, "owned_by": tenant.name, "parent": self._model_name}
            for i in self._registry.ids()
            if tenant.may_use(i)
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self._engine.stats.remote(), 10.0)
        except Exception as exc:  # any failure to reach a replica means not ready
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> dict[str, Any]:
        self._admin(request)
        return {"object": "list", "data": [_entry_json(e) for e in self._registry.entries()]}

    @app.post("/v1/adapters", status_code=201)
    async def register_adapter(self, body: AdapterRegistration, request: Request) -> dict[str, Any]:
        self._admin(request)
        if body.id == self._model_name:
            raise APIError(400, f"id {body.id!r} is the base model's name", param="id")
        # A replica loads it once (through its storage cache) so a bad adapter fails here, not
        # in some tenant's request later.
        error = await self._engine.validate_adapter.remote(body.uri)
        if error is not None:
            raise APIError.from_dict({**error, "param": "uri"})
        try:
            entry = self._registry.register(body.id, body.uri)
        except ValueError as exc:
            raise APIError(400, str(exc), param="id") from exc
        return _entry_json(entry)

    @app.delete("/v1/adapters/{adapter_id:path}")
    async def remove_adapter(self, adapter_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        if self._registry.remove(adapter_id) is None:
            raise model_not_found(adapter_id)
        return {"id": adapter_id, "object": "adapter", "deleted": True}


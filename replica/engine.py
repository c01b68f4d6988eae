"""The Engine: a synchronous core (schedule, forward, sample, stream outputs) driven by a
background step loop, behind an asyncio front that streams each request's outputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from replica.adapter_pool import AdapterPool
from replica.config import EngineConfig, LoRARequest
from replica.detokenizer import IncrementalDetokenizer
from replica.kv_cache import BlockManager, KVCache
from replica.loader import load_model
from replica.metrics import EngineMetrics
from replica.runner import ModelRunner, SampledTokens
from replica.sampling import InvalidRequest, SamplingParams
from replica.scheduler import Scheduler
from replica.sequence import RequestOutput, Sequence, Status

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# GPU memory kept out of the KV cache for activations, logits and the attention gather.
_GPU_ACTIVATION_RESERVE = 4 << 30


class QueueFull(RuntimeError):
    """The engine's waiting queue is at max_waiting; the caller should retry elsewhere or later."""


class EngineCore:
    """Everything but the threads: tests drive it step by step."""

    def __init__(
        self, config: EngineConfig, *, store: Any = None, metrics: EngineMetrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.model = load_model(config.model, self.dtype, self.device, load_format=config.load_format)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.eos_token_ids = _eos_token_ids(config.model, self.tokenizer)
        args = self.model.args
        # Imported here, not with the module: storage creates its metrics on import, and the Ray
        # shell (replica/deployment.py) must create the multiprocess metrics folder before that.
        import storage

        spec = storage.BaseModelSpec.from_pretrained(config.model)
        if store is None:
            kwargs = (
                {}
                if config.adapter_cache_max_bytes is None
                else {"cache_max_bytes": config.adapter_cache_max_bytes}
            )
            store = storage.AdapterStore(
                spec,
                cache_dir=config.adapter_cache_dir,
                max_rank=config.max_lora_rank,
                s3=config.s3,
                **kwargs,
            )
        self.wakeup = threading.Event()  # set when something may have become runnable
        self.pool = AdapterPool(
            store,
            spec.module_shapes,
            spec.num_layers,
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_rank=config.max_lora_rank,
            dtype=self.dtype,
            device=self.device,
            metrics=self.metrics,
            on_loaded=self.wakeup.set,
            workers=config.adapter_load_workers,
        )
        max_len = min(args.max_model_len, config.max_model_len or args.max_model_len)
        num_blocks = self._num_kv_blocks(max_len)
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.kv_cache = KVCache(
            args.num_layers,
            num_blocks,
            config.block_size,
            args.num_kv_heads,
            args.head_dim,
            self.dtype,
            self.device,
        )
        self.scheduler = Scheduler(
            self.blocks,
            self.pool,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            self.pool,
            block_size=config.block_size,
            kernel_backend=config.kernel_backend,
            device=self.device,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            attention_backend=config.attention_backend,
            cuda_graphs=not config.enforce_eager,
        )
        self.requests: dict[str, Sequence] = {}
        self.last_num_scheduled = 0
        self._in_flight: SampledTokens | None = None  # the launched step whose tokens are not collected yet
        self._times: dict[str, tuple[float, float]] = {}  # request id -> (arrival, last token time)

    def _num_kv_blocks(self, max_len: int) -> int:
        cfg, args = self.config, self.model.args
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = KVCache.bytes_per_block(
            args.num_layers, cfg.block_size, args.num_kv_heads, args.head_dim, self.dtype
        )
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * cfg.kv_cache_memory_fraction) - (total - free) - _GPU_ACTIVATION_RESERVE
        else:
            budget = cfg.cpu_kv_cache_bytes
        useful = cfg.max_num_seqs * -(-max_len // cfg.block_size)  # more is never used
        num_blocks = min(budget // per_block - 1, useful)  # the cache adds one padding block
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache (budget {budget} bytes)")
        return num_blocks

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or Path(self.config.model).resolve().name

    def make_sequence(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: LoRARequest | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        """Validate and tokenize a request (raises InvalidRequest); does not queue it."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params", f"must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if adapter is not None and not isinstance(adapter, LoRARequest):
            raise InvalidRequest("adapter", f"must be a LoRARequest or None, got {type(adapter).__name__}")
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
            vocab = self.model.args.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")
        else:
            raise InvalidRequest("prompt", "must be a string or a list of token ids")
        if not ids:
            raise InvalidRequest("prompt", "is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"has {len(ids)} tokens; the model's limit is {self.max_model_len}"
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"limit of {self.max_model_len} tokens",
            )
        return Sequence(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, ids, params.stop),
            generator=self.runner.sampler.new_generator(params.seed),
            adapter=adapter,
            eos_token_ids=self.eos_token_ids,
        )

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequest("request_id", f"{seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self._times[seq.request_id] = (time.perf_counter(), 0.0)
        if seq.adapter is not None:
            self.pool.request(seq.adapter)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Free the request's blocks and slot now; its final output (None if unknown)."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        out = seq.take_output()
        self._finish(seq, "abort")
        return out

    def step(self) -> list[tuple[Sequence, RequestOutput | BaseException]]:
        """Launch the next step, then collect the tokens of the step launched before it (waiting for that
        one while the GPU goes on to the new one) and turn them into text and outputs: what each touched
        request gets streamed. So the GPU does not wait for the host's work between steps; the price is
        that a sequence which a stop token or string ends is computed one step too far (that token is
        dropped), and that what a step frees (blocks, slots) is free for the step after next."""
        results: list[tuple[Sequence, RequestOutput | BaseException]] = []
        sched = self.scheduler.schedule()
        self.last_num_scheduled = len(sched.seqs)
        for seq in sched.failed:
            self._finish(seq, "error")
            results.append((seq, seq.error or RuntimeError("adapter failed to load")))
        in_flight, self._in_flight = self._in_flight, None
        if not sched.empty:
            try:
                self._in_flight = self.runner.launch(sched)
            except Exception as exc:  # a failed forward fails the step's requests; the engine lives on
                for seq in sched.seqs:
                    self._finish(seq, "error")
                    results.append((seq, exc))
        sampled = self._collect(in_flight, results)
        for seq, first, seconds in sampled:
            (self.metrics.time_to_first_token if first else self.metrics.inter_token_latency)(seconds)
            if not seq.finished:  # else aborted, or its output went out when max_tokens ended it
                seq.detokenize()
                self._output(seq, results)
        self.metrics.queue(
            len(self.scheduler.waiting), len(self.scheduler.running), len(self.pool.resident())
        )
        return results

    def _collect(self, in_flight: SampledTokens | None, results: list) -> list[tuple[Sequence, bool, float]]:
        """Record the tokens of a launched step (waiting for it). A stop token or max_tokens ends a
        sequence here, which frees its blocks and slot for the next step scheduled.
        Returns (sequence, first token?, seconds since arrival or its last token) for the metrics."""
        if in_flight is None:
            return []
        try:
            tokens = in_flight.result()
        except Exception as exc:  # the step failed on the GPU: its requests fail, the engine lives on
            for seq in in_flight.seqs:
                if not seq.finished:
                    self._finish(seq, "error")
                    results.append((seq, exc))
            return []
        now = time.perf_counter()
        sampled = []
        for seq, token in tokens:
            if seq.finished:  # aborted, or a stop string ended it while this step ran: the token is dropped
                continue
            seq.append_token(token)
            arrival, last = self._times[seq.request_id]
            self._times[seq.request_id] = (arrival, now)
            if seq.finish_reason is not None:
                seq.detokenize()  # a stop string in its last text still wins over max_tokens
                self._output(seq, results)
            sampled.append((seq, last == 0.0, now - (last or arrival)))
        return sampled

    def _output(self, seq: Sequence, results: list) -> None:
        out = seq.take_output()
        if out.finished:
            self._finish(seq, out.finish_reason or "stop")
        results.append((seq, out))

    def _finish(self, seq: Sequence, status: str) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
        self.requests.pop(seq.request_id, None)
        self._times.pop(seq.request_id, None)
        self.metrics.request_finished(status)
        self.metrics.tokens(len(seq.prompt_ids), len(seq.output_ids))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def stats(self) -> dict:
        return {
            "resident_adapters": self.pool.resident(),
            "host_adapters": self.pool.host_names(),
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "free_kv_blocks": self.blocks.num_free,
            "total_kv_blocks": self.blocks.num_blocks,
        }


class Engine:
    """Async front: generate() streams a request's outputs; a background thread runs steps."""

    def __init__(
        self, config: EngineConfig, *, store: Any = None, metrics: EngineMetrics | None = None
    ) -> None:
        self.core = EngineCore(config, store=store, metrics=metrics)
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: list[Sequence] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, Sequence]] = {}
        self._stats = self.core.stats()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def model_name(self) -> str:
        return self.core.model_name

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        adapter: LoRARequest | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._stopped:
            raise RuntimeError("engine is shut down")
        seq = self.core.make_sequence(prompt, params, adapter, request_id)
        rid = seq.request_id
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise InvalidRequest("request_id", f"{rid!r} is already running")
            if self._stats["num_waiting"] + len(self._inbox) >= self.core.config.max_waiting:
                raise QueueFull(f"{self._stats['num_waiting']} requests waiting (max_waiting)")
            self._streams[rid] = (asyncio.get_running_loop(), queue, seq)
            self._inbox.append(seq)
        self.core.wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
                if not finished:  # the consumer went away: free everything it held
                    self._aborts.append(seq)
            self.core.wakeup.set()

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort". Unknown ids are ignored."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None:
                self._aborts.append(stream[2])
        self.core.wakeup.set()

    def stats(self) -> dict:
        return dict(self._stats)

    async def shutdown(self) -> None:
        self._stopped = True
        self.core.wakeup.set()
        await asyncio.to_thread(self._thread.join)
        self.core.pool.shutdown()
        with self._lock:
            streams = list(self._streams.items())
        for rid, _ in streams:
            self._deliver(rid, RuntimeError("engine shut down"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, queue, _ = stream
        with contextlib.suppress(RuntimeError):  # the consumer's event loop is closed
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        core = self.core
        while not self._stopped:
            core.wakeup.clear()
            with self._lock:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            aborted = []
            for seq in aborts:  # before adding, so a reused request id meets its old request gone
                if seq in inbox:
                    inbox.remove(seq)
                    seq.finish_reason = "abort"
                    aborted.append((seq.request_id, seq.take_output()))
                elif core.requests.get(seq.request_id) is seq:
                    aborted.append((seq.request_id, core.abort(seq.request_id)))
            for seq in inbox:
                core.add(seq)
            try:
                results = core.step() if core.has_work else []
            except Exception as exc:  # a bug must not leave streams hanging
                results = [(seq, exc) for seq in list(core.requests.values())]
                for seq, _ in results:
                    with contextlib.suppress(Exception):
                        core.abort(seq.request_id)
            self._stats = core.stats()  # before delivering, so a finished stream sees its blocks freed
            for rid, out in aborted:
                if out is not None:
                    self._deliver(rid, out)
            for seq, item in results:
                self._deliver(seq.request_id, item)
            if not results and not core.last_num_scheduled:
                # Idle, or every waiting request waits on an adapter load: sleep until woken.
                core.wakeup.wait(timeout=0.5 if core.has_work else None)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _eos_token_ids(model_dir: str, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_config = Path(model_dir) / "generation_config.json"
    for source in (
        json.loads(gen_config.read_text()) if gen_config.is_file() else {},
        {"eos_token_id": tokenizer.eos_token_id},
    ):
        eos = source.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return frozenset(ids)

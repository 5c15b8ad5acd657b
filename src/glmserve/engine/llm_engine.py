"""LLMEngine: add_request / step / abort over the scheduler, block manager and model runner.

Token ids in, token ids out; text comes from the Detokenizer the caller hands in (none: ids only),
roles and chat formats live in chat/. A request's n choices are n sequences (parallel sampling, as
vLLM's): their outputs carry the request id and the choice's `index`; with a seed, choice j draws
with seed + j, so choices differ yet repeat.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.block_manager import BlockManager
from glmserve.engine.checkpoint import open_checkpoint
from glmserve.engine.checkpoint.adapters import has_ptuning_prefix, is_prefix_adapter, read_prefix_kv
from glmserve.engine.detokenizer import Detokenizer, SequenceDetokenizer
from glmserve.engine.device import Placement, available_memory_bytes
from glmserve.engine.lora import Adapter
from glmserve.engine.memory import estimate_memory
from glmserve.engine.model_runner import ModelRunner, StepResult
from glmserve.engine.outputs import StreamOutput
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.sequence import KVPrefix, Sequence
from glmserve.engine.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)
DEFAULT_MAX_MODEL_LEN = 8192  # cap when the checkpoint allows more and none was asked for


def resolve_max_model_len(model_config: ModelConfig, requested: int | None) -> int:
    model_limit = model_config.max_position_embeddings
    if requested is None:
        return min(model_limit, DEFAULT_MAX_MODEL_LEN)
    if requested > model_limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's context of {model_limit}")
    return requested


class LLMEngine:
    def __init__(
        self, model_path: str | Path, config: EngineConfig | None = None, detokenizer: Detokenizer | None = None
    ):
        self.config = config or EngineConfig()
        checkpoint = open_checkpoint(Path(model_path))
        self.model_config = checkpoint.config
        self.detokenizer = detokenizer
        self.max_model_len = resolve_max_model_len(self.model_config, self.config.max_model_len)
        self.placement = Placement.resolve(self.config)  # device, dtype, free memory: decided here only
        self.memory = estimate_memory(checkpoint, self.config, self.max_model_len, self.placement)
        self._check_weights_fit()
        self.stop_token_ids = set(self.model_config.eos_token_ids) | set(detokenizer.stop_token_ids if detokenizer else ())
        self.runner = ModelRunner(self.model_config, self.config, self.placement, checkpoint, sorted(self.stop_token_ids))
        max_tokens = self.config.max_num_seqs * self.max_model_len
        # The KV budget is a share of the memory the loaded weights left free.
        num_blocks = self.runner.num_kv_blocks_for_budget(max_tokens, available_memory_bytes(self.placement.device))
        if num_blocks == 0:
            raise ValueError(f"the KV cache budget of {self.config.kv_cache_memory} holds no block; raise kv_cache_memory")
        if num_blocks * self.config.block_size < self.max_model_len:  # longer requests are refused at admission
            logger.warning(
                "the KV cache holds %d tokens, less than one %d-token sequence", num_blocks * self.config.block_size, self.max_model_len
            )
        self.runner.allocate_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, self.config.block_size)
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens, self.config.max_loras
        )
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its unfinished choices
        self.grammars = None  # structured output: needs the tokenizer, through the detokenizer
        if detokenizer is not None and hasattr(detokenizer, "grammar_tokenizer"):
            vocab_size, eos_ids = self.model_config.vocab_size, sorted(self.stop_token_ids)
            self.grammars = GrammarCompiler(lambda: detokenizer.grammar_tokenizer(vocab_size, eos_ids))
        self.detokenizers: dict[tuple[str, int], SequenceDetokenizer] = {}  # by seq_id
        # P-Tuning v2: the checkpoint's own prefix (every request), and prefix adapters by name.
        self.prefixes: dict[str, tuple[Adapter, KVPrefix]] = {}
        self.model_prefix = self._load_prefix(checkpoint.path) if has_ptuning_prefix(checkpoint.path) else None

    def _check_weights_fit(self) -> None:
        for line in self.memory.lines():
            logger.info("%s", line)
        free = self.placement.free_memory_bytes
        if self.memory.weights_bytes > free:
            raise ValueError(
                f"the weights need {self.memory.weights_bytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
                "is free; try --quantization int4 or int8"
            )

    @property
    def kv_cache_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # -- requests -----------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None
    ) -> None:
        """Queue a request and its params.n choices, on the base model or the registered LoRA adapter
        `lora`; ValueError (with the numbers) if it can never run, UnknownAdapterError for an unknown adapter."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        kv_prefix, salt = self.model_prefix, None
        if lora in self.prefixes:
            adapter, kv_prefix = self.prefixes[lora]
            lora, salt = None, adapter.id
        elif lora is not None:
            salt = self.runner.lora.get(lora).id
        self._check_request(prompt_token_ids, params, kv_prefix.num_slots if kv_prefix else 0)
        choices = [
            Sequence(request_id, list(prompt_token_ids), _choice_params(params, j), j, lora=lora, cache_salt=salt,
                     kv_prefix=kv_prefix)
            for j in range(params.n)
        ]  # fmt: skip
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured output needs a tokenizer: this engine was built without one")
            for seq in choices:  # compiled once (cached by schema), one matcher per choice
                seq.grammar = self.grammars.matcher(params.structured_outputs)
        self.requests[request_id] = choices
        for seq in choices:
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            if self.detokenizer is not None:
                self.detokenizers[seq.seq_id] = self.detokenizer.start(
                    seq.prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            self.scheduler.add(seq)

    def _check_request(self, prompt_token_ids: list[int], params: SamplingParams, num_prefix_slots: int = 0) -> None:
        if params.stop and self.detokenizer is None:
            raise ValueError("stop strings need text: this engine was built without a detokenizer")
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if params.max_tokens is None and num_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt} tokens) leaves no room to answer within the context length "
                f"of {self.max_model_len} tokens"
            )
        vocab_size = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context length "
                f"of {self.max_model_len} tokens"
            )
        if num_prefix_slots + num_prompt + max_tokens > self.kv_cache_tokens:
            raise ValueError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the KV cache of "
                f"{self.kv_cache_tokens - num_prefix_slots} tokens; raise kv_cache_memory"
            )

    # -- adapters -----------------------------------------------------------------------------
    def add_lora(self, name: str, path: str | Path) -> Adapter:
        """Serve a peft LoRA folder, or a ChatGLM P-Tuning v2 folder (config.json with pre_seq_len), as
        `name`; ValueError naming the mismatch if it does not fit the model."""
        path = Path(path).expanduser()
        if name in self.loras:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        if is_prefix_adapter(path):
            prefix = self._load_prefix(path)
            num_bytes = prefix.num_slots * self.runner.kv_bytes_per_token
            adapter = Adapter(name, path, self.runner.lora.next_id(), 0, num_bytes, frozenset(), kind="prefix")
            self.prefixes[name] = (adapter, prefix)
            logger.info("P-Tuning v2 adapter %s: %d prefix slots (%s)", name, prefix.num_slots, path)
            return adapter
        adapter = self.runner.lora.add(name, path)
        logger.info("LoRA adapter %s: rank %d, %d layers, %.1f MiB (%s)", name, adapter.rank, len(adapter.targets),
                    adapter.num_bytes / 2**20, adapter.path)
        return adapter

    def remove_lora(self, name: str) -> None:
        """Stop serving an adapter; ValueError while requests still run on it."""
        adapter = self.prefixes[name][0] if name in self.prefixes else self.runner.lora.get(name)
        in_use = sum(1 for choices in self.requests.values() for seq in choices if seq.cache_salt == adapter.id)
        if in_use:
            raise ValueError(f"adapter {name!r} still has {in_use} sequences in flight")
        if name in self.prefixes:
            self.block_manager.release_prefix(self.prefixes.pop(name)[1])
        else:
            self.runner.lora.remove(name)

    @property
    def loras(self) -> dict[str, Adapter]:
        """The adapters served on this model: LoRA and P-Tuning v2."""
        return {**self.runner.lora.registered, **{name: a for name, (a, _) in self.prefixes.items()}}

    def _load_prefix(self, path: Path) -> KVPrefix:
        """A P-Tuning v2 prefix's keys and values, computed once into KV blocks it holds from now on."""
        read = read_prefix_kv(path, self.model_config)  # ValueError when it does not fit the model
        prefix = self.block_manager.reserve_prefix(read.kv.shape[2], read.position_offset)
        self.runner.zero_new_blocks(self.block_manager.num_touched_blocks)  # before writing, never after
        self.runner.write_prefix(prefix, read.kv)
        return prefix

    def abort(self, request_id: str) -> bool:
        """Stop a request (all its choices) and free its blocks at once; False if it is unknown or done."""
        choices = self.requests.get(request_id)
        if choices is None:
            return False
        for seq in list(choices):
            self._finish(seq, "abort")
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished(self) -> int:
        """Requests not finished (each may run several choices)."""
        return len(self.requests)

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[StreamOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        self.runner.zero_new_blocks(self.block_manager.num_touched_blocks)
        self.runner.copy_blocks(self.block_manager.take_pending_copies())  # prefix tails, after zeroing
        result = self.runner.run(batch)
        self.scheduler.postprocess(batch)
        outputs = []
        for i, seq in enumerate(batch.seqs):
            out = self._process(seq, result, i)
            if out is not None:
                outputs.append(out)
        return outputs

    def _process(self, seq: Sequence, result: StepResult, i: int) -> StreamOutput | None:
        if result.prompt_logprobs[i] is not None:
            first_target, entries = result.prompt_logprobs[i]
            # Only positions not recorded yet (a preempted sequence recomputes its prompt).
            seq.prompt_logprobs.extend(entries[len(seq.prompt_logprobs) - first_target :])
        token_id = result.sampled_token_ids[i]
        if token_id is None:
            return None
        is_first = seq.num_output_tokens == 0
        seq.append_token(token_id)
        if seq.grammar is not None and token_id not in self.stop_token_ids and not seq.grammar.consume_token(token_id):
            logger.warning("request %s left its grammar: %s", seq.request_id, seq.grammar.get_error())
        out = StreamOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=[token_id],
            text_delta="",
            logprobs=[result.logprobs[i]] if result.logprobs[i] is not None else None,
            prompt_logprobs=seq.prompt_logprobs if is_first else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )
        self._check_finish(seq, token_id, out)
        return out

    def _check_finish(self, seq: Sequence, token_id: int, out: StreamOutput) -> None:
        params, detok = seq.params, self.detokenizers.get(seq.seq_id)
        can_stop = seq.num_output_tokens >= params.min_tokens  # stop ids are banned before that
        if can_stop and token_id in params.stop_token_ids:
            reason, stop_reason = "stop", token_id
        elif can_stop and not params.ignore_eos and token_id in self.stop_token_ids:
            reason, stop_reason = "stop", None
        else:
            out.text_delta = detok.add([token_id]) if detok else ""
            reason, stop_reason = None, None
            if detok and detok.is_stopped:
                reason, stop_reason = "stop", detok.stop_reason
            elif seq.grammar is not None and seq.grammar.is_stopped():  # complete: only an end can follow
                reason = "stop"
            elif params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            if detok and not detok.is_stopped:
                out.text_delta += detok.flush()
            out.finish_reason, out.stop_reason = reason, stop_reason
            self._finish(seq, reason, stop_reason)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        self.runner.release(seq)
        self.detokenizers.pop(seq.seq_id, None)
        choices = [c for c in self.requests.get(seq.request_id, []) if c is not seq]
        if choices:
            self.requests[seq.request_id] = choices
        else:
            self.requests.pop(seq.request_id, None)

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "prefix_cache_hit_rate": self.block_manager.prefix_cache_hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice j of n: a sequence of its own (n=1); with a seed, seed + j."""
    seed = params.seed + index if params.seed is not None else None
    return dataclasses.replace(params, n=1, seed=seed)

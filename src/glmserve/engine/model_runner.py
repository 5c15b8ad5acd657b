"""The only place sequences become tensors: batch preparation, the KV pool, forward, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.attention_metadata import build_attention_metadata
from glmserve.engine.checkpoint import Checkpoint, weight_quantization
from glmserve.engine.device import Placement, num_physical_cores
from glmserve.engine.layers.attention import AttentionMetadata
from glmserve.engine.layers.linear import Linear, is_output_layer
from glmserve.engine.lora import LoRAManager
from glmserve.engine.models import build_model, load_weights
from glmserve.engine.sampler import build_sampling_batch, sample, topk_logprobs
from glmserve.engine.scheduler import ScheduledBatch
from glmserve.engine.sequence import KVPrefix, Sequence
from glmserve.engine.structured_output import fill_bitmasks


@dataclass
class StepResult:
    """Per scheduled sequence: the sampled token (None mid-prefill) and requested logprobs."""

    sampled_token_ids: list[int | None]
    logprobs: list[dict[int, float] | None]
    # per sequence: (position of the first prompt token scored, its entries) or None
    prompt_logprobs: list[tuple[int, list[dict[int, float]]] | None] = field(default_factory=list)


@dataclass
class _Inputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    row_adapters: list[str | None] | None  # LoRA adapter of each row (None: base); None if no row has one
    sample_rows: list[int]  # flat row of each sampling sequence's last token
    sample_seq_indices: list[int]  # batch index of each sampling sequence
    prompt_rows: list[tuple[int, int, int, int]]  # (batch index, first row, num rows, first target position)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        placement: Placement,
        checkpoint: Checkpoint,
        eos_token_ids: list[int],
    ):
        self.model_config, self.engine_config, self.placement = model_config, engine_config, placement
        self.device, self.dtype = placement.device, placement.dtype
        if self.device.type == "cpu":
            torch.set_num_threads(engine_config.num_threads or num_physical_cores())
        self.eos_token_ids = list(eos_token_ids)  # banned before min_tokens
        self.model = build_model(model_config, self.dtype, self.device)
        quantization, group_size = weight_quantization(checkpoint, engine_config)
        keep_dense = self._plan_quantization(quantization, group_size)
        keep_quantized = quantization in (None, "int4")  # a GGUF's 4-bit and Q8_0 blocks, exactly
        load_weights(self.model, checkpoint.iter_tensors(self.dtype, keep_quantized=keep_quantized))
        if keep_dense and hasattr(self.model, "prepack_tied_output"):
            self.model.prepack_tied_output()
        self.model.build_decode_stack()  # CPU decode steps in one native call where it can
        self.lora = LoRAManager(self.model, engine_config.max_loras, self.device, self.dtype)
        self._stack_lora_version = 0  # the LoRA stacks the native decode stack holds
        self.block_size = engine_config.block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_zeroed_blocks = 0
        self.generators: dict[tuple[str, int], torch.Generator] = {}  # by seq_id

    def _plan_quantization(self, quantization: str | None, group_size: int) -> bool:
        """Tell each linear layer how to store its weight before the weights arrive; True when
        the model is small enough to keep extra dense copies for many-row steps.

        Embeddings stay in the compute dtype (a lookup reads one row per token, nothing to gain);
        the output layer is int8 under int8 and int4 (per-channel int8 keeps logits close, and it
        is the largest matrix); the other linear layers take the chosen scheme. With no choice,
        a GGUF's 4-bit layers also keep a dense copy for batched steps when all dense weights take
        under a quarter of free memory (a small model). Any device and dtype: each layer picks its
        kernel when its weight arrives (layers/quant.py, select_kernel).
        """
        if quantization not in (None, "none", "int8", "int4"):
            raise ValueError(f"quantization must be none, int8 or int4; got {quantization!r}")
        if self.engine_config.activation_precision not in ("int8", "float"):
            raise ValueError(f"activation_precision must be int8 or float; got {self.engine_config.activation_precision!r}")
        int8_activations = self.engine_config.activation_precision == "int8"
        if hasattr(self.model, "int8_activations"):  # a tied output layer kept quantized
            self.model.int8_activations = int8_activations
        dense_bytes = sum(p.numel() for p in self.model.parameters()) * self.dtype.itemsize
        keep_dense = quantization is None and self.placement.keeps_dense_copy(dense_bytes)
        for path, module in self.model.named_modules():
            if isinstance(module, Linear):
                is_head = is_output_layer(path)
                module.quantization = ("int8" if is_head else quantization) if quantization in ("int8", "int4") else None
                module.group_size = group_size
                module.keep_dense_copy = keep_dense
                module.int8_activations = int8_activations
        return keep_dense

    # -- KV pool ------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model_config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def num_kv_blocks_for_budget(self, max_tokens_needed: int, free_memory_bytes: int) -> int:
        """Blocks the KV budget allows (a fraction of `free_memory_bytes`, or bytes), never more
        than `max_tokens_needed` can use."""
        budget = self.engine_config.kv_cache_memory
        if budget <= 1:
            budget = budget * free_memory_bytes
        block_bytes = self.kv_bytes_per_token * self.block_size
        return min(int(budget // block_bytes), -(-max_tokens_needed // self.block_size))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_config
        shape = (c.num_key_value_heads, num_blocks, self.block_size, c.head_dim)
        # Uninitialised: pages are touched only when blocks are first used (see zero_new_blocks).
        self.kv_caches = [
            (torch.empty(shape, dtype=self.dtype, device=self.device), torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(c.num_hidden_layers)
        ]
        self.zero_new_blocks(1)  # block 0 pads block tables

    def zero_new_blocks(self, num_touched_blocks: int) -> None:
        """Zero blocks on first use: masked-out slots are multiplied by 0, and 0 * NaN garbage is NaN."""
        if num_touched_blocks <= self.num_zeroed_blocks:
            return
        for k_cache, v_cache in self.kv_caches:
            k_cache[:, self.num_zeroed_blocks : num_touched_blocks].zero_()
            v_cache[:, self.num_zeroed_blocks : num_touched_blocks].zero_()
        self.num_zeroed_blocks = num_touched_blocks

    def write_prefix(self, prefix: KVPrefix, kv: torch.Tensor) -> None:
        """A P-Tuning prefix's keys and values (kv [layers, 2, P, KVH, D]) into its reserved blocks."""
        index = torch.arange(prefix.num_slots, device=self.device)
        block_ids = torch.tensor(prefix.blocks, device=self.device)[index // self.block_size]
        offsets = index % self.block_size
        kv = kv.to(self.device, self.dtype)
        for (k_cache, v_cache), (keys, values) in zip(self.kv_caches, kv, strict=True):
            k_cache[:, block_ids, offsets] = keys.transpose(0, 1)  # [KVH, P, D]
            v_cache[:, block_ids, offsets] = values.transpose(0, 1)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer: a prefix's tail into a sequence's block."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[:, dst] = k_cache[:, src]
            v_cache[:, dst] = v_cache[:, src]

    # -- a step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        inputs = self._prepare(batch)
        if self.lora.registered:
            self.lora.set_step(inputs.row_adapters or [])
            if self.lora.version != self._stack_lora_version:  # new stacks: hand them to the native stack
                self.model.build_decode_stack()
                if self.model.decode_stack is not None:
                    self.model.decode_stack.lora_step = self.lora.step
                self._stack_lora_version = self.lora.version
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        result = StepResult([None] * len(batch.seqs), [None] * len(batch.seqs), [None] * len(batch.seqs))
        if inputs.sample_rows:
            self._sample(batch, inputs, hidden, result)
        if inputs.prompt_rows:
            self._score_prompts(batch, inputs, hidden, result)
        return result

    def _sample(self, batch: ScheduledBatch, inputs: _Inputs, hidden: torch.Tensor, result: StepResult) -> None:
        seqs = [batch.seqs[i] for i in inputs.sample_seq_indices]
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [N, V] float32
        grammar_rows = [row for row, s in enumerate(seqs) if s.grammar is not None]
        bitmask = fill_bitmasks([seqs[row].grammar for row in grammar_rows], logits.shape[1]) if grammar_rows else None
        sampling = build_sampling_batch(
            [s.params for s in seqs],
            [s.token_ids if s.params.repetition_penalty != 1.0 else [] for s in seqs],
            [s.output_token_ids for s in seqs],
            [self._banned_ids(s) for s in seqs],
            [self._generator(s) for s in seqs],
            self.device,
            grammar_rows,
            bitmask,
        )
        token_ids, _ = sample(logits, sampling)
        token_list = token_ids.tolist()
        if sampling.num_logprobs >= 0:
            chosen, top_values, top_ids = topk_logprobs(logits, token_ids, sampling.num_logprobs)
            entries = _logprob_entries(token_list, chosen.tolist(), top_values.tolist(), top_ids.tolist())
        for row, seq_index in enumerate(inputs.sample_seq_indices):
            result.sampled_token_ids[seq_index] = token_list[row]
            k = batch.seqs[seq_index].params.logprobs
            if k is not None:
                result.logprobs[seq_index] = _truncate(entries[row], token_list[row], k)

    def _score_prompts(self, batch, inputs: _Inputs, hidden: torch.Tensor, result: StepResult) -> None:
        for seq_index, first_row, num_rows, first_target in inputs.prompt_rows:
            seq = batch.seqs[seq_index]
            targets = seq.prompt_token_ids[first_target : first_target + num_rows]
            logits = self.model.compute_logits(hidden[first_row : first_row + num_rows])
            target_ids = torch.tensor(targets, device=self.device)
            k = seq.params.prompt_logprobs
            chosen, top_values, top_ids = topk_logprobs(logits, target_ids, k)
            entries = _logprob_entries(targets, chosen.tolist(), top_values.tolist(), top_ids.tolist())
            result.prompt_logprobs[seq_index] = (first_target, entries)

    def _banned_ids(self, seq: Sequence) -> list[int]:
        if seq.num_output_tokens >= seq.params.min_tokens or seq.grammar is not None:  # a grammar says when to end
            return []
        eos = [] if seq.params.ignore_eos else self.eos_token_ids
        return eos + seq.params.stop_token_ids

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.is_greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed)
        return gen

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    # -- batch preparation --------------------------------------------------------------------
    def _prepare(self, batch: ScheduledBatch) -> _Inputs:
        n_new = batch.num_new_tokens
        decode = [i for i, n in enumerate(n_new) if n == 1]
        prefill = [i for i, n in enumerate(n_new) if n > 1]
        order = decode + prefill
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        sample_rows, sample_seq_indices, prompt_rows = [], [], []
        for i in order:
            seq, n = batch.seqs[i], n_new[i]
            start, row = seq.num_computed_tokens, len(ids)
            ids.extend(seq.token_ids[start : start + n] if n > 1 else [seq.token_at(start)])
            pos = np.arange(start, start + n)
            cache_index = pos + seq.num_prefix_slots  # a P-Tuning prefix fills the cache's first slots
            table = np.asarray(seq.block_table)
            positions.append(pos + seq.kv_prefix.position_offset if seq.kv_prefix is not None else pos)
            slots.append(table[cache_index // self.block_size] * self.block_size + cache_index % self.block_size)
            if start + n == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_seq_indices.append(i)
            if seq.params.prompt_logprobs is not None:
                num_scored = min(start + n, seq.num_prompt_tokens - 1) - start  # targets within the prompt
                if num_scored > 0:
                    prompt_rows.append((i, row, num_scored, start + 1))
        meta = self._attention_metadata(batch, decode, prefill, np.concatenate(slots))
        return _Inputs(
            input_ids=torch.tensor(ids, device=self.device),
            positions=torch.from_numpy(np.concatenate(positions)).to(self.device),
            meta=meta,
            row_adapters=_row_adapters([batch.seqs[i] for i in order], [n_new[i] for i in order]),
            sample_rows=sample_rows,
            sample_seq_indices=sample_seq_indices,
            prompt_rows=prompt_rows,
        )

    def _attention_metadata(self, batch, decode: list[int], prefill: list[int], slots) -> AttentionMetadata:
        decode_seqs = [batch.seqs[i] for i in decode]
        prefill_seqs = [batch.seqs[i] for i in prefill]
        return build_attention_metadata(
            slots,
            decode_tables=[s.block_table for s in decode_seqs],
            decode_context_lens=[s.num_prefix_slots + s.num_computed_tokens + 1 for s in decode_seqs],
            prefill_tables=[s.block_table for s in prefill_seqs],
            prefill_starts=[s.num_prefix_slots + s.num_computed_tokens for s in prefill_seqs],
            prefill_q_lens=[batch.num_new_tokens[i] for i in prefill],
            block_size=self.block_size,
            device=self.device,
            dtype=self.dtype,
        )


def _row_adapters(seqs: list[Sequence], num_rows: list[int]) -> list[str | None] | None:
    """Each row's LoRA adapter (None: the base model), or None when no sequence has one."""
    if all(seq.lora is None for seq in seqs):
        return None
    return [seq.lora for seq, n in zip(seqs, num_rows, strict=True) for _ in range(n)]


def _logprob_entries(chosen_ids, chosen, top_values, top_ids) -> list[dict[int, float]]:
    entries = []
    for cid, c, values, ids in zip(chosen_ids, chosen, top_values, top_ids, strict=True):
        entry = dict(zip(ids, values, strict=True))
        entry[cid] = c
        entries.append(entry)
    return entries


def _truncate(entry: dict[int, float], chosen_id: int, k: int) -> dict[int, float]:
    """Keep the chosen token and the k best (rows computed with the batch's largest k)."""
    best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
    out = dict(best)
    out[chosen_id] = entry[chosen_id]
    return out

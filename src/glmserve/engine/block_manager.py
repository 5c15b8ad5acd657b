"""Paged KV blocks: free list, ref counts and prefix-cache hashing. No torch.

A block holds `block_size` consecutive tokens of one sequence. A *full* block is keyed
by a hash of all tokens from the sequence start to the block's end (chained: the hash
of the previous block plus this block's tokens), so two requests sharing a prefix share
its blocks. Cached blocks nobody references stay in an LRU until their memory is needed.
"""

from __future__ import annotations

from collections import OrderedDict

from glmserve.engine.sequence import KVPrefix, Sequence


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_token_ids: list[tuple[int, ...] | None] = [None] * num_blocks  # to rule out collisions
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() from the end
        self.cached_block_ids: dict[int, int] = {}  # hash -> block id (full, hashed blocks)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0, LRU first
        self.num_touched_blocks = 0  # block ids below this have been handed out at least once
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, found cached
        # (source, destination) blocks whose contents the runner must copy before the next step: the
        # partial block of a P-Tuning prefix, into each new sequence's own block.
        self.pending_copies: list[tuple[int, int]] = []

    # -- capacity ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix lookup ----------------------------------------------------------------------
    def _full_block_hashes(self, token_ids: list[int], num_tokens: int, salt: int | None = None) -> list[int]:
        """Chained hashes of the full blocks among the first `num_tokens` tokens; `salt` (a LoRA
        adapter's id) starts the chain, so blocks computed under different weights never match."""
        hashes, parent = [], (None if salt is None else hash(("salt", salt)))
        for start in range(0, num_tokens - self.block_size + 1, self.block_size):
            parent = hash_block(parent, tuple(token_ids[start : start + self.block_size]))
            hashes.append(parent)
        return hashes

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`, leaving at least one token to compute
        (the last token must run through the model to produce logits). Look up once, pass on."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        if seq.kv_prefix is not None and seq.kv_prefix.partial_block is not None:
            return []  # token blocks straddle block boundaries: not cached
        token_ids = seq.token_ids
        hashes = self._full_block_hashes(token_ids, seq.num_tokens - 1, seq.cache_salt)
        block_ids = []
        for i, h in enumerate(hashes):
            block_id = self.cached_block_ids.get(h)
            block_tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block_id is None or self.block_token_ids[block_id] != block_tokens:
                break
            block_ids.append(block_id)
        return block_ids

    # -- allocation -------------------------------------------------------------------------
    def num_cached_tokens(self, seq: Sequence) -> int:
        """How many of a waiting sequence's tokens the prefix cache already holds."""
        return len(self.cached_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Whether `seq` can hold its computed (or cached) tokens plus `num_new_tokens`.
        `cached`: the result of cached_prefix(seq) for a waiting sequence, if already known."""
        offset = seq.num_prefix_slots
        if seq.block_table:
            needed = self.num_blocks_for(offset + seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
            return needed <= self.num_free_blocks
        cached = self.cached_prefix(seq) if cached is None else cached
        num_shared = len(seq.kv_prefix.shared_blocks) if seq.kv_prefix is not None else 0
        new_blocks = self.num_blocks_for(offset + len(cached) * self.block_size + num_new_tokens) - num_shared - len(cached)
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)  # leave the evictable pool
        return new_blocks + revived <= self.num_free_blocks

    def allocate_prefix(self, seq: Sequence, cached: list[int] | None = None) -> None:
        """First allocation of a waiting sequence: take its cached prefix blocks."""
        assert not seq.block_table
        cached = self.cached_prefix(seq) if cached is None else cached
        prefix = seq.kv_prefix
        shared = list(prefix.shared_blocks) if prefix is not None else []
        for block_id in shared + cached:
            self._take(block_id)
        seq.block_table = shared + list(cached)
        if prefix is not None and prefix.partial_block is not None:  # cached is empty then
            own = self._take_free()
            seq.block_table.append(own)
            self.pending_copies.append((prefix.partial_block, own))
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to hold the computed tokens plus `num_new_tokens`."""
        num_needed = self.num_blocks_for(seq.num_prefix_slots + seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(num_needed):
            seq.block_table.append(self._take_free())

    def deallocate(self, seq: Sequence) -> None:
        """Give back a sequence's blocks; hashed ones stay cached until evicted."""
        for block_id in reversed(seq.block_table):  # tail first, so evicted last-used-first
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is None:
                    self.free_block_ids.append(block_id)
                else:
                    self.evictable[block_id] = None
        seq.block_table = []

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        first = 0  # the table's first token block: after a P-Tuning prefix's blocks
        if seq.kv_prefix is not None:
            if seq.kv_prefix.partial_block is not None:
                return
            first = len(seq.kv_prefix.shared_blocks)
        num_full = seq.num_computed_tokens // self.block_size
        token_ids = seq.token_ids
        hashes = self._full_block_hashes(token_ids, num_full * self.block_size, seq.cache_salt)
        for i, (block_id, h) in enumerate(zip(seq.block_table[first : first + num_full], hashes, strict=True)):
            if self.block_hashes[block_id] is not None:
                continue
            if h in self.cached_block_ids:  # an identical block exists already; keep ours private
                continue
            self.block_hashes[block_id] = h
            self.block_token_ids[block_id] = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            self.cached_block_ids[h] = block_id

    # -- P-Tuning prefixes --------------------------------------------------------------------
    def reserve_prefix(self, num_slots: int, position_offset: int = 0) -> KVPrefix:
        """Blocks for a prefix of `num_slots` keys/values, held (ref 1) until release_prefix."""
        num_full, tail = divmod(num_slots, self.block_size)
        if self.num_blocks_for(num_slots) > self.num_free_blocks:
            raise ValueError(f"the KV cache has no room for a {num_slots}-slot prefix")
        shared = tuple(self._take_free() for _ in range(num_full))
        return KVPrefix(num_slots, shared, self._take_free() if tail else None, position_offset)

    def release_prefix(self, prefix: KVPrefix) -> None:
        for block_id in prefix.blocks:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- internals --------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            self.evictable.pop(block_id, None)
        self.ref_counts[block_id] += 1

    def _take_free(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.pop()
        else:
            block_id, _ = self.evictable.popitem(last=False)  # least recently used
            del self.cached_block_ids[self.block_hashes[block_id]]
            self.block_hashes[block_id] = None
            self.block_token_ids[block_id] = None
        self.ref_counts[block_id] = 1
        self.num_touched_blocks = max(self.num_touched_blocks, block_id + 1)
        return block_id

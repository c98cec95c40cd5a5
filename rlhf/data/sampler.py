"""Which rows each rank trains on at each step, derived from a count of samples seen.

The position is kept in samples, not steps, so a run resumed with a different number of processes
neither skips nor repeats rows: global sample k is row perm_e[k mod N] of epoch e = k // N.
"""

from __future__ import annotations

import numpy as np


class StepSampler:
    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        if num_rows <= 0:
            raise ValueError("StepSampler needs at least one row")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Row indices of global samples start, start+1, ..., start+count-1."""
        return [int(self._perm(k // self.num_rows)[k % self.num_rows]) for k in range(start, start + count)]

    @staticmethod
    def rank_positions(samples_seen: int, global_batch: int, rank: int, world_size: int) -> range:
        """Global sample positions of this rank's contiguous share of the step that starts at `samples_seen`."""
        per_rank = global_batch // world_size
        return range(samples_seen + rank * per_rank, samples_seen + (rank + 1) * per_rank)

    def rank_indices(self, samples_seen: int, global_batch: int, rank: int, world_size: int) -> list[int]:
        """Row indices of this rank's share of the step that starts at global sample `samples_seen`."""
        positions = self.rank_positions(samples_seen, global_batch, rank, world_size)
        return self.indices(positions.start, len(positions))

"""Scale-out for the batch jobs: shard by rank, merge deterministically.

Under ``torchrun --nproc_per_node=N`` (or any launcher that sets RANK and
WORLD_SIZE) every process takes every N-th *batch* of the input (batch j goes
to rank j mod N) and writes its own part file. Batches, not rows, are the
unit so that each batch holds exactly the rows it would hold in a single
process: the engine sees the same inputs and the merged output is byte-for-
byte the one-process output. Rank 0 waits for every part, interleaves them
batch by batch, and removes them. No torch.distributed is needed (the
serving install has no torch): the file system is the rendezvous.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not fit together")
        return cls(rank, world)

    @property
    def single(self) -> bool:
        return self.world == 1

    def batches(self, items: Iterable[T], size: int) -> Iterator[list[T]]:
        """This rank's batches of ``items`` (batch j belongs to rank j mod world)."""
        batch: list[T] = []
        j = 0
        for it in items:
            batch.append(it)
            if len(batch) == size:
                if j % self.world == self.rank:
                    yield batch
                batch, j = [], j + 1
        if batch and j % self.world == self.rank:
            yield batch

    def part(self, out: str | os.PathLike) -> Path:
        """Where this rank writes (the output itself when there is one process)."""
        out = Path(out)
        return out if self.single else out.with_name(f"{out.name}.part-{self.rank}-of-{self.world}{out.suffix}")

    def finish(self, out: str | os.PathLike, merge: Callable[[list[Path], Path], None], timeout: float = 24 * 3600) -> bool:
        """Mark this rank's part done; rank 0 waits for all, merges them into ``out``.
        Returns True in the process that wrote ``out``."""
        if self.single:
            return True
        out = Path(out)
        done = lambda r: out.with_name(f"{out.name}.part-{r}-of-{self.world}.done")  # noqa: E731
        done(self.rank).touch()
        if self.rank != 0:
            return False
        deadline = time.monotonic() + timeout
        while not all(done(r).exists() for r in range(self.world)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {[r for r in range(self.world) if not done(r).exists()]} never finished")
            time.sleep(0.2)
        parts = [Shard(r, self.world).part(out) for r in range(self.world)]
        merge(parts, out)
        for r, p in enumerate(parts):
            p.unlink(missing_ok=True)
            done(r).unlink(missing_ok=True)
        return True


def interleave(parts: list[Iterator[T]], size: int) -> Iterator[T]:
    """Batch 0 of part 0, batch 0 of part 1, ..., batch 1 of part 0, ...: the input order back."""
    live = list(parts)
    while live:
        for it in list(live):
            n = 0
            for x in it:
                yield x
                n += 1
                if n == size:
                    break
            if n < size:
                live.remove(it)

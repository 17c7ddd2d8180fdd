"""Row files for the batch jobs: CSV or JSONL in, CSV or JSONL out, streamed and resumable.

Input rows keep every column they came with (the jobs pass them through).
Output is written strictly in input order and flushed per batch, so an
interrupted run is resumed by counting the complete rows already written
(a half-written last row is cut off first) and skipping that many inputs.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence


def file_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    raise ValueError(f"{path}: use a .csv or .jsonl file")


def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows as dicts, one at a time (memory stays flat however long the file is).

    A JSONL line that is not a JSON object comes back as ``{"__error__": reason}``,
    so the job can report it in place and go on."""
    fmt = file_format(path)
    with open(path, newline="" if fmt == "csv" else None, encoding="utf-8") as f:
        if fmt == "csv":
            yield from csv.DictReader(f, delimiter="\t" if str(path).endswith(".tsv") else ",")
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"__error__": f"line {n}: not JSON ({e.msg})"}
                continue
            yield row if isinstance(row, dict) else {"__error__": f"line {n}: not a JSON object"}


class RowWriter:
    """Appends rows to CSV or JSONL; ``done`` is how many complete rows the file held at open."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], resume: bool = False) -> None:
        self.path, self.fmt, self.columns = Path(path), file_format(path), list(columns)
        self.done = _complete_rows(self.path, self.fmt) if resume and self.path.exists() else 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if self.done else "w", newline="", encoding="utf-8")
        if self.fmt == "csv":
            self._csv = csv.DictWriter(self._f, self.columns, extrasaction="ignore", lineterminator="\n")
            if not self.done:
                self._csv.writeheader()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.fmt == "csv":
            self._csv.writerows(rows)
        else:
            self._f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self._f.flush()  # a kill -9 keeps what is flushed; after a power cut a lost tail is just redone on --resume

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _complete_rows(path: Path, fmt: str) -> int:
    """Cut a partial last row off ``path``; return how many complete data rows remain."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # every row we write ends in a newline
    if fmt == "csv":
        # a quoted field may hold newlines: find the last newline that ends a whole record
        while end > 0 and _open_quote(data[:end]):
            end = data.rfind(b"\n", 0, end - 1) + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    text = data[:end].decode("utf-8")
    if fmt == "jsonl":
        return sum(1 for line in text.splitlines() if line.strip())
    return max(0, sum(1 for _ in csv.reader(io.StringIO(text))) - 1)  # minus the header


def _open_quote(data: bytes) -> bool:
    return data.count(b'"') % 2 == 1

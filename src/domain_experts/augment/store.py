"""The on-disk record of an augmentation run's generations, which makes runs resumable."""

import json
import os
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)


class GenerationStore:
    r"""
    Append-only JSON-lines file of generations, one record per line, keyed by `record["key"]` (a hash of everything
    that decides the output: prompt, seed, generator, sampling settings).

    Every record is flushed and fsynced before the next generation is asked for, so a crash (or a dead endpoint)
    loses at most the generation in flight; a rerun finds the records by key and generates only the missing ones.
    A line cut short by a crash mid-write is dropped (with a warning) when the store is opened.

    Args:
        path (`str` or `os.PathLike`, *optional*): the file, created on the first append; `None` keeps the records
            in memory only (nothing survives the process).
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._records: dict[str, dict[str, Any]] = {}
        self._file = None
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning(f"{self.path}: dropping an incomplete last line ({len(data) - complete} bytes), "
                           "left by an interrupted run; that generation will be asked for again.")
            with open(self.path, "r+b") as file:
                file.truncate(complete)
                os.fsync(file.fileno())
        for number, line in enumerate(data[:complete].splitlines(), 1):
            try:
                record = json.loads(line)
                self._records[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}, line {number}, is not a generation record ({error!r}). The file was "
                                 "edited or is not a generation store; move it away to start afresh.") from None

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self._records[key]

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` durably (one line, flushed and fsynced) and index it by its `"key"`."""
        if self._file is None and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        self._records[record["key"]] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "GenerationStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

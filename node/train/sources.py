"""Text out of record files: `.jsonl` (no extra package) and `.parquet` / `.arrow` (pyarrow).

Each record contributes its `text_field` string as one document; documents are joined by a
newline, in file order, and reading stops once `max_bytes` of UTF-8 text are gathered, so a
source, field and cap always give the same bytes. Problems are `DataError`s that name the file
and the line (jsonl) or row (parquet/arrow): a line that is not JSON, a record without the field
or whose field is not a string. pyarrow is imported only when such a file is read; without it
the error names the `parquet` extra.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swarm_node.train.data import DataError

JSONL_SUFFIXES = (".jsonl",)
DOC_SEPARATOR = b"\n"
ARROW_BATCH_ROWS = 4096  # rows per record batch read: bounds memory on large files


def read_records(path: Path, text_field: str, max_bytes: int | None) -> bytes:
    """The documents of one record file as UTF-8 bytes, capped at `max_bytes`."""
    suffix = path.suffix.lower()
    docs = _jsonl_docs(path, text_field) if suffix in JSONL_SUFFIXES else _arrow_docs(path, text_field)
    out = bytearray()
    for doc in docs:
        if out:
            out += DOC_SEPARATOR
        out += doc.encode("utf-8")
        if max_bytes is not None and len(out) >= max_bytes:
            del out[max_bytes:]
            break
    return bytes(out)


def _field_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with a {text_field!r} field")
    if text_field not in record or record[text_field] is None:
        raise DataError(f"{where} has no {text_field!r} field (set --text-field)")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) hold no record
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path} line {lineno} is not JSON ({e.args[0].split(':')[0]})") from None
            yield _field_of(record, text_field, f"{path} line {lineno}")


def _arrow_docs(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path.suffix} files needs pyarrow: pip install 'swarm-node[parquet]'") from None
    try:
        if path.suffix.lower() == ".parquet":
            pfile = pq.ParquetFile(path)
            names = pfile.schema_arrow.names
            batches = pfile.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[text_field]) \
                if text_field in names else None
        else:
            source = pa.memory_map(str(path), "r")
            try:
                reader = pa.ipc.open_file(source)
                names = reader.schema.names
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # the streaming format (what `datasets` writes)
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                names = reader.schema.names
                batches = iter(reader)
        if batches is None or text_field not in names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}; set --text-field)")
        row = 0
        for batch in batches:
            column = batch.column(batch.schema.get_field_index(text_field))
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise DataError(f"{path}: column {text_field!r} is {column.type}, not a string")
            for value in column.to_pylist():
                row += 1
                if value is None:
                    raise DataError(f"{path} row {row} has no {text_field!r} value (null)")
                yield value
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable {path.suffix} file: {str(e).splitlines()[0]}") from None

"""Raw text readers: document strings out of .txt, .jsonl, .parquet files and `datasets` folders.

    .txt      one document per file, the whole file (UTF-8): a book, a play, an article. Blank lines do
              not split documents; they belong to plays, books and code. Many documents: use .jsonl
    .jsonl    one JSON object per line; the document is its `text_field` (a string); blank lines skipped
    .parquet  one document per row of the `text_field` column (a string column, no nulls), read with
              pyarrow a record batch at a time
    folder    a `datasets.Dataset` written by `save_to_disk`: one document per row of `text_field`

`check_inputs(paths, text_field)` reads every input once, cheaply, and raises `DataError` naming the
file, line (or row) and field of the first problem, so that a bad record fails before hours of
tokenizing. `iter_texts` yields the documents and validates as it reads (the same errors).
"""

import json
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Bad input data; the message names the file, line or field."""


def input_kind(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists():
            return "dataset"
        if (p / "dataset_dict.json").exists():
            raise DataError(f"{path}: a DatasetDict; give the folder of one split, e.g. {p / 'train'}")
        raise DataError(f"{path}: a folder, but not a dataset saved by datasets' save_to_disk")
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if p.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)} "
                        f"or a datasets folder")
    return p.suffix[1:]


def jsonl_texts(path: str, text_field: str) -> Iterator[str]:
    """The text of every record, each record validated as it is read."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            if line.strip():
                yield jsonl_record_text(line, path, lineno, text_field)


def jsonl_record_text(line: str, path: str, lineno: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(f"{path}:{lineno}: record has no field {text_field!r} "
                        f"(fields: {', '.join(map(repr, record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def table_texts(path: str, kind: str, text_field: str) -> Iterator[str]:
    """Strings of column `text_field` of a parquet file or saved dataset, a record batch at a time."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        source = pq.ParquetFile(path)
        names = source.schema_arrow.names
    else:
        import datasets

        source = datasets.load_from_disk(path)
        names = source.column_names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(map(repr, names))})")
    batches = (source.iter_batches(columns=[text_field], batch_size=1024) if kind == "parquet"
               else source.select_columns([text_field]).with_format("arrow").iter(1024))
    row = 0
    for batch in batches:
        column = batch.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{path}: column {text_field!r} must hold strings, got {column.type}")
        if column.null_count:
            first = row + column.is_null().to_pylist().index(True)
            raise DataError(f"{path}: row {first}: column {text_field!r} is null")
        yield from column.to_pylist()
        row += len(column)


def iter_texts(path: str, text_field: str = "text") -> Iterator[str]:
    """The document strings of one input (a file or a datasets folder), in order."""
    kind = input_kind(path)
    if kind == "txt":
        try:
            yield Path(path).read_bytes().decode("utf-8")  # exact: no newline translation
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    elif kind == "jsonl":
        yield from jsonl_texts(path, text_field)
    else:
        yield from table_texts(path, kind, text_field)


def check_inputs(paths: list[str], text_field: str = "text") -> int:
    """Validate every input file (see module docstring); returns the number of documents."""
    if not paths:
        raise DataError("no input files given")
    for path in paths:  # cheap checks on all files first: a missing last file fails at once
        input_kind(path)
    return sum(sum(1 for _ in iter_texts(path, text_field)) for path in paths)

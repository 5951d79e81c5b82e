"""Raw text readers: document strings out of .txt, .jsonl(.gz/.zst), .parquet files, folders of them,
`datasets` folders and datasets loaded by name.

    .txt      one document per file, the whole file (UTF-8): a book, a play, an article. Blank lines do
              not split documents; they belong to plays, books and code. Many documents: use .jsonl
    .jsonl    one JSON object per line; the document is its `text_field` (a string); blank lines skipped.
              .jsonl.gz and .jsonl.zst are read decompressing as they go; a truncated or corrupt
              compressed file is a DataError naming it
    .parquet  one document per row of the `text_field` column (a string column, no nulls), read with
              pyarrow a record batch at a time
    folder    a `datasets.Dataset` written by `save_to_disk`: one document per row of `text_field`;
              any other folder: its files of the kinds above (all subfolders, in sorted path order;
              other files, such as a README, are ignored)
    mapping   {"dataset": NAME_OR_PATH, "split": "train", "name": None, "data_files": None,
              "streaming": False}: `datasets.load_dataset(...)` (the Hub, a local dataset folder, or a
              builder such as "json" with data_files); streaming reads the rows as they come instead of
              preparing the whole dataset first; one document per row of `text_field`

`check_inputs(paths, text_field)` reads every input once, cheaply, and raises `DataError` naming the
file, line (or row) and field of the first problem, so that a bad record fails before hours of
tokenizing (a streamed dataset: its first row). `iter_texts` yields the documents and validates as it
reads (the same errors). zstandard is imported only when a .zst file is read.
"""

import gzip
import json
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
HUB_KEYS = {"dataset": None, "split": "train", "name": None, "data_files": None, "streaming": False}


class DataError(ValueError):
    """Bad input data; the message names the file, line or field."""


def suffix_of(path) -> str:
    name = Path(path).name
    return next((s for s in SUFFIXES if name.endswith(s)), Path(path).suffix)


def hub_spec(spec) -> dict:
    """A `datasets.load_dataset` input with its defaults filled in; unknown keys are errors."""
    unknown = set(spec) - set(HUB_KEYS)
    if unknown or not spec.get("dataset"):
        raise DataError(f"input {dict(spec)}: a dataset input has the keys {', '.join(HUB_KEYS)} "
                        f"(dataset required){'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}")
    return dict(HUB_KEYS, **spec)


def is_plain_folder(path: Path) -> bool:
    """A folder that `datasets` did not write (a folder of input files)."""
    return path.is_dir() and not any((path / f).exists() for f in ("dataset_info.json", "state.json",
                                                                   "dataset_dict.json"))


def expand_inputs(inputs: list) -> list:
    """Paths and dataset mappings, with every plain folder replaced by its files (sorted)."""
    expanded = []
    for item in inputs:
        if isinstance(item, dict):
            expanded.append(hub_spec(item))
            continue
        p = Path(item)
        if is_plain_folder(p):
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and suffix_of(f) in SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise DataError(f"{item}: a folder, but not a dataset saved by datasets' save_to_disk, "
                                f"and it holds no {', '.join(SUFFIXES)} file")
            expanded += files
        else:
            expanded.append(str(item))
    return expanded


def input_kind(path) -> str:
    if isinstance(path, dict):
        return "hub"
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists():
            return "dataset"
        if (p / "dataset_dict.json").exists():
            raise DataError(f"{path}: a DatasetDict; give the folder of one split, e.g. {p / 'train'}")
        raise DataError(f"{path}: a folder, but not a dataset saved by datasets' save_to_disk")
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if suffix_of(p) not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)} "
                        f"or a folder")
    return suffix_of(p)[1:]


def zst_lines(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a zstandard file (one or more frames), decompressed a chunk at a time."""
    import zstandard

    with open(path, "rb") as f:
        decompressor, pending, data = zstandard.ZstdDecompressor().decompressobj(), b"", f.read(chunk)
        while data:
            try:
                pending += decompressor.decompress(data)
            except zstandard.ZstdError as e:
                raise DataError(f"{path}: corrupt zst data ({e})") from None
            data = decompressor.unused_data + f.read(chunk) if decompressor.eof else f.read(chunk)
            if decompressor.eof and data:  # another frame follows
                decompressor = zstandard.ZstdDecompressor().decompressobj()
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
        if not decompressor.eof:
            raise DataError(f"{path}: truncated zst data (the file ends inside a frame)")
    if pending:
        yield pending


def compressed_lines(path: str, kind: str) -> Iterator[bytes]:
    if kind == "jsonl.zst":
        yield from zst_lines(path)
        return
    with (gzip.open if kind == "jsonl.gz" else open)(path, "rb") as f:
        try:
            yield from f
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gz data ({e})") from None


def jsonl_texts(path: str, text_field: str, kind: str = "jsonl") -> Iterator[str]:
    """The text of every record, each record validated as it is read."""
    for lineno, raw in enumerate(compressed_lines(path, kind), 1):
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


def load_hub(spec: dict):
    """`datasets.load_dataset(...)` of a dataset input: a Dataset, or an IterableDataset when streaming."""
    import datasets

    try:
        return datasets.load_dataset(spec["dataset"], spec["name"], split=spec["split"],
                                     data_files=spec["data_files"], streaming=spec["streaming"])
    except Exception as e:  # not found, no such split or config, unreachable Hub: the library's reason
        raise DataError(f"{hub_name(spec)}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def hub_name(spec: dict) -> str:
    return f"dataset {spec['dataset']!r} split {spec['split']!r}"


def streamed_texts(source, what: str, text_field: str) -> Iterator[str]:
    """Strings of column `text_field` of an IterableDataset, row by row as they arrive."""
    for row, record in enumerate(source):
        if text_field not in record:
            raise DataError(f"{what}: no column {text_field!r} (columns: {', '.join(map(repr, record))})")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{what}: row {row}: column {text_field!r} must hold strings, got "
                            f"{type(text).__name__}")
        yield text


def table_texts(path, kind: str, text_field: str) -> Iterator[str]:
    """Strings of column `text_field` of a parquet file, a saved dataset or a prepared `load_dataset`
    dataset, a record batch at a time."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        source = pq.ParquetFile(path)
        names = source.schema_arrow.names
    else:
        import datasets

        source = datasets.load_from_disk(path) if kind == "dataset" else load_hub(path)
        names = source.column_names
    what = hub_name(path) if kind == "hub" else path
    if text_field not in names:
        raise DataError(f"{what}: no column {text_field!r} (columns: {', '.join(map(repr, names))})")
    batches = (source.iter_batches(columns=[text_field], batch_size=1024) if kind == "parquet"
               else source.select_columns([text_field]).with_format("arrow").iter(1024))
    row = 0
    for batch in batches:
        column = batch.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{what}: column {text_field!r} must hold strings, got {column.type}")
        if column.null_count:
            first = row + column.is_null().to_pylist().index(True)
            raise DataError(f"{what}: row {first}: column {text_field!r} is null")
        yield from column.to_pylist()
        row += len(column)


def iter_texts(path, text_field: str = "text") -> Iterator[str]:
    """The document strings of one input (a file, a folder, a datasets folder or a dataset mapping), in
    order."""
    if not isinstance(path, dict) and is_plain_folder(Path(path)):
        for item in expand_inputs([path]):
            yield from iter_texts(item, text_field)
        return
    kind = input_kind(path)
    if kind == "hub":
        spec = hub_spec(path)
        if spec["streaming"]:
            yield from streamed_texts(load_hub(spec), hub_name(spec), text_field)
        else:
            yield from table_texts(spec, kind, text_field)
    elif kind == "txt":
        try:
            yield Path(path).read_bytes().decode("utf-8")  # exact: no newline translation
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    elif kind.startswith("jsonl"):
        yield from jsonl_texts(path, text_field, kind)
    else:
        yield from table_texts(path, kind, text_field)


def check_inputs(paths: list, text_field: str = "text") -> int:
    """Validate every input (see module docstring; folders expanded); returns the number of documents
    checked. A streamed dataset is checked on its first row only (reading it all twice would double the
    download): a bad row further on fails during tokenization, which writes nothing partial."""
    if not paths:
        raise DataError("no input files given")
    paths = expand_inputs(paths)
    for path in paths:  # cheap checks on all files first: a missing last file fails at once
        input_kind(path)
    return sum(sum(1 for _ in (islice(iter_texts(path, text_field), 1) if is_streamed(path)
                               else iter_texts(path, text_field))) for path in paths)


def is_streamed(path) -> bool:
    return isinstance(path, dict) and bool(path["streaming"])

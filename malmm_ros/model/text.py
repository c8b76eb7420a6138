"""Descriptions in words: the last step's queries, projected, prompt a small frozen causal LM.

As in MA-LMM, the Q-Former's query outputs [B, Q, D] go through one linear projection into the
LLM's embedding space and are put before the embedded prompt; the LLM then writes the rest.
Only the projector (and, in training, the Q-Former behind it) learns; the LLM stays frozen.

Any local Hugging Face causal LM folder works (SmolLM2, Qwen2.5, a Llama), and so does a GGUF
file (llama.cpp's format; checked whole first, model/gguf_file.py, then de-quantized by
transformers). Both are read with `local_files_only` and the hub's offline switches set, so
nothing is ever downloaded, and with `trust_remote_code` off, so no code from them runs.
transformers is imported only when a describer is loaded: the node and the core stay quick to
import with text off.

Instruct models (a tokenizer with a chat template) get their template: the projected queries
sit at the start of the user turn, the prompt after them, and the assistant turn is opened for
the answer. With grounding (text.grounding, on by default) the prompt also names the current
top-5 verbs and nouns in words, so a description says something about what the node predicts
even before a projector is trained; MA-LMM's soft prompt (the queries) stays in front of it.

Classes read leaf to root: projector, description record, describer.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.stamps import stamp_dict

__all__ = [
    'DEFAULT_PROMPT',
    'DESCRIPTION_SCHEMA',
    'Description',
    'GenerationOptions',
    'Grounding',
    'TextDescriber',
    'TextProjector',
    'llm_name',
    'offline_transformers',
]

_log = logging.getLogger(__name__)

DESCRIPTION_SCHEMA = 'malmm_ros/description/v1'
DEFAULT_PROMPT = 'Describe what happens next:'
IGNORE_INDEX = -100  # label of positions the loss skips (queries, prompt, padding)
_UNTRAINED_SEED = 0  # an untrained projector is random but the same from run to run
# Read by huggingface_hub and transformers when they are first imported.
_OFFLINE_VARIABLES = ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')
# What from_pretrained raises for a folder that holds no usable model or tokenizer.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
                ImportError)


class TextProjector(nn.Module):
    """Q-Former query outputs [B, Q, D] -> LLM input embeddings [B, Q, H].

    It remembers which LLM it was trained for (name, hidden size) and with which prompt, so a
    checkpoint can refuse to drive a different LLM.
    """

    def __init__(self, qformer_hidden_size: int, llm_hidden_size: int, *, llm_name: str,
                 prompt: str = DEFAULT_PROMPT, source: str = '', llm_sha256: str = '') -> None:
        super().__init__()
        self.proj = nn.Linear(qformer_hidden_size, llm_hidden_size)
        self.llm_name = llm_name
        self.llm_sha256 = llm_sha256  # of a GGUF file's bytes ('' for a model folder)
        self.prompt = prompt
        self.source = source  # the checkpoint it was read from, for error messages

    @classmethod
    def untrained(cls, qformer_hidden_size: int, llm_hidden_size: int, *, llm_name: str,
                  prompt: str = DEFAULT_PROMPT, seed: int = _UNTRAINED_SEED,
                  llm_sha256: str = '') -> TextProjector:
        """A randomly initialised projector, the same for the same seed (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(qformer_hidden_size, llm_hidden_size, llm_name=llm_name, prompt=prompt,
                       llm_sha256=llm_sha256)

    @property
    def qformer_hidden_size(self) -> int:
        return self.proj.in_features

    @property
    def llm_hidden_size(self) -> int:
        return self.proj.out_features

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights."""
        stored = {'llm_name': self.llm_name, 'llm_hidden_size': self.llm_hidden_size,
                  'qformer_hidden_size': self.qformer_hidden_size, 'prompt': self.prompt}
        if self.llm_sha256:
            stored['llm_sha256'] = self.llm_sha256
        return stored

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.proj(queries.to(self.proj.weight.dtype))


@dataclass(frozen=True)
class Description:
    """One description of the memory after the frame stamped `stamp_ns`."""

    text: str
    num_tokens: int  # generated tokens, end-of-text excluded
    latency_ms: float  # projection, generation and decoding
    model: str  # the LLM's name
    trained: bool  # False: the projector is untrained and the text meaningless
    stamp_ns: int = 0
    frame_id: str = ''
    grounding: Grounding | None = None  # the prediction its prompt named, if any

    def to_dict(self) -> dict[str, Any]:
        """The v1 JSON object published on /malmm/description."""
        return {
            'schema': DESCRIPTION_SCHEMA,
            'stamp': stamp_dict(self.stamp_ns),
            'frame_id': self.frame_id,
            'text': self.text,
            'num_tokens': self.num_tokens,
            'latency_ms': round(self.latency_ms, 3),
            'model': self.model,
            'trained': self.trained,
            'grounding': self.grounding.to_dict() if self.grounding is not None else None,
        }


_MAX_LABEL_CHARS = 48  # a label name longer than this is cut in the prompt
_PLACEHOLDER = re.compile(r'(verb|noun)_\d+')  # LabelMaps.placeholder's names: no words


def label_words(name: str) -> str:
    """A label as words: EK-100's 'board:chopping' -> 'chopping board', 'turn-on' -> 'turn on';
    printable characters only, at most _MAX_LABEL_CHARS (label files are input too); '' for
    a placeholder name (verb_012), which says nothing about the action."""
    if _PLACEHOLDER.fullmatch(str(name)):
        return ''
    parts = [part.replace('-', ' ').replace('_', ' ') for part in str(name).split(':')]
    words = ' '.join(' '.join(reversed(parts)).split())
    return ''.join(ch for ch in words if ch.isprintable())[:_MAX_LABEL_CHARS].strip()


@dataclass(frozen=True)
class Grounding:
    """The prediction a description is about: its top verbs and nouns, best first."""

    verbs: tuple[str, ...]
    nouns: tuple[str, ...]

    @classmethod
    def from_prediction(cls, prediction: Any, k: int = 5) -> Grounding:
        """From a malmm_ros.pipeline.Prediction's top-k verbs and nouns."""
        return cls(verbs=tuple(label_words(c.name) for c in prediction.verbs[:k]),
                   nouns=tuple(label_words(c.name) for c in prediction.nouns[:k]))

    def sentence(self) -> str:
        """The prediction in words, for the prompt ('' when there is nothing to name)."""
        verbs = [v for v in self.verbs if v]
        nouns = [n for n in self.nouns if n]
        if not verbs or not nouns:
            return ''
        # The best action last, right before the request: a 135M model follows what it read
        # last (the top-1 noun then appears in ~95 % of SmolLM2-135M's answers, ~60 % when the
        # lists come last).
        return (f'Predicted next actions, most likely first. Verbs: {", ".join(verbs)}. '
                f'Objects: {", ".join(nouns)}. The person will most likely {verbs[0]} the '
                f'{nouns[0]}.')

    def to_dict(self) -> dict[str, list[str]]:
        return {'verbs': list(self.verbs), 'nouns': list(self.nouns)}


@dataclass(frozen=True)
class GenerationOptions:
    """How a description is written; validated once, replaced whole (never mutated)."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 24
    decoding: str = 'greedy'  # greedy | beam
    num_beams: int = 3  # used by beam decoding only
    grounding: bool = True  # name the prediction's top verbs and nouns in the prompt

    def __post_init__(self) -> None:
        if self.decoding not in ('greedy', 'beam'):
            raise ConfigError(f"text.decoding must be 'greedy' or 'beam', got {self.decoding!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f'text.max_new_tokens must be at least 1, got '
                              f'{self.max_new_tokens}')
        if self.decoding == 'beam' and self.num_beams < 2:
            raise ConfigError(f'text.num_beams must be at least 2 for beam decoding, got '
                              f'{self.num_beams}')

    @classmethod
    def from_config(cls, text: Any) -> GenerationOptions:
        """From a malmm_ros.config.TextConfig."""
        return cls(prompt=text.prompt, max_new_tokens=text.max_new_tokens,
                   decoding=text.decoding, num_beams=text.num_beams,
                   grounding=text.grounding)


def llm_name(model_path: str | os.PathLike) -> str:
    """A readable name for a model folder: 'org/name' inside a hub cache, else the folder name.

    The hub cache keeps models under models--org--name/snapshots/<commit>/, whose last part
    says nothing.
    """
    path = Path(model_path).expanduser().resolve()
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == 'snapshots' and parts[-3].startswith('models--'):
        return parts[-3][len('models--'):].replace('--', '/')
    return path.name


def offline_transformers() -> Any:
    """Import transformers with the hub forced offline (set before the import reads them)."""
    for variable in _OFFLINE_VARIABLES:
        os.environ[variable] = '1'
    import transformers

    return transformers


@dataclass(frozen=True)
class ModelSource:
    """Where an LLM is read from: a Hugging Face folder, or a GGUF file in `folder`."""

    folder: Path
    name: str
    gguf_file: str = ''  # the file's name in `folder`; '' for a model folder
    sha256: str = ''  # of the GGUF file

    def pretrained_kwargs(self) -> dict[str, Any]:
        """from_pretrained's arguments besides the folder: offline, no code from the model."""
        kwargs: dict[str, Any] = {'local_files_only': True, 'trust_remote_code': False}
        if self.gguf_file:
            kwargs['gguf_file'] = self.gguf_file
        return kwargs


def model_source(model_path: str | os.PathLike) -> ModelSource:
    """What text.model_path names, checked: a .gguf file (model/gguf_file.py reads its header,
    tensors' extents and metadata name, and hashes it) or a Hugging Face model folder."""
    from malmm_ros.model.gguf_file import GGUF_SUFFIX, inspect_gguf

    if str(model_path).strip() and str(model_path).strip().lower().endswith(GGUF_SUFFIX):
        info = inspect_gguf(model_path)
        return ModelSource(folder=info.path.parent, name=info.name, gguf_file=info.path.name,
                           sha256=info.sha256)
    path = _check_model_folder(model_path)
    return ModelSource(folder=path, name=llm_name(path))


def _check_model_folder(model_path: str | os.PathLike) -> Path:
    """The folder as a Path, or a clear error for an empty, missing or non-model path."""
    if not str(model_path).strip():
        raise ConfigError('text.model_path is empty; set it to a local .gguf file or Hugging '
                          'Face model folder (config.json, weights and tokenizer)')
    path = Path(model_path).expanduser()
    if not path.exists():
        raise CheckpointError(f'text.model_path {path} does not exist (models are never '
                              'downloaded: give a local .gguf file or Hugging Face model '
                              'folder)')
    if not path.is_dir():
        raise CheckpointError(f'text.model_path {path} is neither a .gguf file nor a folder; '
                              'give a GGUF file or a Hugging Face model folder (config.json, '
                              'weights and tokenizer)')
    if not (path / 'config.json').is_file():
        raise CheckpointError(f'text.model_path {path} has no config.json: not a Hugging Face '
                              'model folder')
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class TextDescriber:
    """A frozen causal LM, its tokenizer and a projector: queries in, words out.

    Build with `TextDescriber.load`. `describe`/`generate` for one stream's queries [1, Q, D];
    `caption_loss` for training the projector (and what feeds it) on reference texts.
    `options` may be replaced at any time by a new GenerationOptions (read once per call).
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, projector: TextProjector, *, name: str,
                 options: GenerationOptions, trained: bool, sha256: str = '') -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.projector = projector
        self.name = name
        self.sha256 = sha256  # of a GGUF file; '' for a model folder
        # Instruct models: the prompt goes in a user turn of their chat template.
        self.chat = bool(getattr(tokenizer, 'chat_template', None))
        self.options = options
        self.trained = trained
        self.device = next(llm.parameters()).device
        self.dtype = next(llm.parameters()).dtype
        self._embed = llm.get_input_embeddings()
        eos = llm.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        if eos is None:
            raise CheckpointError(f'LLM {name}: neither its generation config nor its tokenizer '
                                  'names an end-of-text token')
        self._eos_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self._eos_ids[0]
        self._keeps_logits = 'logits_to_keep' in inspect.signature(llm.forward).parameters

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike,
        hidden_size: int,
        *,
        projector: TextProjector | None = None,
        options: GenerationOptions | None = None,
        device: str | torch.device = 'cpu',
    ) -> TextDescriber:
        """Load the LLM folder at `model_path` for a Q-Former of width `hidden_size`.

        `projector` is a trained one (from a checkpoint, see
        malmm_ros.model.checkpoint.load_text_projector); it must have been trained for this
        LLM and this Q-Former width. Without one, a seeded untrained projector is used (and
        warned about): the words then mean nothing. fp16 on CUDA, fp32 on CPU.
        """
        options = options or GenerationOptions()
        source = model_source(model_path)
        path = source.folder / source.gguf_file if source.gguf_file else source.folder
        name = source.name
        device = torch.device(device)
        dtype = torch.float16 if device.type == 'cuda' else torch.float32
        transformers = offline_transformers()
        kwargs = source.pretrained_kwargs()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.folder), **kwargs)
            llm = transformers.AutoModelForCausalLM.from_pretrained(
                str(source.folder), dtype=dtype, **kwargs)
        except _LOAD_ERRORS as exc:
            raise CheckpointError(f'text.model_path {path}: cannot load a causal language '
                                  f'model and its tokenizer: {_first_line(exc)}') from None
        llm.to(device).eval().requires_grad_(False)
        llm_hidden = llm.get_input_embeddings().embedding_dim
        if projector is None:
            _log.warning('no trained text projector (the checkpoint has none): descriptions '
                         'come from a random projection and mean nothing')
            projector = TextProjector.untrained(hidden_size, llm_hidden, llm_name=name,
                                                prompt=options.prompt, llm_sha256=source.sha256)
            trained = False
        else:
            _check_projector(projector, hidden_size, llm_hidden, name, source.sha256)
            if projector.prompt != options.prompt:
                _log.warning('text.prompt %r differs from the prompt the projector was trained '
                             'with (%r)', options.prompt, projector.prompt)
            trained = True
        projector.to(device=device, dtype=torch.float32)
        return cls(llm, tokenizer, projector, name=name, options=options, trained=trained,
                   sha256=source.sha256)

    @classmethod
    def from_config(cls, config: Any, *, projector: TextProjector | None = None
                    ) -> TextDescriber:
        """Load what a malmm_ros.config.AnticipateConfig's text group names, on its device."""
        return cls.load(config.text.model_path, config.model.hidden_size, projector=projector,
                        options=GenerationOptions.from_config(config.text), device=config.device)

    # -- inputs ----------------------------------------------------------------------------

    @staticmethod
    def prompt_text(prompt: str, grounding: Grounding | None = None) -> str:
        """The words after the queries: the prediction named (with grounding), the prompt."""
        named = grounding.sentence() if grounding is not None else ''
        return ' '.join(part for part in (named, prompt) if part)

    def _token_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the queries.

        Chat models: their template around one user turn [queries ; prompt], the assistant
        turn opened. Others: nothing before, the prompt with the tokenizer's own special tokens
        (a BOS for models that use one) after.
        """
        if not self.chat:
            return [], (self.tokenizer(prompt, add_special_tokens=True)['input_ids']
                        if prompt else [])
        marker = '\x00queries\x00'  # no template or tokenizer produces it by itself
        rendered = self.tokenizer.apply_chat_template(
            [{'role': 'user', 'content': marker + prompt}], tokenize=False,
            add_generation_prompt=True)
        before, found, after = rendered.partition(marker)
        if not found:
            raise CheckpointError(f'LLM {self.name}: its chat template drops the user message')
        encode = self.tokenizer
        return (encode(before, add_special_tokens=False)['input_ids'],
                encode(after, add_special_tokens=False)['input_ids'])

    def _prefix(self, queries: torch.Tensor, prompt: str) -> torch.Tensor:
        """[before ; projected queries ; after] embedded: [B, L, H] in the LLM's dtype."""
        projected = self.projector(queries.to(self.device)).to(self.dtype)  # (B, Q, H)
        parts = []
        before, after = self._token_ids(prompt)
        for ids in (before, None, after):
            if ids is None:
                parts.append(projected)
            elif ids:
                ids = torch.tensor(ids, dtype=torch.long, device=self.device)
                embeds = self._embed(ids)[None].expand(projected.shape[0], -1, -1)
                parts.append(embeds.to(self.dtype))  # (B, P, H)
        return torch.cat(parts, dim=1) if len(parts) > 1 else projected

    # -- generation ------------------------------------------------------------------------

    def describe(self, queries: torch.Tensor) -> str:
        """Words for one stream's query outputs [1, Q, D]."""
        description = self.generate(queries)
        assert description is not None  # only a cancel callback can end it early
        return description.text

    def generate(self, queries: torch.Tensor, *, stamp_ns: int = 0, frame_id: str = '',
                 cancel: Callable[[], bool] | None = None,
                 grounding: Grounding | None = None) -> Description | None:
        """A Description of one stream's query outputs [1, Q, D] (or [Q, D]).

        `grounding`: the prediction these queries made; its top verbs and nouns are named in
        the prompt when options.grounding is on. `cancel` is polled after every token; once it
        returns True generation stops and the result is None (a node shutting down need not
        wait for a long description).
        """
        if queries.dim() == 2:
            queries = queries[None]
        if queries.dim() != 3 or queries.shape[0] != 1:
            raise ValueError(f'expected query outputs of shape [1, Q, D], got '
                             f'{tuple(queries.shape)}')
        options = self.options  # one read: a concurrent replacement applies to the next call
        start = time.perf_counter()
        transformers = offline_transformers()
        config = transformers.GenerationConfig(
            max_new_tokens=options.max_new_tokens, do_sample=False,
            num_beams=options.num_beams if options.decoding == 'beam' else 1,
            eos_token_id=self._eos_ids, pad_token_id=self._pad_id)
        if not options.grounding:
            grounding = None
        with torch.inference_mode():
            embeds = self._prefix(queries, self.prompt_text(options.prompt, grounding))
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            # With embeddings only, a decoder-only model returns just the new tokens.
            stopping = _cancel_criteria(transformers, cancel) if cancel is not None else None
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                                    generation_config=config, stopping_criteria=stopping)
        if cancel is not None and cancel():
            return None
        tokens = out[0].tolist()
        stops = set(self._eos_ids) | {self._pad_id}
        end = next((i for i, token in enumerate(tokens) if token in stops), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        # One line of printable text: runs of whitespace become one space, control bytes that
        # a byte-level tokenizer can produce go.
        text = ' '.join(''.join(ch for ch in text if ch.isprintable() or ch.isspace()).split())
        latency_ms = (time.perf_counter() - start) * 1e3
        return Description(text=text, num_tokens=end, latency_ms=latency_ms,
                           model=self.name, trained=self.trained, stamp_ns=int(stamp_ns),
                           frame_id=frame_id, grounding=grounding)

    # -- training --------------------------------------------------------------------------

    def caption_loss(self, queries: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Teacher-forced cross-entropy of `texts` after [queries ; prompt], a scalar.

        queries [B, Q, D], one reference text per row. Only the text's tokens (and the
        end-of-text that follows, so the model learns to stop) are scored; query and prompt
        positions and padding are labelled IGNORE_INDEX. Texts are cut at
        options.max_new_tokens tokens, the longest a description can be. Gradients reach the
        projector and `queries`; the LLM's weights are frozen.
        """
        if queries.dim() != 3 or queries.shape[0] != len(texts):
            raise ValueError(f'expected queries [B, Q, D] with one text per row, got '
                             f'{tuple(queries.shape)} and {len(texts)} texts')
        if not texts:
            raise ValueError('caption_loss needs at least one text')
        options = self.options
        prefix = self._prefix(queries, options.prompt)  # (B, L0, H)
        batch, prefix_len = prefix.shape[:2]
        rows = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)['input_ids']
            if len(ids) < options.max_new_tokens:
                ids = ids + [self._eos_ids[0]]
            rows.append(ids[:options.max_new_tokens])
        length = max(len(ids) for ids in rows)
        target = torch.full((batch, length), self._pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((batch, length), dtype=torch.bool, device=self.device)
        for i, ids in enumerate(rows):
            target[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            valid[i, :len(ids)] = True
        embeds = torch.cat([prefix, self._embed(target).to(self.dtype)], dim=1)  # (B, L0+T, H)
        mask = torch.cat([torch.ones((batch, prefix_len), dtype=torch.long, device=self.device),
                          valid.long()], dim=1)
        labels = target.masked_fill(~valid, IGNORE_INDEX)  # (B, T)
        # Position L0 - 1 + t predicts target token t: only the last T + 1 positions' logits
        # are needed, which spares a [B, L, vocab] tensor when the model can skip the rest.
        if self._keeps_logits:
            logits = self.llm(inputs_embeds=embeds, attention_mask=mask,
                              logits_to_keep=length + 1).logits
        else:
            logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        logits = logits[:, -(length + 1):-1].float()  # (B, T, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)


def _cancel_criteria(transformers: Any, cancel: Callable[[], bool]) -> Any:
    """A transformers StoppingCriteriaList that ends generation once cancel() is True."""

    class Cancelled(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor,
                     **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), bool(cancel()), dtype=torch.bool,
                              device=input_ids.device)

    return transformers.StoppingCriteriaList([Cancelled()])


def _check_projector(projector: TextProjector, hidden_size: int, llm_hidden: int,
                     name: str, sha256: str = '') -> None:
    """A projector trained for another LLM or Q-Former width is a clear error."""
    source = projector.source or 'the checkpoint'
    problems = []
    if projector.llm_name != name:
        problems.append(f'it was trained for LLM {projector.llm_name!r}, text.model_path holds '
                        f'{name!r}')
    if projector.llm_sha256 and sha256 and projector.llm_sha256 != sha256:
        problems.append(f'it was trained for the GGUF file with sha256 '
                        f'{projector.llm_sha256[:12]}..., text.model_path has {sha256[:12]}...')
    if projector.llm_hidden_size != llm_hidden:
        problems.append(f'LLM hidden size {projector.llm_hidden_size} vs {llm_hidden} of {name!r}')
    if projector.qformer_hidden_size != hidden_size:
        problems.append(f'Q-Former width {projector.qformer_hidden_size} vs model.hidden_size '
                        f'{hidden_size}')
    if problems:
        raise CheckpointError(f'text projector of {source} does not fit: ' + '; '.join(problems))

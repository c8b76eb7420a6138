"""Descriptions in words: the last step's queries, projected, prompt a small frozen causal LM.

As in MA-LMM, the Q-Former's query outputs [B, Q, D] go through one linear projection into the
LLM's embedding space and are put before the embedded prompt; the LLM then writes the rest.
Only the projector (and, in training, the Q-Former behind it) learns; the LLM stays frozen.

Any local Hugging Face causal LM folder works (SmolLM2, Qwen2.5, a Llama). It is read with
`local_files_only` and the hub's offline switches set, so nothing is ever downloaded, and with
`trust_remote_code` off, so no code from the folder runs. transformers is imported only when a
describer is loaded: the node and the core stay quick to import with text off.

Classes read leaf to root: projector, description record, describer.
"""

from __future__ import annotations

import inspect
import logging
import os
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
                 prompt: str = DEFAULT_PROMPT, source: str = '') -> None:
        super().__init__()
        self.proj = nn.Linear(qformer_hidden_size, llm_hidden_size)
        self.llm_name = llm_name
        self.prompt = prompt
        self.source = source  # the checkpoint it was read from, for error messages

    @classmethod
    def untrained(cls, qformer_hidden_size: int, llm_hidden_size: int, *, llm_name: str,
                  prompt: str = DEFAULT_PROMPT, seed: int = _UNTRAINED_SEED) -> TextProjector:
        """A randomly initialised projector, the same for the same seed (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(qformer_hidden_size, llm_hidden_size, llm_name=llm_name, prompt=prompt)

    @property
    def qformer_hidden_size(self) -> int:
        return self.proj.in_features

    @property
    def llm_hidden_size(self) -> int:
        return self.proj.out_features

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights."""
        return {'llm_name': self.llm_name, 'llm_hidden_size': self.llm_hidden_size,
                'qformer_hidden_size': self.qformer_hidden_size, 'prompt': self.prompt}

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
        }


@dataclass(frozen=True)
class GenerationOptions:
    """How a description is written; validated once, replaced whole (never mutated)."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 24
    decoding: str = 'greedy'  # greedy | beam
    num_beams: int = 3  # used by beam decoding only

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
                   decoding=text.decoding, num_beams=text.num_beams)


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


def _check_model_folder(model_path: str | os.PathLike) -> Path:
    """The folder as a Path, or a clear error for an empty, missing or non-model path."""
    if not str(model_path).strip():
        raise ConfigError('text.model_path is empty; set it to a local Hugging Face model '
                          'folder (config.json, weights and tokenizer)')
    path = Path(model_path).expanduser()
    if not path.exists():
        raise CheckpointError(f'text.model_path {path} does not exist (models are never '
                              'downloaded: give a local Hugging Face model folder)')
    if not path.is_dir():
        raise CheckpointError(f'text.model_path {path} is not a folder; give a Hugging Face '
                              'model folder (config.json, weights and tokenizer)')
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
                 options: GenerationOptions, trained: bool) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.projector = projector
        self.name = name
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
        path = _check_model_folder(model_path)
        name = llm_name(path)
        device = torch.device(device)
        dtype = torch.float16 if device.type == 'cuda' else torch.float32
        transformers = offline_transformers()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False)
            llm = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, dtype=dtype)
        except _LOAD_ERRORS as exc:
            raise CheckpointError(f'text.model_path {path}: cannot load a causal language '
                                  f'model and its tokenizer: {_first_line(exc)}') from None
        llm.to(device).eval().requires_grad_(False)
        llm_hidden = llm.get_input_embeddings().embedding_dim
        if projector is None:
            _log.warning('no trained text projector (the checkpoint has none): descriptions '
                         'come from a random projection and mean nothing')
            projector = TextProjector.untrained(hidden_size, llm_hidden, llm_name=name,
                                                prompt=options.prompt)
            trained = False
        else:
            _check_projector(projector, hidden_size, llm_hidden, name)
            if projector.prompt != options.prompt:
                _log.warning('text.prompt %r differs from the prompt the projector was trained '
                             'with (%r)', options.prompt, projector.prompt)
            trained = True
        projector.to(device=device, dtype=torch.float32)
        return cls(llm, tokenizer, projector, name=name, options=options, trained=trained)

    @classmethod
    def from_config(cls, config: Any, *, projector: TextProjector | None = None
                    ) -> TextDescriber:
        """Load what a malmm_ros.config.AnticipateConfig's text group names, on its device."""
        return cls.load(config.text.model_path, config.model.hidden_size, projector=projector,
                        options=GenerationOptions.from_config(config.text), device=config.device)

    # -- inputs ----------------------------------------------------------------------------

    def _prefix(self, queries: torch.Tensor, prompt: str) -> torch.Tensor:
        """[projected queries ; embedded prompt]: [B, Q + P, H] in the LLM's dtype."""
        projected = self.projector(queries.to(self.device)).to(self.dtype)  # (B, Q, H)
        # The tokenizer's own special tokens (a BOS for models that use one) start the prompt.
        ids = self.tokenizer(prompt, add_special_tokens=True)['input_ids'] if prompt else []
        if not ids:
            return projected
        ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        prompt_embeds = self._embed(ids)[None].expand(projected.shape[0], -1, -1)  # (B, P, H)
        return torch.cat([projected, prompt_embeds.to(self.dtype)], dim=1)

    # -- generation ------------------------------------------------------------------------

    def describe(self, queries: torch.Tensor) -> str:
        """Words for one stream's query outputs [1, Q, D]."""
        description = self.generate(queries)
        assert description is not None  # only a cancel callback can end it early
        return description.text

    def generate(self, queries: torch.Tensor, *, stamp_ns: int = 0, frame_id: str = '',
                 cancel: Callable[[], bool] | None = None) -> Description | None:
        """A Description of one stream's query outputs [1, Q, D] (or [Q, D]).

        `cancel` is polled after every token; once it returns True generation stops and the
        result is None (a node shutting down need not wait for a long description).
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
        with torch.inference_mode():
            embeds = self._prefix(queries, options.prompt)  # (1, L, H)
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
                           frame_id=frame_id)

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
                     name: str) -> None:
    """A projector trained for another LLM or Q-Former width is a clear error."""
    source = projector.source or 'the checkpoint'
    problems = []
    if projector.llm_name != name:
        problems.append(f'it was trained for LLM {projector.llm_name!r}, text.model_path holds '
                        f'{name!r}')
    if projector.llm_hidden_size != llm_hidden:
        problems.append(f'LLM hidden size {projector.llm_hidden_size} vs {llm_hidden} of {name!r}')
    if projector.qformer_hidden_size != hidden_size:
        problems.append(f'Q-Former width {projector.qformer_hidden_size} vs model.hidden_size '
                        f'{hidden_size}')
    if problems:
        raise CheckpointError(f'text projector of {source} does not fit: ' + '; '.join(problems))

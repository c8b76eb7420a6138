"""Checkpoints: safetensors weights with JSON metadata in the same file's header.

The header's "malmm_ros" entry holds the model architecture, the label maps (EK-100 ids and
names) and training information, so loading rebuilds the model from the file alone. Nothing is
ever unpickled. One file keeps the weights and the labels they were trained with together.

A checkpoint may also carry a text projector (malmm_ros.model.text): its tensors live under
"text_projector." and its metadata (the LLM's name and hidden size, the prompt) under
"text_projector" in the header. The main model's loading ignores them.

An untrained checkpoint (`save_untrained_checkpoint`, malmm-export checkpoint --untrained)
holds the seeded random model the pipeline runs without one, marked "untrained" in its training
section, so tools can be smoke-tested before any training and still say the numbers mean
nothing (`checkpoint_is_trained`). Loading refuses NaN or infinite weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from malmm_ros.config import AnticipateConfig, ModelConfig, model_preset
from malmm_ros.errors import CheckpointError, ConfigError, DataError
from malmm_ros.files import json_metadata, write_atomically
from malmm_ros.labels import LabelMaps, load_class_csv
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.text import TextProjector

__all__ = ['CHECKPOINT_FORMAT', 'TEXT_PROJECTOR_PREFIX', 'UNTRAINED_SEED',
           'checkpoint_is_trained', 'is_trained', 'load_checkpoint', 'load_text_projector',
           'read_checkpoint_metadata', 'save_checkpoint', 'save_untrained_checkpoint',
           'untrained_model']

CHECKPOINT_FORMAT = 'malmm_ros/checkpoint/v1'
_HEADER_KEY = 'malmm_ros'
TEXT_PROJECTOR_PREFIX = 'text_projector.'  # tensor names of the optional text projector
_PROJECTOR_KEY = 'text_projector'  # its metadata section
UNTRAINED_SEED = 0  # untrained weights are random but the same from run to run
_UNTRAINED_KEY = 'untrained'  # true in the training section of a checkpoint nobody trained


def save_checkpoint(
    path: str | os.PathLike, model: MalmmModel, *, training: dict[str, Any] | None = None,
    text_projector: TextProjector | None = None,
) -> Path:
    """Write the model's weights and metadata (and a text projector's); the file is replaced
    atomically."""
    path = Path(path)
    metadata = {
        'format': CHECKPOINT_FORMAT,
        'model': {'preset': model.config.preset, **model.config.architecture()},
        'feature_dim': model.feature_dim,
        'num_tokens': model.num_tokens,
        'labels': model.labels.to_dict(),
        'training': training or {},
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if text_projector is not None:
        if text_projector.qformer_hidden_size != model.config.hidden_size:
            raise ValueError(f'text projector takes width {text_projector.qformer_hidden_size}, '
                             f'the model\'s Q-Former is {model.config.hidden_size} wide')
        metadata[_PROJECTOR_KEY] = text_projector.metadata()
        tensors.update({TEXT_PROJECTOR_PREFIX + name: t.detach().float().cpu().contiguous()
                        for name, t in text_projector.state_dict().items()})
    with write_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(metadata)})
    return path


def untrained_model(config: AnticipateConfig) -> MalmmModel:
    """The seeded untrained model of `config.model` (eval mode, CPU), named by the EK-100 class
    CSVs of `config.labels`, else by placeholders: what runs when no checkpoint is set."""
    verb_csv, noun_csv = config.labels.verb_classes, config.labels.noun_classes
    placeholder = LabelMaps.placeholder()
    verbs = load_class_csv(verb_csv, kind='verb') if verb_csv else placeholder.verbs
    nouns = load_class_csv(noun_csv, kind='noun') if noun_csv else placeholder.nouns
    labels = LabelMaps(verbs=verbs, nouns=nouns)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(UNTRAINED_SEED)
        return MalmmModel(config.model, labels).eval()


def save_untrained_checkpoint(path: str | os.PathLike, config: AnticipateConfig) -> Path:
    """Write `untrained_model(config)` as a checkpoint marked untrained.

    Its training section also records the config's memory length and sampling rate, so the
    evaluation tools run it with the protocol of the config it was made from.
    """
    training: dict[str, Any] = {_UNTRAINED_KEY: True, 'seed': UNTRAINED_SEED,
                                'memory_bank_length': config.memory_bank_length}
    if config.sample_fps > 0:  # 0 (every frame) is no protocol rate
        training['sample_fps'] = config.sample_fps
    return save_checkpoint(path, untrained_model(config), training=training)


def is_trained(metadata: dict[str, Any]) -> bool:
    """False for the metadata of an untrained checkpoint (save_untrained_checkpoint)."""
    training = metadata.get('training')
    return not (isinstance(training, dict) and training.get(_UNTRAINED_KEY) is True)


def checkpoint_is_trained(path: str | os.PathLike) -> bool:
    """False for an untrained checkpoint; reads the header only (CheckpointError as
    read_checkpoint_metadata)."""
    return is_trained(read_checkpoint_metadata(path))


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, checked for format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with safe_open(str(path), framework='pt') as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f'checkpoint {path} is not a readable safetensors file: {exc}'
                              ) from None
    return json_metadata(header, key=_HEADER_KEY, expected_format=CHECKPOINT_FORMAT,
                         where=f'checkpoint {path}', error=CheckpointError,
                         missing='was it written by malmm_ros.model.checkpoint.save_checkpoint?')


def load_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    device: str | torch.device = 'cpu',
) -> MalmmModel:
    """Rebuild a model from a checkpoint, in eval mode.

    With `config`, its architecture must equal the checkpoint's; a mismatch names each field.
    """
    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    stored = metadata.get('model')
    if not isinstance(stored, dict):
        raise CheckpointError(f'checkpoint {path}: metadata has no "model" section')
    # Checkpoints from before the age code, the order bias or the value decays lack those keys:
    # they ran without. Those with value decays but no decay_channels kept them after each
    # head's value channels (the first layout).
    stored = {'time_features': 0, 'order_bias': False, 'value_decays': 0, **stored}
    if 'decay_channels' not in stored and stored['value_decays']:
        stored['decay_channels'] = 'extra'
    try:
        arch = model_preset(stored.get('preset', 'edge'),
                            **{k: v for k, v in stored.items() if k != 'preset'})
        labels = LabelMaps.from_dict(metadata.get('labels', {}), source=f'{path} labels')
    except (ConfigError, DataError, TypeError) as exc:
        raise CheckpointError(f'checkpoint {path}: bad metadata: {exc}') from None
    dims = {}
    for name, default in (('feature_dim', 1280), ('num_tokens', 49)):
        value = metadata.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f'checkpoint {path}: bad metadata: {name} must be a positive '
                                  f'integer, got {value!r}')
        dims[name] = value
    if config is not None:
        diffs = config.architecture_differences(arch, 'checkpoint')
        if diffs:
            wanted, found = config.architecture(), arch.architecture()
            hint = ''
            # As YAML spells them: 0 and false.
            older = [f'model.{name}: {str(found[name]).lower()}'
                     for name in ('time_features', 'order_bias', 'value_decays')
                     if not found[name] and wanted[name]]
            if found['value_decays'] and found['decay_channels'] == 'extra' \
                    and wanted['decay_channels'] == 'shared':
                older.append('model.decay_channels: extra')
            if older:
                hint = ('; it was trained with an older time encoding: set '
                        + ', '.join(older) + ' to run it, or train it again')
            raise CheckpointError(f'checkpoint {path} does not match the config: '
                                  + '; '.join(diffs) + hint)
        arch = config  # keep the run-time switches of the caller's config
    model = MalmmModel(arch, labels, **dims)
    state = _read_tensors(path, lambda name: not name.startswith(TEXT_PROJECTOR_PREFIX))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f'{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}'
              for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f'missing {missing[:5]}')
        if unexpected:
            parts.append(f'unexpected {unexpected[:5]}')
        if shapes:
            parts.append(f'wrong shapes {shapes[:5]}')
        raise CheckpointError(f'checkpoint {path} does not fit its model: ' + '; '.join(parts))
    model.load_state_dict(state)
    return model.to(device).eval()


def load_text_projector(path: str | os.PathLike) -> TextProjector | None:
    """The text projector a checkpoint carries (float32, CPU), or None if it has none.

    Its metadata must be complete and its weights must have the shapes it states; the LLM it
    was trained for is checked when a describer loads it (TextDescriber.load).
    """
    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    stored = metadata.get(_PROJECTOR_KEY)
    if stored is None:
        return None
    fields = {'llm_name': str, 'llm_hidden_size': int, 'qformer_hidden_size': int, 'prompt': str}
    if not isinstance(stored, dict):
        raise CheckpointError(f'checkpoint {path}: bad metadata: "{_PROJECTOR_KEY}" must be an '
                              'object')
    for name, kind in fields.items():
        value = stored.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is int and value < 1):
            raise CheckpointError(f'checkpoint {path}: bad metadata: {_PROJECTOR_KEY}.{name} '
                                  f'must be a{" positive integer" if kind is int else " string"},'
                                  f' got {value!r}')
    sha256 = stored.get('llm_sha256', '')  # GGUF models only
    if not isinstance(sha256, str) or (sha256 and len(sha256) != 64):
        raise CheckpointError(f'checkpoint {path}: bad metadata: {_PROJECTOR_KEY}.llm_sha256 '
                              f'must be a sha256 hex string, got {sha256!r}')
    projector = TextProjector(stored['qformer_hidden_size'], stored['llm_hidden_size'],
                              llm_name=stored['llm_name'], prompt=stored['prompt'],
                              source=str(path), llm_sha256=sha256)
    state = {name[len(TEXT_PROJECTOR_PREFIX):]: tensor for name, tensor in
             _read_tensors(path, lambda name: name.startswith(TEXT_PROJECTOR_PREFIX)).items()}
    expected = projector.state_dict()
    if set(state) != set(expected) or any(
            state[name].shape != expected[name].shape for name in expected):
        found = {name: tuple(t.shape) for name, t in state.items()}
        wanted = {name: tuple(t.shape) for name, t in expected.items()}
        raise CheckpointError(f'checkpoint {path}: text projector tensors {found} do not fit '
                              f'its metadata (expected {wanted})')
    projector.load_state_dict({name: t.float() for name, t in state.items()})
    return projector


def _read_tensors(path: Path, keep: Any) -> dict[str, torch.Tensor]:
    """The tensors whose names `keep(name)` accepts; CheckpointError naming the first one (by
    name) that holds NaN or infinite values."""
    try:
        with safe_open(str(path), framework='pt', device='cpu') as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()  # noqa: SIM118
                       if keep(name)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f'checkpoint {path}: cannot read tensors: {exc}') from None
    for name in sorted(tensors):
        tensor = tensors[name]
        if not tensor.is_floating_point():
            continue
        # One tensor's boolean mask at a time: the only copy the check makes.
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = finite.numel() - int(finite.sum())
            raise CheckpointError(f'checkpoint {path}: tensor {name} has {bad} NaN/inf values '
                                  f'(of {finite.numel()}); the weights are unusable, e.g. '
                                  'training diverged')
    return tensors

"""One configuration schema for the node, the CLIs and the pipeline.

config/anticipate.yaml is a ROS 2 parameter file (`/**: ros__parameters: ...`); nested keys become
dotted parameter names (`model.num_layers`). Every field carries its valid range in metadata so the
node can declare parameter descriptors from the same source. Values are validated once, here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from malmm_ros.errors import ConfigError

__all__ = ['PRESETS', 'AnticipateConfig', 'LabelsConfig', 'ModelConfig', 'QosConfig', 'TextConfig',
           'build_config', 'field_specs', 'flatten', 'load_config', 'model_preset',
           'parameter_help', 'parse_yaml', 'read_yaml', 'spec', 'validate_fields']


def spec(default: Any, doc: str, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its documentation and valid range (read by the node too)."""
    return field(default=default, metadata={'doc': doc, 'range': (lo, hi), 'choices': choices})


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the memory-augmented Q-Former and its visual adapter (weights must match)."""

    preset: str = spec('edge', 'named base configuration', choices=('edge', 'base', 'blip2'))
    num_layers: int = spec(2, 'Q-Former blocks', 1, 48)
    hidden_size: int = spec(128, 'Q-Former width', 8, 4096)
    num_heads: int = spec(4, 'attention heads (must divide hidden_size)', 1, 64)
    intermediate_size: int = spec(512, 'feed-forward width', 8, 16384)
    num_queries: int = spec(32, 'learned query tokens', 1, 256)
    encoder_width: int = spec(128, 'width of visual tokens entering cross-attention', 8, 4096)
    cross_attention_every: int = spec(2, 'layer i cross-attends when i % this == 0', 1, 48)
    time_buckets: int = spec(16, 'log-spaced age buckets of the relative-time bias', 2, 256)
    max_age_s: float = spec(600.0, 'ages beyond this share the last time bucket', 1.0, 1e7)
    time_features: int = spec(0, 'age code added to stored keys and values (a multiple of 4; '
                              '0: off, the default: it costs a third of a step)', 0, 256)
    order_bias: bool = spec(True, 'a learned attention slope per head over each stored slot\'s '
                            'place in the temporal order (false: as checkpoints before it)')
    value_decays: int = spec(8, 'decay timescales each visual-bank token carries beside its '
                             'value (exp(-age / tau), tau 0.5-2,000 s; 0: off, as checkpoints '
                             'before it)', 0, 64)
    decay_channels: str = spec(
        'shared', "where each cross-attention head keeps the value decays: 'shared' uses the "
        "last value_decays of its value channels (no extra attention width); 'extra' adds "
        "them after its channels (keeps every value channel, for pretrained BLIP-2 weights)",
        choices=('shared', 'extra'))
    recompute_projections: bool = spec(
        False, 'recompute bank key/value projections every step (slow; for comparison)')

    # Fields that describe weights; the rest are run-time switches.
    ARCHITECTURE = ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size',
                    'num_queries', 'encoder_width', 'cross_attention_every', 'time_buckets',
                    'max_age_s', 'time_features', 'order_bias', 'value_decays',
                    'decay_channels')

    def __post_init__(self) -> None:
        validate_fields(self, 'model')
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f'model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads '
                f'({self.num_heads})'
            )
        head_dim = self.hidden_size // self.num_heads
        if self.value_decays and self.decay_channels == 'shared' \
                and self.value_decays >= head_dim:
            raise ConfigError(
                f'model.value_decays ({self.value_decays}) must be below the head width '
                f'({head_dim}) with model.decay_channels: shared (they take that many of each '
                f"head's value channels); lower it or use decay_channels: extra")
        if self.time_features % 4:
            raise ConfigError(f'model.time_features must be a multiple of 4 (decays and sin/cos '
                              f'pairs), got {self.time_features}')

    def architecture(self) -> dict[str, Any]:
        """The fields a checkpoint's weights depend on."""
        return {name: getattr(self, name) for name in self.ARCHITECTURE}

    def architecture_differences(self, stored: ModelConfig, what: str) -> list[str]:
        """'field: config X vs <what> Y' for each architecture field where the weights in
        `stored` (a checkpoint's or a bundle's) differ from this config; without decays on
        either side where they would live does not matter."""
        wanted, found = self.architecture(), stored.architecture()
        if not wanted['value_decays'] and not found['value_decays']:
            found['decay_channels'] = wanted['decay_channels']
        return [f'{name}: config {wanted[name]!r} vs {what} {found[name]!r}'
                for name in wanted if wanted[name] != found[name]]

    def cross_attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers that cross-attend to the visual bank."""
        return tuple(i for i in range(self.num_layers) if i % self.cross_attention_every == 0)


PRESETS: dict[str, dict[str, Any]] = {
    # Sized for the budget on a 2-core CPU: memory + Q-Former + heads at most half the ONNX
    # Runtime encoder's time (docs/PERFORMANCE.md measures 4 x 256 at 1.2x the encoder alone).
    'edge': {},
    # Four blocks of width 256: for a desktop GPU or a Jetson's GPU, about 3x the edge step on
    # a CPU.
    'base': {'num_layers': 4, 'hidden_size': 256, 'intermediate_size': 1024,
             'encoder_width': 256},
    # BLIP-2 / InstructBLIP Q-Former geometry (EVA-CLIP ViT-g features are 1408 wide).
    # The decays go beside each head's values: BLIP-2's value projections keep every channel.
    'blip2': {'num_layers': 12, 'hidden_size': 768, 'num_heads': 12, 'intermediate_size': 3072,
              'encoder_width': 1408, 'decay_channels': 'extra'},
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of a named preset with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f'unknown model.preset {name!r}; choose one of {sorted(PRESETS)}')
    return ModelConfig(preset=name, **{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class LabelsConfig:
    """Where label names come from when no trained checkpoint supplies them."""

    verb_classes: str = spec('', 'EK-100 verb class CSV (EPIC_100_verb_classes.csv); empty: '
                             'placeholder names')
    noun_classes: str = spec('', 'EK-100 noun class CSV (EPIC_100_noun_classes.csv)')

    def __post_init__(self) -> None:
        validate_fields(self, 'labels')


@dataclass(frozen=True)
class QosConfig:
    """Quality of service of the camera subscription (the node only)."""

    reliability: str = spec('best_effort', 'best_effort matches camera drivers (sensor data); '
                            'reliable only talks to reliable publishers',
                            choices=('best_effort', 'reliable'))
    depth: int = spec(1, 'subscription queue depth; 1 keeps only the newest frame', 1, 100)

    def __post_init__(self) -> None:
        validate_fields(self, 'qos')


@dataclass(frozen=True)
class TextConfig:
    """Optional descriptions in words from a small local causal LM (off by default).

    The last step's query outputs are projected into the LLM's embedding space and put before
    the prompt, as in MA-LMM; the LLM is frozen and runs beside the predictions, never in
    their way.
    """

    enabled: bool = spec(False, 'describe the memory in words with a local LLM (needs '
                         'text.model_path)')
    model_path: str = spec('', 'local causal LM: a .gguf file or a Hugging Face folder '
                           '(config.json, weights, tokenizer); read offline, never downloaded')
    every_n_predictions: int = spec(5, 'describe every n-th prediction; a request while the '
                                    'LLM is still busy is dropped (counted)', 1, 100000)
    max_new_tokens: int = spec(24, 'longest description, in tokens', 1, 1024)
    prompt: str = spec('Describe what happens next:', 'text after the projected queries; '
                       'keep the one the projector was trained with')
    decoding: str = spec('greedy', 'greedy: one best token at a time; beam: beam search',
                         choices=('greedy', 'beam'))
    num_beams: int = spec(3, 'beams of beam decoding (decoding: beam)', 2, 16)
    grounding: bool = spec(True, 'name the prediction\'s top-5 verbs and nouns in words in '
                           'the prompt, after the projected queries (false: the queries and '
                           'prompt only, MA-LMM\'s soft prompt)')

    def __post_init__(self) -> None:
        validate_fields(self, 'text')
        if self.enabled and not self.model_path.strip():
            raise ConfigError('text.enabled is true but text.model_path is empty; set it to a '
                              'local .gguf file or Hugging Face model folder')


@dataclass(frozen=True)
class AnticipateConfig:
    """Everything the pipeline and the node need; mirrors config/anticipate.yaml."""

    sample_fps: float = spec(1.0, 'frames per second fed to the memory (0: every frame)',
                             0.0, 1000.0)
    publish_every_n: int = spec(1, 'predict every n sampled frames', 1, 10000)
    memory_bank_length: int = spec(20, 'memory capacity M of every bank, in slots', 1, 1000)
    backend: str = spec('onnxruntime', 'image encoder backend (auto: best one available)',
                        choices=('onnxruntime', 'torch', 'tensorrt', 'auto'))
    precision: str = spec('auto', 'encoder precision: ONNX Runtime fp32 | int8 (a bundle\'s '
                          'INT8 encoder), TensorRT fp32 | fp16 | int8; auto: int8 from a bundle '
                          'on ONNX Runtime, fp16 on TensorRT, else fp32',
                          choices=('auto', 'fp32', 'fp16', 'int8'))
    engine_dir: str = spec('', 'cache of exported/compiled encoders; empty: $MALMM_ENGINE_DIR, '
                           'the checkout\'s engines/ or ~/.cache/malmm_ros/engines')
    checkpoint: str = spec('', 'trained safetensors checkpoint; empty: untrained heads')
    bundle: str = spec('', 'folder written by malmm-export bundle (encoders, step graphs, '
                       'manifest); takes the place of checkpoint')
    runtime: str = spec('torch', 'what runs the memory, Q-Former and heads: torch (the '
                        'reference) or onnx (a bundle\'s graphs on ONNX Runtime, memory in '
                        'numpy; torch is never imported)', choices=('torch', 'onnx'))
    device: str = spec('cpu', 'torch device for the model', choices=('cpu', 'cuda'))
    num_threads: int = spec(0, 'compute threads of the encoder and Q-Former (0: all cores but '
                            'one, leaving room for the camera driver and DDS)', 0, 256)
    max_gap_s: float = spec(10.0, 'a stamp gap longer than this resets the memory (0: never)',
                            0.0, 1e6)
    input_transport: str = spec('raw', 'raw: sensor_msgs/Image on `image`; compressed: '
                                'sensor_msgs/CompressedImage on `image/compressed`',
                                choices=('raw', 'compressed'))
    stale_after_s: float = spec(2.0, 'diagnostics report ERROR when no frame arrived for this '
                                'long', 0.1, 3600.0)
    max_image_side: int = spec(4096, 'frames with a larger width or height are refused', 16,
                               16384)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    qos: QosConfig = field(default_factory=QosConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        validate_fields(self, '')
        if self.checkpoint and self.bundle:
            raise ConfigError('set checkpoint or bundle, not both (a bundle holds its '
                              'checkpoint)')
        if self.runtime == 'onnx' and not self.bundle:
            raise ConfigError('runtime onnx runs the graphs of a bundle: set bundle (write one '
                              'with malmm-export bundle --out DIR)')
        if self.runtime == 'onnx' and self.text.enabled:
            raise ConfigError('text descriptions run their LLM in PyTorch: use runtime torch '
                              'with text.enabled, or turn text off')
        if self.runtime == 'onnx' and self.backend == 'torch':
            raise ConfigError('runtime onnx never imports torch: choose backend onnxruntime, '
                              'tensorrt or auto')

    def encoder_precision(self) -> str:
        """`precision` with auto resolved for `backend` (auto backends resolve later)."""
        if self.precision != 'auto':
            return self.precision
        if self.backend == 'tensorrt':
            return 'fp16'
        if self.backend == 'onnxruntime' and self.bundle:
            return 'int8'
        return 'fp32'

    def check_files(self, *, text: bool = False) -> None:
        """ConfigError naming the absolute path of a configured file that is missing (a relative
        path is read from the working directory, which is easy to get wrong); with `text`, the
        LLM folder of enabled text descriptions too."""
        paths = {'checkpoint': self.checkpoint, 'bundle': self.bundle,
                 'labels.verb_classes': self.labels.verb_classes,
                 'labels.noun_classes': self.labels.noun_classes}
        if text and self.text.enabled:
            paths['text.model_path'] = self.text.model_path
        for name, value in paths.items():
            if value and not Path(value).expanduser().exists():
                raise ConfigError(f'{name} {value!r}: {Path(value).expanduser().resolve()} does '
                                  'not exist')

    def threads(self) -> int:
        """num_threads, with 0 resolved to all cores but one (at least one).

        Using every core is a trap on a shared robot computer: an OpenMP worker descheduled by
        another process stalls every parallel region (measured here: 10 ms per tiny op).
        """
        return self.num_threads or max(1, (os.cpu_count() or 2) - 1)

    def replace(self, **changes: Any) -> AnticipateConfig:
        """A copy with top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain-Python dict (the shape of `ros__parameters`)."""
        return dataclasses.asdict(self)

    def to_parameters(self) -> dict[str, Any]:
        """Flat {dotted name: value}: the node's parameter names and defaults."""
        return flatten(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = '<dict>') -> AnticipateConfig:
        """Build from a nested or dotted dict, or a whole ROS 2 parameter file's contents."""
        flat = flatten(_unwrap_ros_parameters(data, source))
        return build_config(cls, flat, source, what='parameter',
                            makers={'model': _model_from_preset})


def _model_from_preset(preset: str = 'edge', **fields: Any) -> ModelConfig:
    return model_preset(_typed('str', preset, 'model.preset'), **fields)


def load_config(source: str | os.PathLike | dict[str, Any] | AnticipateConfig | None = None
                ) -> AnticipateConfig:
    """Config from a YAML path, a dict, an existing config or None (the defaults)."""
    if source is None:
        return AnticipateConfig()
    if isinstance(source, AnticipateConfig):
        return source
    if isinstance(source, dict):
        return AnticipateConfig.from_dict(source)
    path = Path(source)
    return AnticipateConfig.from_dict(read_yaml(path), source=str(path))


def parameter_help() -> str:
    """Every parameter with its default, valid values and meaning, one block each (--help)."""
    defaults = AnticipateConfig().to_parameters()
    lines = []
    for name, f in field_specs().items():
        meta = f.metadata
        lo, hi = meta.get('range', (None, None))
        if meta.get('choices'):
            valid = ' | '.join(meta['choices'])
        elif lo is not None or hi is not None:
            valid = f'{_number(lo)} .. {_number(hi)}'
        else:
            valid = f.type
        lines.append(f'  {name} (default {defaults[name]!r}; {valid})')
        lines.append(f'      {meta.get("doc", "")}')
    return '\n'.join(lines)


def _number(value: float | None) -> str:
    return '' if value is None else f'{value:g}'


def _unwrap_ros_parameters(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept `{node: {ros__parameters: {...}}}` as written by ROS 2 parameter files."""
    blocks = [v['ros__parameters'] for v in data.values()
              if isinstance(v, dict) and 'ros__parameters' in v]
    if not blocks:
        return data
    if len(blocks) > 1:
        raise ConfigError(f'{source}: more than one node section; keep one (e.g. "/**")')
    if not isinstance(blocks[0], dict):
        raise ConfigError(f'{source}: ros__parameters must be a mapping')
    return blocks[0]


# -- the schema machinery, shared with malmm_ros.training.config -----------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader reading 1e1 and 1e-4 as floats, as YAML 1.2 and the ROS 2 parameter parser do
    (YAML 1.1 wants a dot in a float, so plain PyYAML reads them as strings)."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float', re.compile(r'^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$'),
    list('-+0123456789'))


def parse_yaml(text: str, source: str) -> Any:
    """YAML text (a file's contents or one --set value) with numbers read as ROS 2 reads them."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise ConfigError(f'{source}: not valid YAML ({exc})') from None


def read_yaml(path: str | os.PathLike, *, what: str = 'config', empty_ok: bool = False
              ) -> dict[str, Any]:
    """The mapping at the top of a YAML file; `empty_ok`: an empty file is {}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f'cannot read {what} {path}: {exc.strerror}') from None
    data = parse_yaml(text, str(path))
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping at the top level')
    return data


def flatten(data: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    """{'model': {'num_layers': 4}} -> {'model.num_layers': 4}; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(flatten(value, f'{name}.'))
        else:
            flat[name] = value
    return flat


def field_specs(config_cls: type = AnticipateConfig, prefix: str = '') -> dict[str, Any]:
    """{dotted name: dataclasses.Field} for every leaf field of the schema."""
    specs: dict[str, Any] = {}
    groups = _groups(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in groups:
            specs.update(field_specs(f.default_factory, f'{prefix}{f.name}.'))
        else:
            specs[f'{prefix}{f.name}'] = f
    return specs


def build_config(cls: type, flat: dict[str, Any], source: str, *, what: str = 'setting',
                 makers: dict[str, Any] | None = None) -> Any:
    """`cls` from {dotted name: value}: each group dataclass built from its fields (or by
    makers[group]), unknown names refused, every error prefixed with `source`."""
    groups = _groups(cls)
    top, by_group = _split_groups(cls, groups, flat, source, what)
    makers = makers or {}
    try:
        built = {group: makers.get(group, kind)(**by_group[group])
                 for group, kind in groups.items()}
        return cls(**built, **top)
    except ConfigError as exc:
        raise ConfigError(f'{source}: {exc}') from None


def _groups(cls: type) -> dict[str, type]:
    """{field name: dataclass} of the fields that hold a nested config group."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(f.default_factory)}


def _split_groups(cls: type, groups: dict[str, type], flat: dict[str, Any], source: str,
                  what: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Sort dotted keys into top-level fields of `cls` and fields of each group dataclass;
    any other key is refused by name (a typo must not pass silently)."""
    by_group: dict[str, dict[str, Any]] = {name: {} for name in groups}
    top: dict[str, Any] = {}
    unknown = []
    for key, value in flat.items():
        group, _, name = key.partition('.')
        if name and group in groups and name in _field_names(groups[group]):
            by_group[group][name] = value
        elif not name and key in _field_names(cls) and key not in groups:
            top[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f'{source}: unknown {what}(s) {", ".join(sorted(unknown))}')
    return top, by_group


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _typed(kind: str, value: Any, label: str) -> Any:
    """`value` checked against a field's annotation; an int is accepted for a float."""
    if kind == 'float' and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, _TYPES[kind]) or (kind == 'int' and isinstance(value, bool)):
        raise ConfigError(f'{label} must be of type {kind}, got {value!r}')
    return value


_TYPES = {'bool': bool, 'int': int, 'float': float, 'str': str}


def validate_fields(obj: Any, section: str) -> None:
    """Type, range and choice checks from each field's annotation and metadata.

    Runs in every __post_init__, so direct construction and `replace()` are checked as strictly
    as parameter files. An int given for a float field is stored as a float.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        label = f'{section}.{f.name}' if section else f.name
        if f.type in _TYPES:
            checked = _typed(f.type, value, label)
            if checked is not value:
                object.__setattr__(obj, f.name, checked)
                value = checked
        choices = f.metadata.get('choices')
        if choices is not None and value not in choices:
            raise ConfigError(f'{label} must be one of {list(choices)}, got {value!r}')
        lo, hi = f.metadata.get('range', (None, None))
        if lo is None and hi is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f'{label} must be finite, got {value!r}')
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f'{label} must be in [{lo}, {hi}], got {value!r}')

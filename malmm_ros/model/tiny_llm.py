"""A tiny causal LM written to a folder: the text path's stand-in for a real small LLM.

A Llama or Qwen2 configuration with random weights and a byte-level BPE tokenizer trained (with
the `tokenizers` library) on a few kitchen sentences, saved with save_pretrained, so it loads
through exactly the code path of a downloaded model (malmm_ros.model.text). Tests and
benchmarks use it; so can anyone trying the text descriptions without a real LLM at hand (the
words are then random). transformers and tokenizers are imported only when it is called.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from malmm_ros.model.text import offline_transformers

__all__ = ['KITCHEN_SENTENCES', 'write_tiny_llm']

# Narration-like sentences (EK-100 narrations are short imperative phrases).
KITCHEN_SENTENCES = (
    'take the cup from the table', 'open the fridge door', 'wash the plate in the sink',
    'cut the onion with a knife', 'put the pan on the hob', 'close the drawer',
    'pour water into the kettle', 'turn on the tap', 'dry the hands with a towel',
    'stir the sauce in the pot', 'pick up the spoon', 'put down the knife',
    'open the cupboard', 'take out the chopping board', 'rinse the tomato',
    'peel the carrot', 'throw the peel in the bin', 'switch off the hob',
)
_SPECIAL_TOKENS = ('<pad>', '<s>', '</s>', '<unk>')


def write_tiny_llm(
    folder: str | os.PathLike,
    *,
    family: str = 'llama',
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 400,
    model_vocab_size: int | None = None,
    tie_embeddings: bool = False,
    seed: int = 0,
    sentences: tuple[str, ...] = KITCHEN_SENTENCES,
    endless: bool = False,
) -> Path:
    """Write config.json, weights and tokenizer of a random causal LM to `folder`; return it.

    family: 'llama' or 'qwen2'. The tokenizer's vocabulary is at most `vocab_size` (what the
    sentences support); the model's embedding has the tokenizer's size, or `model_vocab_size`
    rows (at least as many) to cost what a real model's vocabulary costs: ids beyond the
    tokenizer's decode to nothing. Give the shape of a real model (layers, widths, heads,
    vocabulary) to time it without its weights.
    endless: greedy decoding never picks end-of-text or padding, so every description runs to
    max_new_tokens (a generation of known, controllable length for timing).
    """
    transformers = offline_transformers()  # offline switches before the first import
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(sentences), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token='<pad>',
                                   bos_token='<s>', eos_token='</s>', unk_token='<unk>')

    config_cls = {'llama': transformers.LlamaConfig,
                  'qwen2': transformers.Qwen2Config}.get(family)
    if config_cls is None:
        raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
    if model_vocab_size is not None and model_vocab_size < len(fast):
        raise ValueError(f'model_vocab_size {model_vocab_size} is below the tokenizer\'s '
                         f'{len(fast)} tokens')
    config = config_cls(
        vocab_size=model_vocab_size or len(fast), hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=tie_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    if endless:
        # Each special token's output row becomes half an ordinary token's row: its logit is
        # half that token's, so it can only be the largest if every logit is negative, which
        # random rows in this many dimensions never are.
        head = model.get_output_embeddings().weight
        special = [fast.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS]
        ordinary = [i for i in range(len(fast)) if i not in special]
        with torch.no_grad():
            for token, other in zip(special, ordinary, strict=False):
                head[token] = 0.5 * head[other]
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder

"""Tiny causal LMs built locally from a config, with a tokenizer trained on the spot.

There is no model hub here: tests, the demo and the benchmarks build their models with
:func:`build_tiny_model`. Every architecture svd-serve supports has an entry in ``ARCHS``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_dir

SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Question: what is two plus two? Answer: four.",
    "Singular value decomposition writes a matrix as U times Sigma times V transpose.",
    "Low-rank adapters add B times A to a frozen weight matrix.",
    "The cat sat on the mat and the dog sat on the log.",
    "Alice was born in 1970 in Lisbon and works as a painter.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 4

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # biased q/k/v projections
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj
}


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with a chat template, trained on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out: str | Path, arch: str = "llama", seed: int = 0,
                     dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a randomly initialised ``arch`` model plus tokenizer to ``out`` (safetensors)."""
    import transformers

    config_cls, extra = ARCHS[arch]
    tokenizer = build_tokenizer()
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    # random init leaves norms at 1 and some weights tiny; spread them so adapters have work to do
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)

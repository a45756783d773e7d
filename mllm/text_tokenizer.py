"""The text side of the vocabulary: a sentencepiece tokenizer for fresh LLMs, and the chat template.

Two entry points:

- `train_text_tokenizer` trains a byte-fallback BPE sentencepiece model on a corpus in memory (nothing
  is downloaded) and wraps it as a Hugging Face fast tokenizer, so it saves and loads with
  `save_pretrained` / `AutoTokenizer.from_pretrained` like any base model's tokenizer.
- `prepare_text_tokenizer` makes ANY base tokenizer (Llama, Qwen2, Mistral, ...) ready for images: it adds
  the image special tokens, keeps the base's chat template (or installs `DEFAULT_CHAT_TEMPLATE`), makes
  sure a pad token exists and finds the token that closes an assistant turn.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from mllm.config import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from mllm.vocab import add_image_special_tokens

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
# The trained model's special pieces, in id order (0, 1, 2, 3): named once for both the sentencepiece
# trainer (`{kind}_id`, `{kind}_piece`) and the HF tokenizer built from its model (`{kind}_token`).
_SPECIAL_PIECES = {"unk": UNK_TOKEN, "bos": BOS_TOKEN, "eos": EOS_TOKEN, "pad": PAD_TOKEN}
END_OF_TURN_TOKEN = "<|end|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN_TOKEN)
# sentencepiece's byte-fallback pieces <0x00> ... <0xFF>: any UTF-8 text can be spelled with them.
BYTE_PIECES = 256

# Roles system/user/assistant; content a string or a list of parts (an image part renders as <|image|>,
# parts are joined by a newline: the processor flattens parts the same way, so both forms render alike).
DEFAULT_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': roles are system, user and assistant') }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if not loop.first %}{{- '\n' }}{% endif %}"
    "{%- if part['type'] in ['image', 'image_url'] %}{{- '" + IMAGE_TOKEN + "' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{% endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '" + END_OF_TURN_TOKEN + "\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{% endif %}"
)


def shapes_text_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts of the first `n` training scenes of the shapes world, for training a text tokenizer.

    Per scene: the caption, every VQA question and answer, and every drawing prompt in the draw template;
    plus the fixed instruction strings (caption prompt, the empty draw prompt). Scenes only: no image is
    rendered, so 2000 scenes take well under a second.
    """
    from mllm.data.samples import CAPTION_PROMPT, DRAW_TEMPLATE
    from mllm.data.shapes import caption, draw_prompts, make_scene, scene_seed, vqa_pairs

    texts = [CAPTION_PROMPT, DRAW_TEMPLATE.format(prompt="")]
    for index in range(n):
        scene = make_scene(scene_seed("train", index, base_seed=seed))
        texts += [caption(scene), CAPTION_PROMPT]
        for pair in vqa_pairs(scene):
            texts += [pair["question"], pair["answer"]]
        texts += [DRAW_TEMPLATE.format(prompt=prompt) for prompt in draw_prompts(scene)]
    return texts


def train_text_tokenizer(texts: Iterable[str], vocab_size: int, seed: int = 0):
    """Train a byte-fallback BPE sentencepiece model on `texts` and return it as a HF fast tokenizer.

    `vocab_size` counts the learned pieces (<unk> <s> </s> <pad>, characters and merges); the 256
    byte-fallback pieces come on top, because no vocabulary under 256 + characters could otherwise spell
    arbitrary text. The size is a soft limit: a corpus too small to fill it gives fewer pieces. Then the
    chat tokens (<|system|> <|user|> <|assistant|> <|end|>) and the image tokens are added as special
    tokens and `DEFAULT_CHAT_TEMPLATE` is installed (`prepare_text_tokenizer`). Same texts and seed ->
    the same tokenizer (single-threaded training, fixed random seed).

    Encoding matches `SentencePieceProcessor.encode` of the trained model, and decoding is lossless:
    no dummy prefix and no whitespace normalisation, so `decode(encode(text)) == text` for any text.
    """
    import sentencepiece as spm

    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise ValueError("train_text_tokenizer takes an iterable of strings")
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("train_text_tokenizer needs a non-empty corpus of strings")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size + BYTE_PIECES,
        hard_vocab_limit=False,  # small corpora: fewer pieces rather than an error
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # lossless: no NFKC
        add_dummy_prefix=False,  # lossless: no invented leading space (chat text starts mid-line)
        remove_extra_whitespaces=False,
        split_digits=True,
        **{f"{kind}_id": index for index, kind in enumerate(_SPECIAL_PIECES)},
        **{f"{kind}_piece": piece for kind, piece in _SPECIAL_PIECES.items()},
        num_threads=1,  # determinism
        seed_sentencepiece_size=1_000_000,
        input_sentence_size=0,  # all sentences, no sampling
        shuffle_input_sentence=False,
        minloglevel=2,
    )  # fmt: skip
    tokenizer = _fast_tokenizer_from_sentencepiece(model.getvalue())
    prepare_text_tokenizer(tokenizer)
    return tokenizer


def _fast_tokenizer_from_sentencepiece(model_proto: bytes):
    """A byte-fallback BPE sentencepiece model -> `PreTrainedTokenizerFast` that encodes the same way.

    Written here rather than through transformers' `SpmConverter` because that parses the model with
    protobuf, which is not a dependency; `SentencePieceProcessor` exposes everything the conversion needs.
    The merges follow `SpmConverter.build_tokenizer_from_spm_proto`: every split of a normal piece into two
    normal pieces, ranked by the merged piece's score (sentencepiece BPE merges the best-scored pair first).
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    size = processor.get_piece_size()
    vocab = {processor.id_to_piece(i): i for i in range(size)}
    normal = {
        processor.id_to_piece(i): (processor.get_score(i), i)
        for i in range(size)
        if not (
            processor.is_control(i)
            or processor.is_unknown(i)
            or processor.is_byte(i)
            or processor.is_unused(i)
        )
    }
    ranked = []
    for piece, (score, index) in normal.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]

    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    # Split before each "▁" (sentencepiece's split_by_whitespace): pieces never span words, and BPE
    # works word by word (with its word cache) instead of on whole paragraphs.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        **{f"{kind}_token": piece for kind, piece in _SPECIAL_PIECES.items()},
    )


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def find_end_of_turn_id(tokenizer) -> int:
    """The id of the token the chat template closes an assistant turn with (Qwen2: <|im_end|>).

    Renders a one-turn conversation and takes the first special token after the assistant's reply;
    falls back to the eos token for a template that closes turns with plain text.
    """
    reply = "MLLM-REPLY-7f3a"  # a string no template writes by itself
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    position = rendered.rfind(reply)
    if position < 0:
        raise ValueError("the chat template drops the assistant's reply; cannot find its end-of-turn token")
    suffix = rendered[position + len(reply) :]
    specials = _special_ids(tokenizer)
    for token_id in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if token_id in specials:
            return int(token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the chat template closes assistant turns with no special token and there is no eos token"
        )
    return int(tokenizer.eos_token_id)


def prepare_text_tokenizer(tokenizer) -> dict[str, int]:
    """Make any HF text tokenizer ready for images (in place, idempotent); return the special-token ids.

    Adds <|boi|> <|eoi|> <|image|> (`mllm.vocab.add_image_special_tokens`); installs
    `DEFAULT_CHAT_TEMPLATE` and its chat tokens when the tokenizer has no chat template (a base's own
    template is kept); sets the pad token to eos when there is none. Returns
    {"boi", "eoi", "image", "end_of_turn", "pad"}; end_of_turn is detected from the template.
    """
    if tokenizer.chat_template is None:
        missing = [token for token in CHAT_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_extra_special_tokens=False
            )
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    image_ids = add_image_special_tokens(tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return {
        "boi": image_ids[BOI_TOKEN],
        "eoi": image_ids[EOI_TOKEN],
        "image": image_ids[IMAGE_TOKEN],
        "end_of_turn": find_end_of_turn_id(tokenizer),
        "pad": int(tokenizer.pad_token_id),
    }

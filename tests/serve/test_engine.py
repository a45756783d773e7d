import pytest

from serve.engine import Cancelled, ChatJob, Engine, ImageJob, QueueFull, _groups


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import mllm
    from mllm.init import init_model

    return mllm.load(init_model("tiny", "tiny", tmp_path_factory.mktemp("engine") / "m", seed=0), device="cpu")


def _chat(text: str, **overrides) -> ChatJob:
    values = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "max_tokens": 6,
              "temperature": 0.0, "top_p": None, "seed": None, "stop": []}
    return ChatJob(**{**values, **overrides})


def _wait(*jobs) -> None:
    for job in jobs:
        assert job.done.wait(120)


def test_grouping_rules():
    greedy = [_chat(str(i)) for i in range(3)]
    seeded = [_chat("s", temperature=0.8, seed=1), _chat("s", temperature=0.8, seed=1)]
    sampled = [_chat("t", temperature=0.8), _chat("t", temperature=0.8), _chat("t", temperature=0.7)]
    images = [ImageJob("a red circle", n=2), ImageJob("a blue square", n=3), ImageJob("x", guidance_scale=1.0)]
    groups = _groups(greedy + seeded + sampled + images, max_batch=4)
    as_sets = [set(map(id, group)) for group in groups]
    assert set(map(id, greedy)) in as_sets  # greedy jobs always share a pass
    assert {id(seeded[0])} in as_sets and {id(seeded[1])} in as_sets  # a seed needs its own RNG stream
    assert set(map(id, sampled[:2])) in as_sets and {id(sampled[2])} in as_sets
    assert {id(images[0])} in as_sets and {id(images[1])} in as_sets  # 2 + 3 rows > max_batch 4
    assert {id(images[2])} in as_sets  # another guidance scale
    assert all(sum(job.n for job in group) <= 4 for group in groups)

    # Image jobs share one generate_images call, so one decoding method per batch; a chat job's decoding
    # only concerns an image drawn in its reply, which is drawn for its row alone: its text pass is shared.
    jacobi, sequential = ImageJob("a", decoding="jacobi"), ImageJob("b", decoding="sequential")
    as_sets = [set(map(id, group)) for group in _groups([jacobi, sequential], max_batch=4)]
    assert as_sets == [{id(jacobi)}, {id(sequential)}]
    chats = [_chat("x"), _chat("y", decoding="sequential")]
    assert [set(map(id, group)) for group in _groups(chats, max_batch=4)] == [set(map(id, chats))]


def test_batched_answers_equal_single_answers_and_a_bad_prompt_fails_alone(model):
    engine = Engine(model, max_batch=8, batch_window_s=0.2)
    try:
        alone = _chat("red circle")
        engine.submit(alone)
        _wait(alone)
        jobs = [_chat(text) for text in ("red circle", "blue square", "green triangle")]
        too_long = _chat("red circle " * 2000)
        for job in [*jobs, too_long]:
            engine.submit(job)
        _wait(*jobs, too_long)
        assert engine.stats["max_batch"] >= 3
        assert jobs[0].result[0]["text"] == alone.result[0]["text"]
        assert all(job.error is None and job.result for job in jobs)
        assert isinstance(too_long.error, ValueError) and "context length" in str(too_long.error)
    finally:
        engine.close()


def test_cancelling_a_running_job_stops_it_at_the_next_token(model):
    engine = Engine(model, max_batch=8, batch_window_s=0.0)
    try:
        received = []
        job = _chat("hello", max_tokens=400, stop=["zzzzzz"])

        def on_delta(choice: int, text: str) -> None:
            received.append(text)
            job.cancel()  # as when the client disconnects after the first chunk

        job.on_delta = on_delta
        engine.submit(job)
        _wait(job)
        assert isinstance(job.error, Cancelled) and engine.stats["cancelled"] == 1
        assert len(received) <= 3  # stopped right away, not after 400 tokens
        waiting = _chat("never run")
        waiting.cancel()  # cancelled while still queued: dropped without running
        engine.submit(waiting)
        _wait(waiting)
        assert isinstance(waiting.error, Cancelled) and waiting.result is None
    finally:
        engine.close()


def test_image_jobs_share_one_pass_and_keep_their_seeds(model):
    engine = Engine(model, max_batch=8, batch_window_s=0.2)
    try:
        first, second = ImageJob("a red circle", n=2, seed=5), ImageJob("a blue square", n=1, seed=9)
        engine.submit(first)
        engine.submit(second)
        _wait(first, second)
        assert engine.stats["max_batch"] == 3 and engine.stats["batches"] == 1
        again = ImageJob("a red circle", n=2, seed=5)
        engine.submit(again)
        _wait(again)
        assert [image.tobytes() for image in again.result] == [image.tobytes() for image in first.result]
        assert len(second.result) == 1
    finally:
        engine.close()


def test_image_jobs_draw_with_their_decoding_method(model, monkeypatch):
    import mllm.generation

    seen = []
    real = mllm.generation.generate_images

    def spy(*args, **kwargs):
        seen.append((len(args[1]), kwargs.get("decoding")))
        return real(*args, **kwargs)

    monkeypatch.setattr(mllm.generation, "generate_images", spy)
    engine = Engine(model, max_batch=8, batch_window_s=0.2)
    try:
        jobs = [ImageJob("a red circle", n=2, seed=5), ImageJob("a red circle", n=2, seed=5, decoding="sequential"),
                ImageJob("a blue square", seed=1, decoding="sequential")]
        for job in jobs:
            engine.submit(job)
        _wait(*jobs)
        assert all(job.error is None and job.result for job in jobs)
        assert sorted(seen, key=str) == [(2, "auto"), (3, "sequential")]  # two batches, one per method
    finally:
        engine.close()


def test_streamed_text_equals_the_final_text_across_byte_fallback_runs(model):
    """A run of byte tokens decodes as one UTF-8 sequence: a valid byte followed by a stray continuation
    byte turns both into replacement characters, so text must not be sent while a run is open."""
    import torch

    from serve.engine import _RowStreamer

    model = model.model  # the UnifiedMLLM under the mllm.load wrapper, as the engine holds it
    tokenizer = model.processor.text_tokenizer
    vocab = tokenizer.get_vocab()
    word = next(i for token, i in vocab.items() if token.isalpha() and len(token) > 2)
    ids = [word, vocab["<0x0F>"], vocab["<0x9A>"], word, vocab["<0xC3>"], vocab["<0xA9>"], word]
    deltas = []
    streamer = _RowStreamer(model, [lambda choice, text: deltas.append(text)], [0], [])
    streamer.put(torch.tensor([[1, 2]]))  # the prompt
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    expected = model.processor.decode_text(ids).strip()
    assert "".join(deltas) == expected and len(deltas) >= 3  # all of it, in pieces
    assert "\ufffd" in expected and "é" in expected


def test_admission_is_bounded_by_reservations(model):
    engine = Engine(model, queue_size=2, batch_window_s=0.0)
    try:
        first, second = engine.reserve(), engine.reserve()
        with pytest.raises(QueueFull):
            engine.reserve()  # every slot taken, though nothing is queued yet (images still decoding)
        first.release()
        with engine.reserve():
            pass  # given back when the block ends without a job
        job = _chat("hello")
        second.submit(job)
        _wait(job)
        assert job.error is None and [engine.reserve(), engine.reserve()]  # the worker gave the slot back
    finally:
        engine.close()


def test_a_seeded_job_leaves_the_global_rng_as_it_was(model):
    import torch

    engine = Engine(model, batch_window_s=0.0)
    try:
        state = torch.get_rng_state()
        seeded = [_chat("hello", temperature=1.0, seed=5, max_tokens=8) for _ in range(2)]
        for job in seeded:
            engine.submit(job)
        _wait(*seeded)
        assert seeded[0].result[0]["text"] == seeded[1].result[0]["text"]
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        engine.close()


def test_an_empty_reply_holds_no_undecodable_tokens(model):
    """`content ''` with `completion_tokens=16`: a reply of control ids that decode to nothing (eos after eos,
    role markers). Now eos ends the reply like the end of turn, control ids are never generated, and
    completion_tokens counts the ids the reply holds (its text and the token that ended it)."""
    import contextlib

    import torch
    from torch import nn

    @contextlib.contextmanager
    def likeliest(token_id):
        llm = model.model.llm
        head = llm.get_output_embeddings()
        biased = nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            biased.weight = head.weight
            biased.bias.zero_()
            biased.bias[token_id] = 100.0
        llm.set_output_embeddings(biased)
        try:
            yield
        finally:
            llm.set_output_embeddings(head)

    tokenizer = model.model.processor.text_tokenizer
    engine = Engine(model, batch_window_s=0.0)
    try:
        with likeliest(tokenizer.eos_token_id):
            job = _chat("hello", max_tokens=16)
            engine.submit(job)
            _wait(job)
        assert job.result == [{"text": "", "images": [], "finish_reason": "stop", "completion_tokens": 1}]
        for token in ("<|user|>", "<|assistant|>", tokenizer.pad_token, tokenizer.bos_token):
            with likeliest(tokenizer.convert_tokens_to_ids(token)):
                job = _chat("hello", max_tokens=16)
                engine.submit(job)
                _wait(job)
            (choice,) = job.result
            assert choice["text"] or choice["completion_tokens"] <= 1, (token, choice)
    finally:
        engine.close()


def test_a_reply_that_starts_an_image_without_room_counts_its_own_tokens(model):
    """The model starts an image (<|boi|>) the budget has no room for: the reply goes on as text, and its
    usage is the text's tokens with finish "length" (not the single <|boi|> and "stop")."""
    import torch
    from torch import nn

    inner = model.model
    llm = inner.llm
    head = llm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight = head.weight
        biased.bias.zero_()
        biased.bias[inner.config.boi_token_id] = 200.0  # <|boi|> first whenever it is allowed
    llm.set_output_embeddings(biased)
    engine = Engine(model, batch_window_s=0.0)
    try:
        job = _chat("Draw: a red circle", max_tokens=6)
        engine.submit(job)
        _wait(job)
    finally:
        engine.close()
        llm.set_output_embeddings(head)
    (choice,) = job.result
    assert choice["images"] == [] and choice["completion_tokens"] == 6 and choice["finish_reason"] == "length"


def test_the_models_chat_image_threshold_applies_to_each_row_of_a_batch(model, monkeypatch):
    """`config.chat_image_threshold` in the batched text pass: a turn of an image then text starts an image
    where the model's chance of `<|boi|>` reaches it (here any chance: the untrained model never prefers
    `<|boi|>`); a text turn in the same batch, and the same image turn without a threshold, answer in words."""
    import torch

    from mllm.generation import image_start_decisions

    config = model.model.config
    h, w = config.grid_size
    image = {"type": "image", "codes": torch.zeros(h, w, dtype=torch.long)}
    edit = [{"role": "user", "content": [image, {"type": "text", "text": "make the circle blue"}]}]
    ((chance, likeliest),) = image_start_decisions(model.model, edit)
    assert not likeliest and chance > 1e-6
    budget = config.image_tokens_per_image + 4

    def run(threshold):
        monkeypatch.setattr(config, "chat_image_threshold", threshold)
        engine = Engine(model, max_batch=4, batch_window_s=0.3)
        try:
            jobs = [_chat("x", messages=edit, max_tokens=budget), _chat("make the circle blue", max_tokens=budget)]
            for job in jobs:
                engine.submit(job)
            _wait(*jobs)
            assert engine.stats["max_batch"] == 2
        finally:
            engine.close()
        return [len(job.result[0]["images"]) for job in jobs]

    assert run(1e-6) == [1, 0]
    assert run(None) == [0, 0]
    assert run(min(0.99, chance * 1.5)) == [0, 0]

"""The vLLM engine's logits processor (`serve.vllm_engine._apply`): a plain function over a batch's logits,
tested without vLLM (the engine itself: tests/serve/test_vllm_engine.py, `make test-vllm`)."""

from __future__ import annotations

import torch

from serve.vllm_engine import _apply, _Row


def _image_spec(pair, role, scale=3.0):
    return {"kind": "image", "image_range": [4, 10], "poison": 2, "pair": pair, "role": role, "scale": scale}


def test_guidance_written_into_both_rows_and_image_positions_restricted():
    logits = torch.randn(3, 12)
    original = logits.clone()
    rows = {0: _Row(_image_spec("p", "c"), 5, [4, 5]), 2: _Row(_image_spec("p", "u"), 3, [4, 5]),
            1: _Row({"kind": "image", "image_range": [4, 10], "pair": None, "poison": 2}, 4, [])}
    out = _apply(rows, logits)
    c, u = original[0, 4:10], original[2, 4:10]
    guided = u + 3.0 * (c - u)
    for row in (0, 2):
        assert torch.allclose(out[row, 4:10], guided)
        assert torch.isinf(out[row, :4]).all() and torch.isinf(out[row, 10:]).all()
    assert torch.equal(out[1, 4:10], original[1, 4:10])  # unguided image row: only restricted
    assert torch.isinf(out[1, :4]).all() and torch.isinf(out[1, 10:]).all()


def test_a_row_without_its_partner_is_forced_to_its_poison_id():
    logits = torch.randn(2, 12)
    rows = {0: _Row(_image_spec("p", "c"), 5, [4]), 1: _Row(_image_spec("q", "u"), 5, [4, 4])}
    out = _apply(rows, logits)
    for row in (0, 1):
        assert int(out[row].argmax()) == 2 and torch.isinf(out[row]).sum() == 11
    # partners out of step (different output lengths) are not guided either
    rows = {0: _Row(_image_spec("p", "c"), 5, [4]), 1: _Row(_image_spec("p", "u"), 5, [4, 4])}
    out = _apply(rows, torch.randn(2, 12))
    assert int(out[0].argmax()) == 2 and int(out[1].argmax()) == 2


def test_text_rows_suppress_images_control_ids_and_late_boi():
    spec = {"kind": "text", "image_range": [4, 10], "suppress": [1], "boi": 3, "boi_until": 6}
    rows = {0: _Row(spec, 5, []), 1: _Row(spec, 5, [7, 8])}
    out = _apply(rows, torch.zeros(2, 12))
    assert torch.isinf(out[:, 4:10]).all() and torch.isinf(out[:, 1]).all()
    assert out[0, 3] == 0 and torch.isinf(out[1, 3])  # 5 + 0 <= 6: may start an image; 5 + 2 > 6: not




def test_the_first_token_is_boi_where_its_chance_reaches_the_floor():
    """"boi_floor" (`config.chat_image_threshold`): on a row's first token, `<|boi|>` wins whenever its chance
    (after the suppression) is at least the floor, even where another token is likelier; later tokens, rows
    whose chance is below it and rows where no image fits are left as they are."""
    logits = torch.zeros(4, 12)
    logits[:, 0] = 5.0  # the likeliest token
    logits[:, 3] = 1.0  # <|boi|>
    chance = float(torch.softmax(torch.cat([logits[0, :4], logits[0, 10:]]).masked_fill(
        torch.tensor([False, True, False, False, False, False]), float("-inf")), -1)[3])
    assert 0.01 < chance < 0.5
    spec = {"kind": "text", "image_range": [4, 10], "suppress": [1], "boi": 3, "boi_until": 8}
    rows = {0: _Row({**spec, "boi_floor": chance * 0.9}, 5, []),  # first token, over the floor: boi
            1: _Row({**spec, "boi_floor": chance * 1.1}, 5, []),  # under it: untouched
            2: _Row({**spec, "boi_floor": chance * 0.9}, 5, [7]),  # not the first token
            3: _Row({**spec, "boi_floor": chance * 0.9, "boi_until": 4}, 5, [])}  # no room for an image
    out = _apply(rows, logits.clone())
    assert int(out[0].argmax()) == 3 and torch.isinf(out[0]).sum() == 11
    for row in (1, 2):
        assert int(out[row].argmax()) == 0 and out[row, 3] == 1.0
    assert int(out[3].argmax()) == 0 and torch.isinf(out[3, 3])

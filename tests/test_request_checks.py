"""Token ids outside the vocabulary are refused in the tokenizer manager (HTTP process),
before they reach the scheduler. The live checks are in tests/test_live_marconi.py
(``test_out_of_vocabulary_ids_get_400_and_server_keeps_serving``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_marconi.request_checks import first_bad_token


@pytest.mark.parametrize("ids,reason", [
    ([0, 5, 511], None),
    ([5, 512, -1], "input_ids[1] = 512 is outside the model's vocabulary (valid ids: 0 to 511)"),
    ([5, 6, -1], "input_ids[2] = -1 is outside the model's vocabulary (valid ids: 0 to 511)"),
    ([5, 6.5], "input_ids[1] = 6.5 is not an integer token id"),
    ([True], "input_ids[0] = True is not an integer token id"),
    ([], "the input is empty (0 tokens); a request needs at least one token"),
])
def test_first_bad_token(ids, reason):
    assert first_bad_token(ids, 512) == reason


def test_hook_on_sglang_tokenizer_manager_refuses_before_validation():
    """Through SGLang's own plugin loading: the HookRegistry BEFORE hook on
    ``TokenizerManager._validate_one_request`` raises ValueError (SGLang's HTTP layer
    answers 400) for a bad id. The tokenizer manager runs no device code, so this is
    the same path on a GPU server."""
    import sglang.srt.plugins as plugins
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    plugins._plugins_loaded = False
    plugins.load_plugins()
    assert hasattr(TokenizerManager._validate_one_request, "__wrapped__")
    tm = SimpleNamespace(model_config=SimpleNamespace(vocab_size=512))
    obj = GenerateReqInput(input_ids=[5, 6, 70000], sampling_params={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"^input_ids\[2\] = 70000 is outside the model's vocabulary"):
        TokenizerManager._validate_one_request(tm, obj, [5, 6, 70000])
    with pytest.raises(ValueError, match=r"^the input is empty"):
        TokenizerManager._validate_one_request(tm, GenerateReqInput(text=""), [])
    # the hook itself: a multimodal request's ids hold placeholder pad values (not checked),
    # good ids pass through to SGLang's own validation
    from sglang_marconi.request_checks import check_input_ids

    mm = GenerateReqInput(input_ids=[5, 10 ** 9], image_data="x.png")
    assert check_input_ids(tm, mm, [5, 10 ** 9]) is None
    assert check_input_ids(tm, obj, [5, 6, 7]) is None

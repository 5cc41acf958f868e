"""Prompt embeddings and the prompt-to-prompt word alignment, with exact expected positions.

Token positions of the tiny tokenizer (start token 0, one or more tokens per word):
    "a photo of a person"       a:1  photo:2-6  of:7-8  a:9      person:10-15                end:16
    "a photo of an old person"  a:1  photo:2-6  of:7-8  an:9-10  old:11-13  person:14-19    end:20
"""

from __future__ import annotations

import pytest
import torch

from diffferv_cli.editing.prompts import encode_prompts, token_alignment

SHORT = "a photo of a person"
LONG = "a photo of an old person"


def _ids(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_token_positions_are_what_the_table_says(tiny):
    assert len(_ids(tiny.tokenizer, SHORT)) == 77
    assert _ids(tiny.tokenizer, SHORT).index(tiny.tokenizer.eos_token_id) == 16
    assert _ids(tiny.tokenizer, LONG).index(tiny.tokenizer.eos_token_id) == 20


def test_same_prompt_maps_every_position_to_itself(tiny):
    assert torch.equal(token_alignment(tiny.tokenizer, SHORT, SHORT), torch.arange(77))


def test_inserted_and_replaced_words_are_new_shared_words_map_to_their_source_tokens(tiny):
    mapping = token_alignment(tiny.tokenizer, SHORT, LONG).tolist()
    expected = list(range(9)) + [-1] * 5 + list(range(10, 16)) + [16] + [min(17 + i, 76) for i in range(56)]
    assert mapping == expected


def test_deleted_words_shift_the_rest_back(tiny):
    mapping = token_alignment(tiny.tokenizer, LONG, SHORT).tolist()
    expected = list(range(9)) + [-1] + list(range(14, 20)) + [20] + [min(21 + i, 76) for i in range(60)]
    assert mapping == expected


def test_words_match_regardless_of_case_and_a_new_last_word_is_new(tiny):
    mapping = token_alignment(tiny.tokenizer, SHORT, "A Photo of a person smiling").tolist()
    assert mapping[:16] == list(range(16))
    assert mapping[16:23] == [-1] * 7  # "smiling": 7 tokens
    assert mapping[23:] == list(range(16, 70))  # end token and padding, aligned from the ends


def test_shared_positions_hold_the_same_token_in_both_prompts(tiny):
    tokenizer = tiny.tokenizer
    for source, edited in [(SHORT, LONG), (LONG, SHORT), (SHORT, "a smiling photo of a person"),
                           ("photo person", "a photo of an old person wearing glasses")]:
        mapping = token_alignment(tokenizer, source, edited)
        source_ids, edit_ids = _ids(tokenizer, source), _ids(tokenizer, edited)
        assert mapping.shape == (77,) and mapping.dtype == torch.long
        for position, source_position in enumerate(mapping.tolist()):
            if source_position >= 0:
                assert edit_ids[position] == source_ids[source_position], (source, edited, position)


def test_prompts_longer_than_the_tokenizer_stay_in_range(tiny):
    long_prompt = " ".join(["a photo of a person"] * 12)
    mapping = token_alignment(tiny.tokenizer, long_prompt, long_prompt + " smiling")
    assert mapping.shape == (77,) and int(mapping.min()) >= -1 and int(mapping.max()) <= 76
    assert torch.equal(mapping, torch.arange(77))  # the shared prefix fills every position
    shifted = token_alignment(tiny.tokenizer, "an old " + long_prompt, long_prompt)  # source words sit later
    assert int(shifted.max()) == 76 and int(shifted.min()) >= -1
    assert shifted[1].item() == 1 + len(tiny.tokenizer("an old", add_special_tokens=False).input_ids)


def test_prompts_longer_than_the_tokenizer_are_truncated_not_refused(tiny):
    long_prompt = " ".join(["a photo of a person"] * 12)
    embeddings = encode_prompts(tiny, [long_prompt])
    ids = torch.tensor([tiny.tokenizer(long_prompt, truncation=True, max_length=77).input_ids])
    assert ids.shape == (1, 77)
    with torch.no_grad():
        assert torch.allclose(embeddings[0], tiny.text_encoder(ids)[0][0], atol=1e-5)


def test_embeddings_come_in_the_unet_dtype(tiny):
    from types import SimpleNamespace

    half_unet = SimpleNamespace(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, dtype=torch.float16)
    assert encode_prompts(half_unet, [SHORT]).dtype == torch.float16


def test_encode_prompts_equals_encoding_each_prompt_alone(tiny):
    prompts = [LONG, SHORT, LONG]
    embeddings = encode_prompts(tiny, prompts)
    assert embeddings.shape == (3, 77, tiny.text_encoder.config.hidden_size)
    assert embeddings.dtype == tiny.dtype
    assert torch.equal(embeddings[0], embeddings[2])  # equal prompts, bit-identical rows
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([_ids(tiny.tokenizer, prompt)])
        with torch.no_grad():
            alone = tiny.text_encoder(ids)[0][0]
        assert torch.allclose(embeddings[row].float(), alone.float(), atol=1e-5), prompt
    assert not torch.allclose(embeddings[0], embeddings[1])


@pytest.mark.parametrize("prompt", ["", "a"])
def test_very_short_prompts_align(tiny, prompt):
    mapping = token_alignment(tiny.tokenizer, prompt, prompt)
    assert torch.equal(mapping, torch.arange(77))


def test_prompts_of_more_than_200_words_still_align_word_by_word(tiny):
    """difflib's autojunk would treat every word repeated in a 200+ word prompt as junk, so words shifted
    by an insertion would find no match."""
    many_words = " ".join(["a photo of a person"] * 50)  # 250 words, each repeated 50 or 100 times
    mapping = token_alignment(tiny.tokenizer, many_words, "an old " + many_words).tolist()
    assert mapping == [0] + [-1] * 5 + list(range(1, 72))  # "an old": 5 new tokens, then the source's 1, 2, ...

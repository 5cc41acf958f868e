"""Text side: prompt embeddings and prompt-to-prompt word alignment for cross-attention replacement."""

from __future__ import annotations

import difflib

import torch


def encode_prompts(components, prompts: list[str]) -> torch.Tensor:
    """CLIP embeddings, (len(prompts), 77, hidden), in the UNet's dtype.

    Each distinct prompt is encoded once, so equal prompts get bit-identical embeddings (a batched text
    encoder does not guarantee that across rows; exact reconstruction relies on it)."""
    tokenizer = components.tokenizer
    unique = list(dict.fromkeys(prompts))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    skip = getattr(components, "clip_skip", None)
    with torch.inference_mode():
        if skip:  # diffusers' clip_skip: the hidden state `skip` layers before the last, through the final norm
            states = components.text_encoder(ids.to(components.text_encoder.device), output_hidden_states=True)
            encoder = getattr(components.text_encoder, "text_model", components.text_encoder)  # transformers 4 / 5
            embeddings = encoder.final_layer_norm(states.hidden_states[-(skip + 1)])
        else:
            embeddings = components.text_encoder(ids.to(components.text_encoder.device))[0]
    rows = torch.tensor([unique.index(prompt) for prompt in prompts], device=embeddings.device)
    return embeddings[rows].to(components.dtype)


def _word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    return [(word.lower(), tokenizer(word, add_special_tokens=False).input_ids) for word in prompt.split()]


def token_alignment(tokenizer, source: str, edit: str) -> torch.Tensor:
    """For each token position of `edit` (padded to the tokenizer length): the position of the same token
    in `source` when it belongs to a word the two prompts share, else -1 (a new word).

    Words are aligned with difflib on the word sequence (prompt-to-prompt's refinement alignment); the
    start token maps to itself, and the end and padding tokens of the two prompts are aligned from the end
    of each prompt."""
    length = tokenizer.model_max_length
    mapping = torch.full((length,), -1, dtype=torch.long)
    source_words, edit_words = _word_tokens(tokenizer, source), _word_tokens(tokenizer, edit)

    def starts(words):  # first token position of each word, after the start token
        positions, cursor = [], 1
        for _, ids in words:
            positions.append(cursor)
            cursor += len(ids)
        return positions, cursor

    source_starts, source_end = starts(source_words)
    edit_starts, edit_end = starts(edit_words)
    mapping[0] = 0
    matcher = difflib.SequenceMatcher(a=[w for w, _ in source_words], b=[w for w, _ in edit_words], autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            src_word, edit_word = block.a + offset, block.b + offset
            count = len(edit_words[edit_word][1])
            for token in range(count):
                target = edit_starts[edit_word] + token
                if target < length:
                    mapping[target] = min(source_starts[src_word] + token, length - 1)
    for position in range(min(edit_end, length), length):  # end token and padding
        mapping[position] = min(source_end + (position - edit_end), length - 1)
    return mapping

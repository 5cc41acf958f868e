"""Text side: prompt embeddings and prompt-to-prompt word alignment for cross-attention replacement."""

from __future__ import annotations

import difflib
import logging

import torch

log = logging.getLogger("diffferv")
_WARNED: set[tuple[int, str]] = set()  # (tokenizer length, prompt) already said to be cut, once per process


def encode_prompts(components, prompts: list[str]) -> torch.Tensor:
    """Text embeddings, (len(prompts), 77, width), in the UNet's dtype: CLIP's last layer (or the layer
    `components.clip_skip` before it, through the final norm, as diffusers' SD pipelines); for SDXL both
    encoders' penultimate layers side by side, as diffusers' SDXL pipeline.

    Each distinct prompt is encoded once, so equal prompts get bit-identical embeddings (a batched text
    encoder does not guarantee that across rows; exact reconstruction relies on it)."""
    return encode_conditioning(components, prompts)[0]


def encode_conditioning(components, prompts: list[str], size: tuple[int, int] | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(text embeddings as `encode_prompts`, the UNet's `added_cond_kwargs` per prompt or None).

    SDXL's UNet also takes the pooled embedding of its second encoder (`text_embeds`, (n, width)) and the
    time ids of the working frames `size` = (height, width): original size, crop corner (0, 0), target
    size (`time_ids`, (n, 6)), as diffusers' SDXL pipeline makes them for an uncropped image."""
    unique = list(dict.fromkeys(prompts))
    for prompt in unique:
        warn_if_cut(components.tokenizer, prompt)
    skip = getattr(components, "clip_skip", None)
    sdxl = getattr(components, "text_encoder_2", None) is not None
    states, pooled = [], None
    with torch.inference_mode():
        for tokenizer, encoder in zip((components.tokenizer, getattr(components, "tokenizer_2", None)),
                                      getattr(components, "text_encoders", (components.text_encoder,)), strict=False):
            ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            if sdxl:  # penultimate layer (skip N: N more), no final norm; pooled from the last encoder
                output = encoder(ids, output_hidden_states=True)
                states.append(output.hidden_states[-((skip or 0) + 2)])
                pooled = output[0]
            elif skip:  # the hidden state `skip` layers before the last, through the final norm
                output = encoder(ids, output_hidden_states=True)
                norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 / 5
                states.append(norm(output.hidden_states[-(skip + 1)]))
            else:
                states.append(encoder(ids)[0])
    embeddings = torch.cat(states, dim=-1)
    rows = torch.tensor([unique.index(prompt) for prompt in prompts], device=embeddings.device)
    dtype = components.dtype
    if pooled is None:
        return embeddings[rows].to(dtype), None
    if size is None:
        raise ValueError("SDXL's conditioning needs the working size")
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=embeddings.device).repeat(len(prompts), 1)
    return embeddings[rows].to(dtype), {"text_embeds": pooled[rows].to(dtype), "time_ids": time_ids}


def cut_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` that do not fit the text encoder (CLIP: 77 tokens, the start and end tokens
    among them), all of a word when part of it is cut; [] when the prompt fits."""
    room = tokenizer.model_max_length - 2  # the start and end tokens
    if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= room:
        return []
    used, cut = 0, []
    for word, ids in _word_tokens(tokenizer, prompt):
        used += len(ids)
        if used > room:
            cut.append(word)
    return cut


def warn_if_cut(tokenizer, prompt: str) -> None:
    """One warning per prompt and process naming the words the text encoder never sees."""
    cut = cut_words(tokenizer, prompt)
    if cut and (tokenizer.model_max_length, prompt) not in _WARNED:
        _WARNED.add((tokenizer.model_max_length, prompt))
        shown = " ".join(cut) if len(cut) <= 12 else " ".join(cut[:12]) + f" ... ({len(cut)} words)"
        log.warning("Warning: the prompt %r is longer than the text encoder's %d tokens; these words are cut: %s",
                    prompt if len(prompt) <= 60 else prompt[:57] + "...", tokenizer.model_max_length, shown)


def repeat_rows(added: dict[str, torch.Tensor] | None, frames: int, *, interleave: bool = True):
    """`added_cond_kwargs` of n prompts for a batch of n x `frames` rows (each prompt's rows together when
    `interleave`, else the n prompts tiled `frames` times); None stays None."""
    if added is None:
        return None
    if interleave:
        return {name: value.repeat_interleave(frames, dim=0) for name, value in added.items()}
    return {name: value.repeat(frames, 1) for name, value in added.items()}


def _word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    return [(word.lower(), tokenizer(word, add_special_tokens=False).input_ids) for word in prompt.split()]


def token_alignment_all(components, source: str, edit: str) -> torch.Tensor:
    """`token_alignment` under every tokenizer of the model: SDXL's two tokenizers feed one context side by
    side, so a position is aligned only where both tokenizers align it the same way (else it is a new word:
    its maps are kept)."""
    first = token_alignment(components.tokenizer, source, edit)
    second_tokenizer = getattr(components, "tokenizer_2", None)
    if second_tokenizer is None:
        return first
    second = token_alignment(second_tokenizer, source, edit)
    return torch.where(first == second, first, torch.full_like(first, -1))


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

"""Injection schedule (tau counts steps in exact arithmetic, from the noisiest); what the injector replaces."""

from __future__ import annotations

import pytest
import torch

from diffferv_cli.editing.features import FeatureInjector, FeatureRecorder, InjectionSchedule, injected_steps
from diffferv_cli.temporal.context import AttentionContext

TABLE = {  # (tau, T) -> injected steps = round(tau * T)
    (0.0, 10): 0, (0.1, 10): 1, (0.7, 10): 7, (0.8, 10): 8, (0.9, 10): 9, (1.0, 10): 10,
    (0.0, 50): 0, (0.1, 50): 5, (0.7, 50): 35, (0.8, 50): 40, (0.9, 50): 45, (1.0, 50): 50,
}


@pytest.mark.parametrize("tau, steps", sorted(TABLE))
def test_injected_steps_table(tau, steps):
    expected = TABLE[(tau, steps)]
    assert injected_steps(tau, steps) == expected
    for kind in ("app", "motion", "cross"):
        schedule = InjectionSchedule(steps, **{f"tau_{kind}": tau})
        active = [schedule.active(kind, step) for step in range(steps)]
        assert active == [True] * expected + [False] * (steps - expected)  # the noisiest steps first


def test_kinds_follow_their_own_tau():
    schedule = InjectionSchedule(10, tau_app=0.3, tau_motion=0.6, tau_cross=0.0)
    assert [sum(schedule.active(kind, step) for step in range(10)) for kind in ("app", "motion", "cross")] == [3, 6, 0]


def test_halves_round_up():
    assert injected_steps(0.25, 10) == 3 and injected_steps(0.05, 10) == 1 and injected_steps(0.04, 10) == 0


# FeatureInjector: what is replaced, from where, and what is kept ---------------------------------------

BRANCHES = ("source", "negative", "positive")
# target text token -> source text token: start token, a shared word moved by one place, a new word (-1),
# the end and padding tokens aligned from the end of each prompt
TOKEN_MAP = torch.tensor([0, 1, 3, -1, 4, 5])


def _injector(steps=4, source_branch="source", branches=BRANCHES, **taus):
    schedule = InjectionSchedule(steps, **taus)
    maps = {"negative": torch.arange(6), "positive": TOKEN_MAP}
    return FeatureInjector(schedule, branches, ("negative", "positive"), maps, source_branch=source_branch)


def _ctx(step=0, branches=BRANCHES):
    return AttentionContext(frames=2, branches=branches, step=step)


def test_cross_attention_replaces_shared_words_only_and_keeps_new_words():
    probs = torch.rand(3, 2, 2, 5, 6, generator=torch.Generator().manual_seed(0))  # (branches, frames, heads, tokens, text)
    out = _injector().cross_attention(_ctx(), "layer", probs)
    assert torch.equal(out[0], probs[0])  # the source branch itself is untouched
    assert torch.equal(out[1], probs[0])  # same prompt: every map is the source's
    for token, source_token in enumerate(TOKEN_MAP.tolist()):
        expected = probs[2][..., token] if source_token < 0 else probs[0][..., source_token]
        assert torch.equal(out[2][..., token], expected), token
    assert torch.equal(probs, torch.rand(3, 2, 2, 5, 6, generator=torch.Generator().manual_seed(0)))  # input kept


def test_self_attention_replaces_target_queries_and_keys_while_active_only():
    generator = torch.Generator().manual_seed(1)
    query, key = torch.rand(3, 2, 2, 5, 4, generator=generator), torch.rand(3, 2, 2, 5, 4, generator=generator)
    injector = _injector(steps=4, tau_app=0.5, tau_motion=0.25)
    for step, kind, active in [(0, "app", True), (1, "app", True), (2, "app", False), (0, "motion", True),
                               (1, "motion", False)]:
        new_query, new_key = injector.at_step(step).self_attention(_ctx(step), "layer", kind, query, key)
        for branch in range(3):
            from_source = active and branch > 0
            assert torch.equal(new_query[branch], query[0] if from_source else query[branch]), (step, kind, branch)
            assert torch.equal(new_key[branch], key[0] if from_source else key[branch]), (step, kind, branch)


def test_cross_maps_are_replaced_while_tau_cross_is_active():
    """Maps are computed in every step when any step replaces them (one graph for every step); they are
    replaced in the first round(tau_cross * T) steps only."""
    injector = _injector(steps=4, tau_cross=0.75)
    assert all(injector.at_step(step).wants_cross_maps(_ctx(step), "layer") for step in range(4))
    assert not _injector(steps=4, tau_cross=0.0).wants_cross_maps(_ctx(), "layer")
    probs = torch.rand(3, 2, 2, 5, 6, generator=torch.Generator().manual_seed(5))
    replaced = [not torch.equal(injector.at_step(step).cross_attention(_ctx(step), "layer", probs), probs)
                for step in range(4)]
    assert replaced == [True, True, True, False]


def test_disk_mode_takes_the_stored_features_of_the_layer():
    """No source branch: the stored features of this layer are used; a K stored once as Q (TTA) is Q."""
    generator = torch.Generator().manual_seed(2)
    branches = ("negative", "positive")
    query, key = torch.rand(2, 2, 2, 5, 4, generator=generator), torch.rand(2, 2, 2, 5, 4, generator=generator)
    stored = {"a:app.q": torch.rand(2, 2, 5, 4, generator=generator),
              "a:app.k": torch.rand(2, 2, 5, 4, generator=generator),
              "a:motion.q": torch.rand(2, 2, 5, 4, generator=generator),
              "b:app.q": torch.rand(2, 2, 5, 4, generator=generator),
              "b:app.k": torch.rand(2, 2, 5, 4, generator=generator),
              "a:cross": torch.rand(2, 2, 5, 6, generator=generator)}
    injector = _injector(source_branch=None, branches=branches)
    with pytest.raises(RuntimeError, match="stored features"):
        injector.at_step(0).self_attention(_ctx(branches=branches), "a", "app", query, key)
    injector = injector.at_step(0, stored)
    new_query, new_key = injector.self_attention(_ctx(branches=branches), "a", "app", query, key)
    assert all(torch.equal(new_query[b], stored["a:app.q"]) and torch.equal(new_key[b], stored["a:app.k"])
               for b in range(2))
    new_query, new_key = injector.self_attention(_ctx(branches=branches), "a", "motion", query, query)
    assert all(torch.equal(new_query[b], stored["a:motion.q"]) and torch.equal(new_key[b], stored["a:motion.q"])
               for b in range(2))
    probs = torch.rand(2, 2, 2, 5, 6, generator=generator)
    out = injector.cross_attention(_ctx(branches=branches), "a", probs)
    assert torch.equal(out[0], stored["a:cross"])
    assert torch.equal(out[1][..., 3], probs[1][..., 3]) and torch.equal(out[1][..., 2], stored["a:cross"][..., 3])


def test_recorder_keeps_branch_zero_and_stores_a_shared_query_key_once():
    generator = torch.Generator().manual_seed(3)
    query, key = torch.rand(1, 2, 2, 5, 4, generator=generator), torch.rand(1, 2, 2, 5, 4, generator=generator)
    recorder = FeatureRecorder(dtype=torch.float32)
    recorder.self_attention(_ctx(branches=("main",)), "a", "app", query, key)
    recorder.self_attention(_ctx(branches=("main",)), "a", "motion", query, query)
    probs = torch.rand(1, 2, 2, 5, 6, generator=generator)
    recorder.cross_attention(_ctx(branches=("main",)), "a", probs)
    assert set(recorder.features) == {"a:app.q", "a:app.k", "a:motion.q", "a:cross"}
    assert torch.equal(recorder.features["a:app.q"], query[0]) and torch.equal(recorder.features["a:app.k"], key[0])
    assert torch.equal(recorder.features["a:cross"], probs[0])
    recorder.reset()
    assert recorder.features == {}


def test_only_the_target_branches_are_overridden():
    """A branch that is neither source nor target (here "negative") keeps its own Q, K and maps."""
    generator = torch.Generator().manual_seed(4)
    query, key = torch.rand(3, 2, 2, 5, 4, generator=generator), torch.rand(3, 2, 2, 5, 4, generator=generator)
    probs = torch.rand(3, 2, 2, 5, 6, generator=generator)
    injector = FeatureInjector(InjectionSchedule(4), BRANCHES, ("positive",), {"positive": torch.arange(6)})  # recompute mode
    new_query, new_key = injector.self_attention(_ctx(), "layer", "app", query, key)
    out = injector.cross_attention(_ctx(), "layer", probs)
    for new, old in ((new_query, query), (new_key, key), (out, probs)):
        assert torch.equal(new[1], old[1]) and torch.equal(new[2], old[0])


def test_recorder_stores_half_precision_and_asks_for_cross_maps():
    """Disk mode stores features as float16 by default (half the disk of float32), cross maps included."""
    recorder = FeatureRecorder()
    query = torch.rand(1, 2, 2, 5, 4, dtype=torch.float32)
    recorder.self_attention(_ctx(branches=("main",)), "a", "app", query, query + 1)
    recorder.cross_attention(_ctx(branches=("main",)), "a", torch.rand(1, 2, 2, 5, 6))
    assert {name: t.dtype for name, t in recorder.features.items()} == {
        "a:app.q": torch.float16, "a:app.k": torch.float16, "a:cross": torch.float16}
    assert torch.allclose(recorder.features["a:app.k"].float(), query[0] + 1, atol=1e-3)
    assert recorder.wants_cross_maps(_ctx(branches=("main",)), "a")


def test_an_injector_not_yet_at_a_step_uses_the_flags_of_step_zero():
    generator = torch.Generator().manual_seed(6)
    query, key = torch.rand(3, 2, 2, 5, 4, generator=generator), torch.rand(3, 2, 2, 5, 4, generator=generator)
    new_query, _ = _injector(steps=4, tau_app=0.25).self_attention(_ctx(), "layer", "app", query, key)
    assert torch.equal(new_query[2], query[0])  # step 0 is on (1 of 4 steps), step 1 would be off
    disk = _injector(source_branch=None, branches=("negative", "positive"))
    with pytest.raises(RuntimeError, match=r"^disk feature mode needs the step's stored features \(at_step\(step, stored\)\)$"):
        disk.self_attention(_ctx(branches=("negative", "positive")), "a", "app", query[:2], key[:2])


def test_tta_query_and_key_are_one_tensor_in_recompute_mode():
    generator = torch.Generator().manual_seed(7)
    h = torch.rand(3, 2, 2, 5, 4, generator=generator)
    new_query, new_key = _injector().self_attention(_ctx(), "layer", "motion", h, h)
    assert new_key is new_query
    assert torch.equal(new_query[0], h[0]) and torch.equal(new_query[1], h[0]) and torch.equal(new_query[2], h[0])


def test_disk_mode_uses_the_stored_query_for_a_key_that_was_not_stored():
    generator = torch.Generator().manual_seed(8)
    branches = ("negative", "positive")
    query, key = torch.rand(2, 2, 2, 5, 4, generator=generator), torch.rand(2, 2, 2, 5, 4, generator=generator)
    stored = {"c:app.q": torch.rand(2, 2, 5, 4, generator=generator).half()}
    injector = _injector(source_branch=None, branches=branches).at_step(0, stored)
    new_query, new_key = injector.self_attention(_ctx(branches=branches), "c", "app", query, key)
    assert new_query.dtype == torch.float32
    assert all(torch.equal(new_query[b], stored["c:app.q"].float()) and torch.equal(new_key[b], stored["c:app.q"].float())
               for b in range(2))


def test_an_injector_without_targets_changes_nothing():
    generator = torch.Generator().manual_seed(9)
    query, key = torch.rand(2, 2, 2, 5, 4, generator=generator), torch.rand(2, 2, 2, 5, 4, generator=generator)
    branches = ("source", "negative")
    injector = FeatureInjector(InjectionSchedule(4), branches, (), {})
    new_query, new_key = injector.self_attention(_ctx(branches=branches), "layer", "app", query, key)
    assert torch.equal(new_query, query) and torch.equal(new_key, key)

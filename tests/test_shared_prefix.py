"""Packing prompts that share a prefix (pure Python; the model side is in test_engine.py)."""

from __future__ import annotations

import random

from pytest_mtserve.server.shared_prefix import PREFIX_SEGMENT, pack_prompts


def unpacked(pack, k: int) -> list[int]:
    return [pack.tokens[slot] for slot in pack.member_slots[k]]


def test_choices_of_one_question_share_its_context() -> None:
    context = list(range(100, 140))
    prompts = [context + [7], [1, 2, 3], context + [5, 6], context + [9]]
    packs = pack_prompts(prompts)
    assert sorted(len(p.members) for p in packs) == [1, 3]
    shared = next(p for p in packs if len(p.members) == 3)
    assert len(shared) == 40 + 1 + 2 + 1
    assert sorted(shared.members) == [0, 2, 3]
    for k, member in enumerate(shared.members):
        assert unpacked(shared, k) == prompts[member]
        assert [shared.positions[slot] for slot in shared.member_slots[k]] == list(range(len(prompts[member])))
        own = [slot for slot in shared.member_slots[k] if shared.segments[slot] != PREFIX_SEGMENT]
        assert {shared.segments[slot] for slot in own} == {k + 1}


def test_every_prompt_lands_in_exactly_one_pack_and_unpacks_to_itself() -> None:
    rng = random.Random(0)
    heads = [[rng.randrange(50) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    prompts = [rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randint(0, 20))] for _ in range(60)]
    packs = pack_prompts(prompts)
    assert sorted(m for p in packs for m in p.members) == list(range(len(prompts)))
    for pack in packs:
        assert len(pack.tokens) == len(pack.positions) == len(pack.segments)
        longest = max(len(prompts[m]) for m in pack.members)
        assert len(pack) <= 2 * longest
        for k, member in enumerate(pack.members):
            assert unpacked(pack, k) == prompts[member]
    assert len(packs) < len(prompts)


def test_prompts_sharing_little_are_not_packed() -> None:
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 9, 9, 9, 9], [8, 8]]
    assert [len(p.members) for p in pack_prompts(prompts)] == [1, 1, 1]


def test_identical_prompts_share_everything() -> None:
    packs = pack_prompts([[4, 5, 6], [4, 5, 6]])
    assert len(packs) == 1 and packs[0].tokens == [4, 5, 6]
    assert packs[0].member_slots == [[0, 1, 2], [0, 1, 2]]


def test_without_sharing_each_prompt_is_its_own_pack() -> None:
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5]]
    packs = pack_prompts(prompts, share=False)
    assert [p.tokens for p in sorted(packs, key=lambda p: p.members)] == prompts

"""The mixer: exact exposure at any ratio, a shuffled round-robin, seeded, resumable, finite
sources stop it, clear errors."""

import itertools
import random

import pytest

from omgseg.datasets.mixer import Mixer


class NeverOpened:
    def __iter__(self):
        raise AssertionError("a dataset with ratio 0 must not be opened")


def infinite(name):
    return (f"{name}{i}" for i in itertools.count())


def test_every_block_ends_with_each_data_set_within_one_sample_of_its_share():
    ratios = {"coco": 3, "ade": 1.0, "ytvis": 0.5, "davis": 0}
    streams = {name: infinite(name) for name in ("coco", "ade", "ytvis")} | {"davis": NeverOpened()}
    mixer = Mixer(ratios, streams, seed=11)
    counts = dict.fromkeys(("coco", "ade", "ytvis"), 0)
    drawn = list(itertools.islice(mixer, 4000))
    for n, (name, _) in enumerate(drawn, start=1):
        counts[name] += 1
        off = max(abs(counts[k] - n * ratios[k] / 4.5) for k in counts)
        assert off < (1 if n % 3 == 0 else 3), (n, counts)  # blocks of 3 draws, shuffled inside
    assert mixer.counts == counts
    mix = mixer.realised_mix()
    assert abs(sum(mix.values()) - 1) < 1e-9 and abs(mix["coco"] - 2 / 3) < 1e-3
    # Items come from their own stream, in that stream's order.
    coco = [item for name, item in drawn if name == "coco"]
    assert coco[:3] == ["coco0", "coco1", "coco2"]


def test_equal_ratios_are_a_shuffled_round_robin():
    mixer = Mixer({"a": 1, "b": 1, "c": 1}, {n: infinite(n) for n in "abc"}, seed=5)
    names = [name for name, _ in itertools.islice(mixer, 300)]
    blocks = [names[i:i + 3] for i in range(0, 300, 3)]
    assert all(sorted(b) == ["a", "b", "c"] for b in blocks)  # each block: one of each
    assert len({tuple(b) for b in blocks}) > 1  # in a shuffled order


def test_start_resumes_the_same_schedule():
    def run(start):
        mixer = Mixer({"a": 2, "b": 1}, {"a": infinite("a"), "b": infinite("b")}, seed=3, start=start)
        return mixer, [name for name, _ in itertools.islice(mixer, 20)]

    _, whole = run(0)
    mixer, rest = run(7)
    assert rest[:13] == whole[7:]
    assert mixer.counts_after(7) == {"a": whole[:7].count("a"), "b": whole[:7].count("b")}


def test_a_resume_from_block_counts_starts_at_its_block_and_draws_alike():
    ratios = {"a": 3, "b": 1.5, "c": 1}
    whole = Mixer(ratios, {n: infinite(n) for n in ratios}, seed=2)
    names = [name for name, _ in itertools.islice(whole, 400)]
    for cut in (1, 2, 3, 7, 299):
        first = Mixer(ratios, {n: infinite(n) for n in ratios}, seed=2)
        list(itertools.islice(first, cut))
        counts = {n: names[:cut].count(n) for n in ratios}
        resumed = Mixer(ratios, {n: infinite(n) for n in ratios}, seed=2, start=cut, block_counts=first.block_counts)
        assert resumed.counts_after(cut) == counts
        assert [name for name, _ in itertools.islice(resumed, 400 - cut)] == names[cut:], cut
        # Only the draws of the resumed block are replayed, not every draw before it.
        assert sum(first.block_counts.values()) == cut - cut % 3
    with pytest.raises(ValueError, match="do not belong to that block's start"):
        list(itertools.islice(Mixer(ratios, {n: infinite(n) for n in ratios}, start=7, block_counts={"a": 5}), 1))


def test_seeded_and_independent_of_the_global_random_module():
    def run(seed):
        random.seed(12345)  # what other code might do; must not change the mixer's choices
        mixer = Mixer({"a": 1, "b": 1}, {"a": infinite("a"), "b": infinite("b")}, seed=seed)
        return [name for name, _ in itertools.islice(mixer, 50)]

    state = random.getstate()
    first = run(0)
    random.seed(999)
    assert run(0) == first
    assert run(1) != first
    random.setstate(state)


def test_a_finite_source_stops_the_mix_and_is_recorded():
    mixer = Mixer({"big": 0.5, "small": 0.5}, {"big": range(50), "small": range(20)}, seed=0)
    drawn = list(mixer)
    assert mixer.exhausted == "small"
    assert mixer.counts["small"] == 20 and len(drawn) == sum(mixer.counts.values()) < 70
    # Iterating again starts over from the seed.
    assert list(mixer) == drawn


def test_single_dataset():
    mixer = Mixer({"only": 2.0}, {"only": "abc"})
    assert list(mixer) == [("only", "a"), ("only", "b"), ("only", "c")]
    assert mixer.realised_mix() == {"only": 1.0} and mixer.exhausted == "only"


@pytest.mark.parametrize(
    ("ratios", "streams", "message"),
    [
        ({}, {}, "ratios is empty"),
        ({"a": -0.1}, {"a": []}, "ratio of 'a' must be finite and >= 0"),
        ({"a": float("nan")}, {"a": []}, "ratio of 'a'"),
        ({"a": "1"}, {"a": []}, "ratio of 'a' must be a number"),
        ({"a": 1, "ghost": 1}, {"a": []}, r"\['ghost'\] have a ratio but no stream"),
        ({"a": 1}, {"a": [], "extra": []}, r"unknown datasets \['extra'\]"),
        ({"a": 0, "b": 0.0}, {"a": [], "b": []}, "all ratios are 0"),
    ],
)
def test_errors_name_the_key(ratios, streams, message):
    with pytest.raises(ValueError, match=message):
        Mixer(ratios, streams)

"""live/controls.py: what the page may change, checked whole, versioned."""
import math
import threading

import pytest

from live.controls import Controls, LiveSettings


def test_a_change_is_applied_and_versioned():
    controls = Controls(LiveSettings(prompt="a photo of sks person"))
    assert controls.current() == (0, LiveSettings(prompt="a photo of sks person"))
    settings = controls.update({"morph": "  Tom Cruise ", "morph_weight": "0.25"})
    assert settings.morph == "Tom Cruise" and settings.morph_weight == 0.25
    assert settings.prompt == "a photo of sks person"  # untouched fields stay
    assert controls.current() == (1, settings)
    assert controls.update({"morph": ""}).morph is None


@pytest.mark.parametrize("changes, words", [
    ({"morph_weight": 1.5}, "morph_weight: must be between 0 and 1"),
    ({"temporal_strength": "abc"}, "temporal_strength: wants a number"),
    ({"conditioning_scale": math.nan}, "conditioning_scale: must be between"),
    ({"conditioning_scale": -1}, "conditioning_scale: must be between"),
    ({"prompt": 3}, "prompt: wants text"),
    ({"steps": 4}, "unknown setting 'steps'"),
])
def test_a_bad_value_is_refused_whole(changes, words):
    controls = Controls()
    before = controls.current()
    with pytest.raises(ValueError, match=words):
        controls.update({"morph": "Tom Cruise", **changes})
    assert controls.current() == before  # nothing of a refused change is applied


def test_changes_from_many_threads_all_count():
    controls = Controls()
    threads = [threading.Thread(target=lambda: [controls.update({"morph_weight": 0.5}) for _ in range(200)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert controls.current()[0] == 800

"""The dashboard's pure parts: chart buckets, tile rates, session cookie signatures."""

from __future__ import annotations

import itertools

from api.ui.session import sign, unsign
from api.ui.stats import buckets, merge, tiles
from api.ui.views import json_for_script


def test_ranges_up_to_14_days_are_charted_by_the_hour_longer_ones_by_the_day() -> None:
    step, times = buckets(1_000_000_000, 1_000_000_000 + 14 * 86_400)
    assert step == 3600 and times[0] == 999_997_200 and len(times) == 14 * 24 + 1
    step, times = buckets(1_000_000_000, 1_000_000_000 + 15 * 86_400)
    assert step == 86_400 and times[0] == 999_993_600 and len(times) == 16
    assert all(b - a == step for a, b in itertools.pairwise(times))


def test_tile_rates_are_per_injected_and_per_delivered_and_absent_without_traffic() -> None:
    t = tiles({"injected": 10, "ok": 8, "hardbounce": 1, "softbounce": 1, "spambounce": 0},
              unique_opens=4, unique_clicks=2)
    assert (t["delivery_rate"], t["bounce_rate"], t["open_rate"], t["click_rate"]) == (
        0.8, 0.2, 0.5, 0.25)
    empty = tiles({}, 0, 0)
    assert (empty["delivery_rate"], empty["open_rate"]) == (None, None)


def test_a_session_cookie_is_accepted_only_with_its_own_signature() -> None:
    cookie = sign("tok123", b"k1")
    assert unsign(cookie, b"k1") == "tok123"
    assert unsign(cookie, b"k2") is None
    assert unsign("tok124." + cookie.split(".")[1], b"k1") is None
    assert unsign("tok123", b"k1") is None and unsign(None, b"k1") is None


def test_chart_json_cannot_close_its_script_element() -> None:
    text = json_for_script({"label": "</script><b>&"})
    assert "</script>" not in text and "<" not in text and "&" not in text


def test_the_subaccounts_overview_replies_are_summed_per_field_and_bucket() -> None:
    fields = ",".join(["1,2", "0,1", "0,0", "1,0", "0,0", "0,0", "0,0", "3,0", "0,1"])
    other = ",".join(["5,0", "4,0", "0,0", "0,0", "0,1", "0,0", "0,0", "0,0", "0,0"])
    sums, opens, clicks = merge(2, [(fields.encode(), 2, 1), (other, 0, 0)])
    assert sums["injected"] == [6, 2] and sums["ok"] == [4, 1]
    assert sums["hardbounce"] == [1, 0] and sums["softbounce"] == [0, 1]
    assert sums["open"] == [3, 0] and (opens, clicks) == (2, 1)

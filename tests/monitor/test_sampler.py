import time

from kvscope.monitor import Monitor


def test_sampler_records_rss_and_phases_in_order():
    with Monitor(interval=0.01) as m:
        with m.phase("load"):
            time.sleep(0.03)
        m.mark("prefill", "chunk 1/2")
        time.sleep(0.02)
        m.mark("decode")
        time.sleep(0.02)
    d = m.to_dict()
    tl = d["timeline"]
    assert len(tl["t"]) >= 3 and len(tl["rss"]) == len(tl["t"]) and all(r > 0 for r in tl["rss"])
    assert tl["allocated"] == [] and tl["nvml_used"] is None  # no CUDA here
    names = [p["name"] for p in d["phases"]]
    assert names == ["load", "prefill", "decode"]
    assert all(p["end"] >= p["start"] for p in d["phases"])
    assert d["phases"][1]["end"] <= d["phases"][2]["start"] + 1e-9

"""Invalid RLEs are refused before pycocotools reads them: a truncated string, run lengths of the wrong total,
characters outside the alphabet and negative runs raise RLEFormatError from every function that takes an RLE,
alone or in a union. (pycocotools returned wrong masks for such strings and its merge never returned: the cases
run in a child process with a deadline, so a hang fails the test instead of stalling the suite.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from veason_ray.datasets.rle import RLEFormatError, compressed_runs, decode_rle, encode_mask, rle_area

REPO = Path(__file__).resolve().parents[1]


def coco_string(values: list[int]) -> str:
    """COCO's compressed string of raw values (the differences from the third on, as pycocotools writes them)."""
    out = []
    for value in values:
        while True:
            code = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not code & 0x10) or (value == -1 and code & 0x10))
            out.append(chr(48 + (code | (0x20 if more else 0))))
            if not more:
                break
    return "".join(out)


def _valid() -> dict:
    mask = np.zeros((240, 320), bool)
    mask[50:120, 60:200] = True
    return encode_mask(mask)


def bad_rles() -> dict[str, dict]:
    valid = _valid()
    counts = valid["counts"]
    return {
        "truncated half": {"size": valid["size"], "counts": counts[: len(counts) // 2]},
        "ends inside a run": {"size": valid["size"], "counts": counts + "a"},  # 'a' = 49 | continuation bit
        "wrong total": {"size": [120, 320], "counts": counts},
        "garbage": {"size": valid["size"], "counts": "hello, world!"},
        "negative run": {"size": [1, 10], "counts": coco_string([5, 3, 2, -10])},  # the 4th run: 3 - 10
        "not ascii": {"size": valid["size"], "counts": "é" + counts},
    }


def test_compressed_runs_read_what_pycocotools_writes():
    rng = np.random.default_rng(1)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((height, width)) < rng.random()
        flat = mask.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        if flat[0]:
            runs = [0, *runs]  # COCO's counts start with a run of zeros
        assert compressed_runs(encode_mask(mask)["counts"].encode()) == runs
    assert compressed_runs(coco_string([5, 3, 2, 4]).encode()) == [
        5,
        3,
        2,
        7,
    ]  # from the 4th: + the run 2 back


@pytest.mark.parametrize("case", list(bad_rles()))
def test_a_bad_rle_is_refused_by_decode_and_area(case):
    rle = bad_rles()[case]
    with pytest.raises(RLEFormatError, match=r"mask\.counts|mask\.size"):
        decode_rle(rle, "mask")
    with pytest.raises(RLEFormatError, match=r"mask\.counts|mask\.size"):
        rle_area(rle, "mask")


def test_no_bad_rle_can_hang_a_union():
    """Every bad case alone and in a union with a valid RLE, in a child process given 60 s in all."""
    script = """
import json, sys
from veason_ray.datasets.rle import RLEFormatError, decode_rle, rle_area, union_rle_area
cases, valid = json.loads(sys.stdin.read())
out = {}
for name, rle in cases.items():
    for label, call in (("union", lambda: union_rle_area([valid, rle], "m")),
                        ("union alone", lambda: union_rle_area([rle], "m")),
                        ("area", lambda: rle_area(rle, "m")), ("decode", lambda: decode_rle(rle, "m"))):
        try:
            call()
            out[f"{name}/{label}"] = "accepted"
        except RLEFormatError:
            out[f"{name}/{label}"] = "refused"
print(json.dumps(out))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps([bad_rles(), _valid()]), cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    assert len(outcomes) == 4 * len(bad_rles())
    assert set(outcomes.values()) == {"refused"}, outcomes


def test_a_union_of_different_sizes_is_refused_and_valid_unions_are_exact():
    from veason_ray.datasets.rle import union_rle_area

    small = encode_mask(np.ones((2, 3), bool))
    with pytest.raises(RLEFormatError, match="different sizes"):
        union_rle_area([_valid(), small])
    a, b = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    a[:10], b[5:20] = True, True
    assert union_rle_area([encode_mask(a), encode_mask(b)]) == (a | b).sum() == 800

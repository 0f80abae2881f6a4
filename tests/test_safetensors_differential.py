"""Our safetensors reader accepts exactly what the reference library accepts, and reads what it reads (issue 11,
class 9): a differential property test over generated headers. WEIGHTSPACE_DIFF_EXAMPLES sets the number of cases
(bench/fuzz_safetensors.py runs ≥ 10,000)."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetensors_oracle import DTYPE_BITS, Obj, _mutate_header, agree, file_bytes, render

EXAMPLES = int(os.environ.get("WEIGHTSPACE_DIFF_EXAMPLES", "1500"))
VALID = [d for d in DTYPE_BITS if not d.startswith("F6")]


@st.composite
def safetensors_files(draw) -> bytes:
    """A header built from drawn tensors and metadata, then 0-3 structure-aware edits; data of the announced size,
    sometimes a byte more or less."""
    header = Obj()
    if draw(st.booleans()):
        header.append(("__metadata__", Obj([(k, v) for k, v in draw(st.dictionaries(st.text(max_size=4),
                                                                                    st.text(max_size=4), max_size=2)).items()])))
    pos = 0
    keys = draw(st.lists(st.text(max_size=5), max_size=4, unique=True))
    for key in keys:
        dtype = draw(st.sampled_from(VALID))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if dtype == "F4" and (not shape or shape[-1] % 2):
            shape = shape[:-1] + [2]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPE_BITS[dtype] // 8
        header.append((key, Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [pos, pos + nbytes])])))
        pos += nbytes
    rng = draw(st.randoms(use_true_random=False))
    text = header
    for _ in range(draw(st.integers(0, 3))):
        text = _mutate_header(text, rng) if isinstance(text, Obj) else text
    text = text if isinstance(text, str) else render(text)
    size = max(0, pos + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
    key = draw(st.integers(0, 255))
    data = bytes(key ^ (i * 37 % 256) for i in range(size))
    return file_bytes(text, data)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(blob=safetensors_files())
def test_reader_agrees_with_reference(tmp_path, blob):
    path = tmp_path / "case.safetensors"
    path.write_bytes(blob)
    agree(path)


def test_generator_reaches_both_outcomes(tmp_path):
    """The generated cases must exercise acceptance and refusal alike, or the property proves little."""
    outcomes = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(blob=safetensors_files())
    def run(blob):
        path = tmp_path / "case.safetensors"
        path.write_bytes(blob)
        outcomes.append(agree(path))
    run()
    assert 0.2 < sum(outcomes) / len(outcomes) < 0.9, sum(outcomes) / len(outcomes)

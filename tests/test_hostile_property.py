"""Property: whatever values the spec's fields and the site keys get (random text with control
characters, quotes and `$()`, numbers, NaN, huge values, wrong types), building them gives either a
valid spec or one SpecError line, never another exception; and nothing rendered from a valid one
holds a control character that could change what the scripts do."""

from __future__ import annotations

import tempfile
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llamajobs import render, spec
from llamajobs import site as site_mod
from llamajobs.errors import SpecError

SHELLISH = st.sampled_from(["$(touch PWNED)", "`id`", "'", '"', "\\", ";", "&&", "\n", "\r", "\x00", "\x1b", "\t",
                            "\x85", " ", "{gpus}", "{", "1:00:00", "2.5B", "nan", "-1", "0", "all", "gpu"])
TEXT = st.one_of(st.text(max_size=12), st.lists(SHELLISH, max_size=4).map("".join),
                 st.tuples(st.text(max_size=4), SHELLISH, st.text(max_size=4)).map("".join))
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-4, max_value=10**30), st.floats(allow_nan=True),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, 1e308, 0, -1, 1, 2, 8]))
SCALARS = st.one_of(TEXT, NUMBERS, st.booleans(), st.none(), st.binary(max_size=4))
HOSTILE = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=2))
# Values a field might well take, so that many examples are valid and get rendered (with the hostile
# ones beside them: "; touch PWNED" is printable text).
PLAUSIBLE = st.one_of(st.from_regex(r"[A-Za-z0-9_.:/{}$ ;'\"-]{1,10}", fullmatch=True), st.integers(1, 8),
                      st.sampled_from([True, False, None, "fsdp", "lora", "7b", "1:00:00", "8G", "q_proj"]))
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, HOSTILE)

SPEC_KEYS = st.sampled_from(sorted(set(spec.FIELDS) - {"evaluation"}))
SITE_KEYS = st.sampled_from(sorted(site_mod.SITE_KEYS))
# Around a plausible base, so that a good share of examples is valid and gets rendered.
BASE = {"cluster": "slurm", "procs_per_node": 1, "global_batch": 4, "micro_batch": 4}


def one_line(error: SpecError) -> bool:
    text = str(error)
    return bool(text) and not any(unicodedata.category(c) == "Cc" for c in text)


def assert_no_control_characters(folder: Path) -> None:
    for path in folder.iterdir():
        text = path.read_text()
        bad = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"}  # (tabs: setup's indent)
        assert not bad, f"{path.name} holds {bad}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_values=st.dictionaries(SPEC_KEYS, VALUES, max_size=2),
       site_values=st.dictionaries(SITE_KEYS, VALUES, max_size=2))
def test_random_values_give_a_spec_or_one_line(spec_values, site_values):
    try:
        site, defaults = site_mod.from_mapping(dict(site_values))
        built = spec.build({**BASE, **spec_values}, site=defaults)
    except SpecError as e:
        assert one_line(e), repr(str(e))
        event("refused")
        return
    event("valid: rendered")
    with tempfile.TemporaryDirectory() as folder:
        try:
            render.render(built, site, Path(folder) / "run")
        except SpecError as e:  # (a site python or container may still be refused by render)
            assert one_line(e)
            return
        assert_no_control_characters(Path(folder) / "run")
    assert spec.JobSpec.from_json(built.to_json()) == built  # and spec.json reads back as it was written

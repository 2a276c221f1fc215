"""tests/conftest.py's --shard: the shards of a selection are disjoint, in order, and together the whole of it; a bad
value stops the run before anything is collected."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
TESTS = "\n".join(f"def test_{i}():\n    pass\n" for i in range(7))


def _collected(pytester: pytest.Pytester, *args: str) -> tuple[int, list[str]]:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_some=TESTS)
    result = pytester.runpytest_inprocess("--collect-only", "-q", *args)
    return result.ret, [line for line in result.outlines if "::" in line]


def test_shards_partition_the_selection_in_order(pytester):
    code, everything = _collected(pytester)
    assert code == 0 and len(everything) == 7
    shards = [_collected(pytester, "--shard", f"{k}/3")[1] for k in (1, 2, 3)]
    assert sum(shards, []) == everything
    assert sorted(map(len, shards)) == [2, 2, 3]


@pytest.mark.parametrize("bad", ["0/2", "3/2", "two"])
def test_a_bad_shard_is_a_usage_error(pytester, bad):
    code, collected = _collected(pytester, "--shard", bad)
    assert code == pytest.ExitCode.USAGE_ERROR and not collected

"""kill -9 at exact write steps, then --resume: every file byte-identical to an uninterrupted run.

The short version of `bench/kill_resume.py` (100 kills per job there): each job runs once uninterrupted,
listing its write steps, then is killed at a few named steps (mid-shard, between the routing report's
heatmap and its JSON, before the completion record, inside a shard), checked to be incomplete, resumed, and compared
file by file (sha256 of everything in the folder, `.zenith/` included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kill_resume  # noqa: E402


def _first(steps: list[str], prefix: str, nth: int = 0) -> int:
    """The 1-based number of the nth step whose name starts with `prefix`."""
    found = [i + 1 for i, name in enumerate(steps) if name.startswith(prefix)]
    assert len(found) > nth, f"no step {prefix!r} (#{nth}) in {steps[:5]}..."
    return found[nth]


def _campaign(job: str, tmp_path: Path, points) -> None:
    ref, steps, _ = kill_resume.reference(job, tmp_path)
    kill_resume.reference_digests[job] = ref
    for at in points(steps):
        assert 0 < at < len(steps)
        assert kill_resume.kill_and_resume(job, tmp_path, at_step=at, last_step=len(steps)) is None, steps[at - 1]


def test_passthrough_killed_between_heatmap_and_report_and_before_completion(tmp_path):
    _campaign("passthrough", tmp_path, lambda steps: [
        _first(steps, "wrote routing.png"),      # the heatmap written, its JSON not yet (issue 22, defect 1)
        len(steps) - 1,                          # everything written but the completion record
    ])


def test_fp8_cast_killed_mid_shard(tmp_path):
    _campaign("fp8-cast", tmp_path, lambda steps: [_first(steps, "tensor ", 7)])


@pytest.mark.parametrize("job", ["regmean", "graft"])
def test_merge_with_stages_killed_while_writing_shards(tmp_path, job):
    job = kill_resume.smaller(job, tmp_path)  # less calibration text, no routing report: the same write steps
    _campaign(job, tmp_path, lambda steps: [_first(steps, "tensor ", 3)])


def test_a_dare_ties_merge_killed_mid_shard_resumes_to_the_same_random_drops(tmp_path):
    """A mergekit-yaml method with random drops (merge/examples/ties.yml as dare_ties): the drops are seeded per
    tensor, so the resumed shard holds the same bytes as the uninterrupted run's."""
    import yaml

    data = yaml.safe_load((kill_resume.ROOT / "merge/examples/ties.yml").read_text())
    data["merge_method"] = "dare_ties"
    config = tmp_path / "dare_ties.yml"
    config.write_text(yaml.safe_dump(data))
    kill_resume.JOBS["dare-ties"] = ["merge", str(config)]
    _campaign("dare-ties", tmp_path, lambda steps: [_first(steps, "tensor ", 40)])

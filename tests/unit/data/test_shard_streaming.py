"""The builder reads the source twice and holds no more than a few shards of Records: a source of 377,000
rows streams. A source that lists other records the second time stops the build, and what it wrote goes."""
from __future__ import annotations

import weakref

import pytest

from cxrdist.data.index import load_index, verify_checksums
from cxrdist.data.listing import SourceChanged
from cxrdist.data.shard import build_shards
from cxrdist.data.sources.phantom import PhantomSource

OPTS = dict(size=16, folds=2, test_fraction=0.2, seed=0, shard_size=10, workers=1, progress=False)


class CountingSource(PhantomSource):
    """Phantoms that count how many of the Records they handed out are still alive, and may change."""

    def __init__(self, n: int, change_on_reading: int = 0, change=None) -> None:
        super().__init__(n, size=16)
        self.readings, self.most_alive = 0, 0
        self.change_on_reading, self.change = change_on_reading, change
        self.alive = 0

    def records(self):
        self.readings += 1
        for record in super().records():
            if self.readings == self.change_on_reading:
                record = self.change(record)
                if record is None:
                    continue
            self.alive += 1
            weakref.finalize(record, self._dropped)
            self.most_alive = max(self.most_alive, self.alive)
            yield record

    def _dropped(self) -> None:
        self.alive -= 1


def test_a_build_holds_a_few_shards_of_records_not_the_source(tmp_path):
    source = CountingSource(400)
    index = build_shards(source, tmp_path / "out", **OPTS)
    assert source.readings == 2 and index["counts"]["written"] == 400
    # 3 splits filling (10 each) + 2 shards in the pool + the one being read: at most 60 of the 400
    assert source.most_alive <= 3 * 10 + 2 * 10 + 1, source.most_alive
    assert verify_checksums(load_index(tmp_path / "out")) == []


def test_shards_are_the_same_as_from_a_source_read_once(tmp_path):
    """Shard contents do not depend on the order in which shards fill (test and folds interleave)."""
    build_shards(CountingSource(97), tmp_path / "a", **OPTS)
    build_shards(CountingSource(97), tmp_path / "b", **{**OPTS, "workers": 2})
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(names) > 3
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _regroup(record):
    if record.uid.endswith("7"):
        record.group = "another-patient"
    return record


def _retext(record):
    if record.uid.endswith("33"):
        record.prompt += " Edited."
    return record


@pytest.mark.parametrize("change, what", [
    (_regroup, r"record \d+ is now phantom-\d+ \(group another-patient\)"),
    (_retext, "a record.s report, labels or file differ"),
    (lambda record: None if record.uid.endswith("5") else record, r"record \d+ is now"),
])
def test_a_source_that_changes_between_readings_stops_the_build_and_leaves_the_folder_free(tmp_path, change, what):
    source = CountingSource(60, change_on_reading=2, change=change)
    with pytest.raises(SourceChanged, match=f"changed while the build read it \\({what}.*rerun it"):
        build_shards(source, tmp_path / "out", **OPTS)
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "index.json").exists()
    index = build_shards(CountingSource(60), tmp_path / "out", **OPTS)  # the folder takes a fresh build
    assert index["counts"]["written"] == 60


def test_a_resume_with_every_shard_kept_reads_the_source_once(tmp_path):
    build_shards(CountingSource(60), tmp_path / "out", **OPTS)
    source = CountingSource(60)
    index = build_shards(source, tmp_path / "out", **{**OPTS, "resume": True})
    assert source.readings == 1 and index["run"]["processed"] == 0 and index["counts"]["written"] == 60

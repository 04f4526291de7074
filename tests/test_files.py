"""Files written whole or not at all: what resuming a killed run relies on."""

from __future__ import annotations

import json

import pytest

from autoq.files import write_json, written_whole


def test_a_write_that_fails_leaves_the_last_whole_file_and_no_partial(tmp_path):
    path = tmp_path / "cache" / "figures.json"
    write_json(path, {"quality": 0.9})
    with pytest.raises(RuntimeError), written_whole(path) as partial:
        partial.write_text('{"quality": 0.')  # killed half-way
        raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"quality": 0.9}
    assert [p.name for p in path.parent.iterdir()] == ["figures.json"]


def test_the_partial_keeps_the_suffix_a_writer_needs(tmp_path):
    """numpy adds `.npz` to a name without it: the partial name must end as the file does."""
    import numpy as np

    path = tmp_path / "maxima.npz"
    with written_whole(path) as partial:
        np.savez(partial, x=np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["maxima.npz"]
    with np.load(path) as stored:
        assert stored["x"].tolist() == [0, 1, 2]

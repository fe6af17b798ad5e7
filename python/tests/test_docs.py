"""What the documentation says about the Python package matches what it does."""
import re

import pytest

import zo2
from conftest import SOURCE


def _session_parameters():
    with pytest.raises(TypeError) as e:
        zo2.Session("unused", no_such_parameter=1)
    return str(e.value).split("(the parameters: ")[1].rstrip(")").split(", ")


def test_unset_size_caps_read_back_as_none(tiny):
    # host_mem=None (no cap) reads back as None, as gpu_mem=None does: not the C field's 0.
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, host_mem=None, gpu_mem=None) as s:
        assert s.params["gpu_mem"] is None
        assert s.params["host_mem"] is None
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16) as s:
        assert s.params["host_mem"] is None


def test_readme_lists_every_session_parameter():
    readme = (SOURCE / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Python (`import zo2`)")
    end = readme.index("\n## ", start + 1)
    python = readme[start:end]
    bullet = python[python.index("- **Session parameters**"):]
    bullet = bullet[:bullet.index("\n- **")]
    # Named as `name` in a list or as name= in an example call.
    missing = [p for p in _session_parameters() if not re.search(rf"`{p}`|\b{p}=", python)]
    assert not missing, f"README's Python section does not name {missing}"
    # prefix tuning's count is in the parameter list itself, with what it means.
    assert re.search(r"`prefix_tokens` \(P key/value rows per layer", bullet), bullet

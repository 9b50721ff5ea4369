"""Fixtures for the data tests: a small glyph build (once per session, in a temp folder) and
a synthetic dataset whose pixels say which class and example they are."""

import pytest
from data_helpers import make_tagged

from fastmeta.data import load_glyphs

SMALL_SCRIPTS = ["Latin", "Greek", "Georgian", "Armenian"]  # train, train, val, test
SMALL_PER_SCRIPT = 24


@pytest.fixture(scope="session")
def glyph_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("glyphs")


@pytest.fixture(scope="session")
def small_glyphs(glyph_dir):
    return load_glyphs(glyph_dir, scripts=SMALL_SCRIPTS, max_classes_per_script=SMALL_PER_SCRIPT,
                       progress=False)


@pytest.fixture
def tagged():
    return make_tagged()

from __future__ import annotations

import pytest

from linrec.models.demo import write_demo_model


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """Per family, a tiny demo checkpoint written once for the whole session."""
    made: dict[str, str] = {}

    def get(family: str = "liger_gla") -> str:
        if family not in made:
            path = tmp_path_factory.mktemp(f"demo-{family}")
            write_demo_model(path, family)
            made[family] = str(path)
        return made[family]

    return get

"""The report's own reading of run.json (issue 10): entries only the report uses, damaged by hand."""

from __future__ import annotations

import json
from pathlib import Path

from bad_input_cases import Case
from bad_input_cases.run_dir import finished_run


def _damaged_data_limit(value: object) -> Case:
    """``hiercluster report`` on a finished run whose run.json has ``data_limit`` set to ``value``."""

    def make(tmp: Path) -> list[str]:
        _, run = finished_run(tmp)
        info = json.loads((run / "run.json").read_text())
        info["data_limit"] = value
        (run / "run.json").write_text(json.dumps(info))
        return ["report", str(run)]

    return make


CASES = {
    "run.json data_limit not an object": Case(_damaged_data_limit("500 of 10000"), "run.json is damaged: data_limit"),
    "run.json data_limit larger than the split": Case(
        _damaged_data_limit({"limit": 20000, "of": 10000}), "data_limit: 20000 of 10000 images is not a subset"
    ),
}

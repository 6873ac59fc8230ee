"""Types at the main entry point (issue 16): a decorated call returns ``ExportResult[R]`` where
the function returned ``R`` — called directly, through ``ray.remote`` and ``ray.get``, as an
``async def`` and as a method — so ``r.value["loss"]`` type-checks and ``r["loss"]`` does not.
mypy runs on a sample file, following Ray's own type hints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SAMPLE = """
import ray

from raysync import isolated_export


@isolated_export(None)
def train(x: int) -> dict[str, float]:
    return {"loss": 0.1 * x}


@isolated_export(None)
async def fetch(x: int) -> int:
    return x


class Trainer:
    @isolated_export(None)
    def step(self, name: str) -> list[int]:
        return []


async def main() -> None:
    direct = train(1)
    reveal_type(direct)  # 1
    loss: float = direct.value["loss"]
    got = ray.get(ray.remote(train).remote(1))
    reveal_type(got)  # 2
    reveal_type(await fetch(1))  # 3
    reveal_type(Trainer().step("a"))  # 4
    direct["loss"]  # the one error
    train("one")  # and a wrong argument type
"""


def test_a_decorated_call_is_typed_as_an_export_result_of_what_the_function_returns(
    tmp_path: Path,
) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(SAMPLE)
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--config-file", "/dev/null", "--cache-dir",
            str(tmp_path / "cache"), "--follow-imports=silent", "--ignore-missing-imports",
            "--no-error-summary", "--hide-error-context", str(sample),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    out = proc.stdout
    revealed = re.findall(r'Revealed type is "([^"]+)"', out)
    assert revealed == [
        "raysync.result.ExportResult[dict[str, float]]",
        "raysync.result.ExportResult[dict[str, float]]",
        "raysync.result.ExportResult[int]",
        "raysync.result.ExportResult[list[int]]",
    ], out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 2, out
    assert "is not indexable" in errors[0]  # r["loss"] is caught before it runs
    assert 'incompatible type "str"' in errors[1]  # the parameters are kept

"""The `crossdiff` command line (the README's main job)."""

import json

from crossdiff_ext import cli


def test_demo_runs_and_reports_every_concept(capsys):
    code = cli.main(["planted", "--steps", "200", "--tokens", "4000", "--json", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["concepts"] == len(out["concepts"]) == 34
    assert code == (0 if out["summary"]["recovered_and_classified"] == 34 else 1)
    assert {"kind", "latent", "cosine", "delta_norm", "band", "correct"} <= set(out["concepts"][0])

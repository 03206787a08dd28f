from flexmore.checkpoint import CheckpointReader
from flexmore.demo import run_demo


def test_smoke_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    messages = []
    result = run_demo(out, seed=0, log=messages.append)
    assert result["max_logit_diff"] < 1e-4
    for name in ("flexolmo", "flexmore-full", "flexmore-k1-no-math", "flexmore-mixed", "flexolmo-dense"):
        assert CheckpointReader(out / name).keys()
    assert CheckpointReader(out / "flexmore-k1-no-math").config_dict["expert_names"] == ["public", "code", "chat"]
    assert len(messages) >= 6 and not any(p.name.startswith(".") for p in tmp_path.iterdir())

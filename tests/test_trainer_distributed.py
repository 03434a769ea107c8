"""Two CPU processes (gloo, through accelerate) agree with one process on the same global batch, and share
the held-out evaluation between them with gathered metrics."""
import torch

from tests.ranks import run_ranks


def test_evaluation_is_sharded_and_gathered(tmp_path):
    run_ranks("tests.eval_worker", [str(tmp_path / "one"), str(tmp_path / "s")], 1)
    run_ranks("tests.eval_worker", [str(tmp_path / "two"), str(tmp_path / "d")], 2)
    single = torch.load(tmp_path / "one.0")
    assert 0 < single["expected"] < 1  # a mix of right and wrong: the gathered share is informative
    ranks = [torch.load(tmp_path / f"two.{r}") for r in range(2)]
    assert single["seen"] == [7, 7]  # greedy, then sampled: every problem on the one process
    assert [r["seen"] for r in ranks] == [[4, 4], [3, 3]]  # each process generates for its share only
    for r in ranks:  # every process returns the metrics of all 7 problems
        assert r["metrics"]["eval/accuracy"] == single["metrics"]["eval/accuracy"] == single["expected"]
        for key in ("eval/pass@1", "eval/pass@2", "eval/sampled_accuracy"):
            assert r["metrics"][key] == single["metrics"][key]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


def _one_and_two_processes(worker: str, tmp_path):
    """The worker's saved results with 1 and with 2 processes, after checking both states agree: the same
    names and values to float32 tolerance, with a real (non-zero) gradient behind them."""
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    run_ranks(worker, [str(single), str(tmp_path / "s")], 1)
    run_ranks(worker, [str(double), str(tmp_path / "d")], 2)
    one, two = torch.load(single), torch.load(double)
    assert one["world"] == 1 and two["world"] == 2
    scale = max(v.abs().max().item() for v in one["state"].values())
    assert scale > 1e-4 and one["state"].keys() == two["state"].keys()
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, atol=1e-5 * scale, rtol=1e-4)
    return one, two


def test_two_processes_match_one(tmp_path):
    _one_and_two_processes("tests.ddp_worker", tmp_path)


def test_fsdp2_sharded_policy_matches_one_process(tmp_path):
    """accelerate runs FSDP only on accelerators, so the worker shards the policy with torch's FSDP2 itself (as
    accelerate's FSDP2 preparation does): the fused loss reads the whole lm_head weight and generation and the
    teacher see whole root parameters (Trainer.root_view), with the same gradients as one unsharded process."""
    one, two = _one_and_two_processes("tests.fsdp_worker", tmp_path)
    assert two["eval"]["eval/accuracy"] == one["eval"]["eval/accuracy"]  # generation under sharded weights


def test_fsdp2_checkpoint_holds_whole_weights_and_resumes(tmp_path):
    """A 2-process FSDP2 run checkpoints whole tensors (not this process's shards): its weights and its
    save_pretrained folder equal the unsharded run's after one step, the folder loads with from_pretrained, and
    resuming under FSDP2 (weights and the name-keyed optimizer state given back as shards) takes the same second
    step as the unsharded run resumed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = {}
    for world, name in ((1, "one"), (2, "two")):
        run = tmp_path / name
        run_ranks("tests.fsdp_worker", [str(tmp_path / "unused"), str(run), "train"], world)
        run_ranks("tests.fsdp_worker", [str(tmp_path / "unused"), str(run), "resume"], world)
        weights[name] = {step: load_file(run / "run" / f"checkpoint-{step}" / "weights.safetensors")
                         for step in (1, 2)}
        exported = AutoModelForCausalLM.from_pretrained(run / "run" / "checkpoint-1" / "model")
        saved = dict(exported.named_parameters())
        for key, value in weights[name][1].items():
            torch.testing.assert_close(saved[key], value, atol=0, rtol=0)
    one, two = weights["one"], weights["two"]
    moved = max((one[2][k] - one[1][k]).abs().max().item() for k in one[1])
    assert moved > 1e-4  # the resumed step trained
    for step in (1, 2):
        assert one[step].keys() == two[step].keys()
        for key, value in one[step].items():
            assert two[step][key].shape == value.shape
            torch.testing.assert_close(two[step][key], value, atol=1e-4, rtol=1e-3)

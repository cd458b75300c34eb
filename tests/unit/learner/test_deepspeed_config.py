"""What the learner options become in DeepSpeed's config (the plumbing: offload only acts on GPU)."""

from rlsys.learner.config import LearnerConfig
from rlsys.learner.rank import deepspeed_config


def test_offload_reaches_deepspeed_on_gpu_with_its_cpu_adam():
    cfg = LearnerConfig(zero_stage=3, offload_optimizer=True, offload_params=True, dtype="bf16")
    ds = deepspeed_config(cfg, world_size=8, on_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["optimizer"]["params"]["torch_adam"] is False  # offloaded state steps with DeepSpeed's CPU Adam
    assert ds["bf16"] == {"enabled": True}


def test_offload_is_a_no_op_on_cpu():
    """On a CPU machine the optimizer state and parameters already live in CPU memory."""
    ds = deepspeed_config(LearnerConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 2, on_gpu=False)
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_optimizer_offload_alone_keeps_parameters_on_the_gpu():
    ds = deepspeed_config(LearnerConfig(zero_stage=2, offload_optimizer=True), 4, on_gpu=True)
    assert "offload_optimizer" in ds["zero_optimization"] and "offload_param" not in ds["zero_optimization"]

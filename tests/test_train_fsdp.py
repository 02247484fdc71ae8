"""FSDP2 through Accelerate on 2 CPU processes (gloo) ends with the same weights as 1 process, and resumes exactly.

Accelerate 1.15 never picks FSDP on a CPU-only machine: `PartialState._prepare_backend` (accelerate/state.py)
returns MULTI_CPU, and `AcceleratorState` only takes its FSDP branch for accelerator types (MULTI_GPU, ...).
The launcher below overrides that one detection function to answer ("gloo", MULTI_GPU), and
ACCELERATE_TORCH_DEVICE=cpu keeps the device on the CPU. Everything after it is Accelerate's own FSDP path, set up
from the same FSDP_* variables that `accelerate launch --use_fsdp` exports: the FSDP plugin, `fully_shard` with
transformer-block wrapping, FSDP2 gradient clipping, sharded `save_state`/`load_state`, and our unchanged
`distill.train`. What this cannot show: nccl, mixed precision on a GPU, memory savings.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from accelerate.utils import merge_fsdp_weights
from train_fixtures import (  # noqa: F401
    LOSS_RTOL,
    ROOT,
    adamw_lipschitz,
    assert_same_weights,
    load_weights,
    max_gradient,
    read_log,
    tiny_cache,
    tiny_config,
    tiny_tokenizer,
)

import distill.train as train_mod
from student.export import export_checkpoint, load_student

pytestmark = pytest.mark.slow

LAUNCHER = """
import sys
from accelerate.state import PartialState
from accelerate.utils import DistributedType

# The only change to Accelerate: claim an accelerator (gloo, MULTI_GPU) so that AcceleratorState takes FSDP.
PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
    "gloo", DistributedType.MULTI_GPU)
from distill.train import main
sys.exit(main(sys.argv[1:]))
"""
# What `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
# --fsdp_transformer_layer_cls_to_wrap ResidualAttentionBlock,BertLayer` sets (state dict: SHARDED_STATE_DICT).
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResidualAttentionBlock,BertLayer",
    "ACCELERATE_TORCH_DEVICE": "cpu",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_fsdp(cfg, tmp_path, name: str) -> subprocess.CompletedProcess:
    path, launcher = tmp_path / f"{name}.yaml", tmp_path / "fsdp_cpu_launch.py"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    launcher.write_text(LAUNCHER)
    env = {
        **os.environ,
        **FSDP_ENV,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(launcher),
        "--config",
        str(path),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _merged(ckpt) -> dict[str, torch.Tensor]:
    """The sharded FSDP checkpoint as one state dict, merged as `accelerate merge-weights` does (in place)."""
    shards = ckpt / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # sharded save
    assert not (ckpt / "model.safetensors").exists()
    merge_fsdp_weights(str(shards), str(ckpt))
    return load_weights(ckpt)


def test_fsdp2_equals_one_process_resumes_and_exports(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    # accumulation (2 micro-batches), gradient clipping and a logit-scale clamp that fires (log 10 < log(1/0.07))
    common = dict(
        features=tiny_cache,
        tokenizer=tiny_tokenizer,
        train__max_steps=3,
        train__checkpoint_every=2,
        train__keep_last=2,
        train__grad_accum=2,
        train__tensorboard="false",
        optim__max_grad_norm=1.0,
        optim__logit_scale_max=10.0,
        **adamw_lipschitz(0.4),
    )  # eps >= every |gradient|: see GRAD_REL
    one_cfg = tiny_config(tiny_corpus, tmp_path / "one", data__batch_size=4, **common)
    one = train_mod.train(one_cfg)
    assert one["step"] == 3
    fsdp_cfg = tiny_config(tiny_corpus, tmp_path / "fsdp", data__batch_size=2, **common)
    res = _launch_fsdp(fsdp_cfg, tmp_path, "fsdp")
    assert "FSDP: 1-element instead of 0-dim parameters: student.logit_scale" in res.stdout  # INFO: stdout
    assert json.loads((tmp_path / "fsdp" / "run_meta.json").read_text())["num_processes"] == 2

    # resume: a copy of the FSDP run without its last checkpoint continues from checkpoint-2
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint-3"))
    res = _launch_fsdp(
        tiny_config(tiny_corpus, tmp_path / "resumed", data__batch_size=2, **common), tmp_path, "resumed"
    )
    assert f"Resuming from {tmp_path / 'resumed' / 'checkpoint-2'} at step 2" in res.stdout

    ref = load_weights(tmp_path / "one" / "checkpoint-3")

    # distill export reads the sharded checkpoint directly (merging it as `accelerate merge-weights` would)
    direct, _, _ = load_student(export_checkpoint(tmp_path / "fsdp" / "checkpoint-3", tmp_path / "export-direct"))
    fsdp, resumed = _merged(tmp_path / "fsdp" / "checkpoint-3"), _merged(tmp_path / "resumed" / "checkpoint-3")
    for k, v in fsdp.items():
        if k.startswith("student."):
            assert torch.allclose(
                direct.state_dict()[k[len("student.") :]], v.reshape(direct.state_dict()[k[len("student.") :]].shape)
            ), k
    assert fsdp.keys() == ref.keys() == resumed.keys()  # student.* and heads.*: no FSDP wrapper prefix
    assert fsdp["student.logit_scale"].shape == (1,) and ref["student.logit_scale"].shape == ()
    assert ref["student.logit_scale"] < torch.log(torch.tensor(1 / 0.07)) - 0.3  # the clamp fired
    # float32 sums in another order only (shards, 2 x 2 rows per micro-batch, the clipping norm reduced per shard):
    # within 2.2e-6 (measured 1.5e-8); a rank's rows dropped: 6.4e-4, gradients summed: 4.1e-4
    assert max_gradient(tmp_path / "one" / "checkpoint-3", one_cfg) <= one_cfg.optim.eps
    assert_same_weights(ref, fsdp, one_cfg)
    for k in ref:
        assert torch.equal(fsdp[k], resumed[k]), k
    for ra, rb in zip(read_log(tmp_path / "one"), read_log(tmp_path / "fsdp"), strict=True):
        assert ra["step"] == rb["step"]
        for key in ("loss", "infonce", "feature", "icl"):
            assert ra[key] == pytest.approx(rb[key], rel=LOSS_RTOL)  # derivation at train_fixtures.LOSS_RTOL

    # the merged checkpoint exports like a 1-process one: the [1] logit scale loads into open_clip's 0-dim one
    model, _, _ = load_student(export_checkpoint(tmp_path / "fsdp" / "checkpoint-3", tmp_path / "export"))
    exported = {f"student.{k}": v for k, v in model.state_dict().items()}
    assert_same_weights(
        {k: v for k, v in ref.items() if k.startswith("student.")},
        {k: exported[k] for k in ref if k.startswith("student.")},
        one_cfg,
    )

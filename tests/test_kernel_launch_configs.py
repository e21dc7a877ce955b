"""The GPU launch configurations, checked on the CPU from the arguments the launchers really pass.

Under the interpreter the autotuner has a single config and never calls the
prune function, so a prune bug would only show on a GPU, at the first
launch. Here the launchers run with the kernels replaced by a recorder, and
the recorded arguments go through a GPU-style autotuner's pruning.
"""
import importlib

import pytest
import torch
import triton

from tests.cases import AttentionCase

fa = importlib.import_module("kernels.flash_attention")
tune = importlib.import_module("kernels.autotune")
TUNED = {"_attn_fwd_tuned": (tune._attn_fwd, tune._FWD_CONFIGS), "_attn_bwd_dkdv_tuned": (tune._attn_bwd_dkdv,
                                                                                      tune._DKDV_CONFIGS),
         "_attn_bwd_dq_tuned": (tune._attn_bwd_dq, tune._DQ_CONFIGS)}


class Recorder:
    """Stands in for an autotuned kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def recorded_launches(monkeypatch, case, dtype):
    recorders = {name: Recorder() for name in TUNED}
    for name, recorder in recorders.items():
        monkeypatch.setattr(fa, name, recorder)
    q, k, v = case.make_inputs(dtype, "cpu")
    o, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
    fa._flash_fwd(q, k, v, case.causal, 0.125)
    fa._flash_bwd(torch.randn_like(q), q, k, v, o, lse, case.causal, 0.125)
    return {name: recorder.calls[0] for name, recorder in recorders.items()}


def pruned(kernel, configs, args, kwargs):
    """What triton's Autotuner keeps for this launch (as Autotuner.run does: nargs, then prune_configs)."""
    tuner = triton.autotune(configs=configs, key=tune._TUNING_KEY,
                            prune_configs_by={"early_config_prune": tune._prune_configs})(kernel)
    tuner.nargs = dict(zip(tuner.arg_names, args))
    return tuner.prune_configs(kwargs)


@pytest.mark.parametrize("case", [
    AttentionCase(batch=1, h_q=4, h_kv=2, n_q=4096, n_k=4096, head_dim=128, causal=True),
    AttentionCase(batch=1, h_q=4, h_kv=1, n_q=2000, n_k=3000, head_dim=256, causal=False),
    AttentionCase(batch=2, h_q=2, h_kv=2, n_q=20, n_k=20, head_dim=40, causal=True),
], ids=lambda c: c.id)
def test_pruned_configs_fit_the_shape(monkeypatch, case):
    for name, (grid, args, kwargs) in recorded_launches(monkeypatch, case, torch.bfloat16).items():
        kernel, configs = TUNED[name]
        kept = pruned(kernel, configs, args, kwargs)
        assert kept, f"{name}: every config pruned"
        assert len(kept) > 1 or case.head_dim == 256 or max(case.n_q, case.n_k) < 64, f"{name}: nothing to tune"
        for config in kept:
            block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
            assert min(block_m, block_n) >= 16, f"{name}: tl.dot needs tiles of at least 16, got {config}"
            if case.head_dim > 128:
                assert block_m * block_n <= 64 * 32 and config.num_stages <= 2, f"{name}: {config} cannot fit D=256"
        # One grid axis (no 65535 cap on batch * heads): blocks of the sequence times batch * heads.
        meta = kept[0].kwargs
        blocks = triton.cdiv(case.n_k, meta["BLOCK_N"]) if "dkdv" in name else triton.cdiv(case.n_q, meta["BLOCK_M"])
        heads = case.h_kv if "dkdv" in name else case.h_q
        assert grid(meta) == (blocks * case.batch * heads,)


def test_fp32_gets_one_config(monkeypatch):
    case = AttentionCase(batch=1, h_q=2, h_kv=2, n_q=1024, n_k=1024, head_dim=128, causal=True)
    for name, (grid, args, kwargs) in recorded_launches(monkeypatch, case, torch.float32).items():
        kernel, configs = TUNED[name]
        assert pruned(kernel, configs, args, kwargs) == configs[-1:], name

"""The communication contract: exact collective counts and bytes of one training step."""
import pytest
import torch

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.parallel.comm import comm_report, expected_gpt2_comm, format_comm_table

CONFIGS = {  # name: (tp, dp, sequence_parallel, loss_parallel)
    "tp": (2, 1, False, False), "tp+sp": (2, 1, True, False), "tp4+sp": (4, 1, True, False),
    "tp+lp": (2, 1, False, True), "dp": (1, 2, False, False), "hybrid": (2, 2, False, False),
    "hybrid+sp": (2, 2, True, False), "hybrid+sp+lp": (2, 2, True, True),
}


def _comm_body(tp, dp, sp, lp, bias):
    ctx = get_ctx(dp=dp, tp=tp)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_layer=3, bias=bias))
    plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": sp, "loss_parallel": lp}
    model = tm.apply_hybrid_parallel(model, ctx, plan, bucket_mb=0.02)
    B, T = 2, 8
    idx = torch.randint(0, 65, (B, T))
    # the training step's path: the loss without returning logits
    measured = comm_report(model, idx, idx, ctx, return_logits=False)
    expected = expected_gpt2_comm(model, B, T, ctx, sequence_parallel=sp, loss_parallel=lp)
    assert measured == expected, "\n" + format_comm_table(measured, expected)
    return format_comm_table(measured, expected)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_collectives_match_the_contract(name, bias):
    tp, dp, sp, lp = CONFIGS[name]
    table = world(tp * dp).run(_comm_body, tp, dp, sp, lp, bias)[0]
    assert "ratio 1.00" in table

"""Training safeguards: the finite-loss guard and its trend warnings."""

from __future__ import annotations

import math

import pytest
import torch

from cai.errors import CaiError
from cai.training import FiniteGuard, check_finite


def test_the_finite_guard_stops_at_nan_and_warns_on_exploding_weights(caplog):
    with pytest.raises(CaiError, match=r"sft: the training loss became nan at step 3; .* Lower sft.lr"):
        check_finite("sft", 3, "training loss", math.nan)
    check_finite("sft", 3, "training loss", 1.5)  # finite: nothing happens

    class Logger:
        def __init__(self) -> None:
            self.logged = {}

        def log_metrics(self, metrics, step):
            self.logged.update(metrics)

    class Trainer:
        global_step = 7
        logger = Logger()

    module = torch.nn.Linear(4, 4)
    guard = FiniteGuard("pm")
    guard.on_train_start(Trainer, module)
    guard.losses = [1.0, 1.0, 2.0, 3.0]  # ended above where it started
    with torch.no_grad():
        module.weight.mul_(1000.0)  # and the weights grew far more than 10x
    with caplog.at_level("WARNING", logger="cai.training"):
        guard.on_train_end(Trainer, module)
    assert "pm: the training loss rose" in caplog.text and "pm: the weight norm grew" in caplog.text
    assert Trainer.logger.logged == {"pm/train/warning_loss_rose": 1.0, "pm/train/warning_weights_exploded": 1.0}
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    with pytest.raises(CaiError, match="pm: the parameter norm became inf"):
        guard.on_train_end(Trainer, module)


def test_adamw_is_fused_unless_mixed_precision_must_clip():
    """The fused step is faster (the PM at bf16-mixed: about 9%); Lightning's AMP plugin refuses to clip its
    gradients, so it is foreach exactly where mixed precision meets clipping (PPO, or trainer.gradient_clip_val)."""
    import lightning as L

    from cai.training import adamw

    params = list(torch.nn.Linear(4, 4).parameters())
    fused = lambda opt: bool(opt.defaults["fused"])  # noqa: E731
    mixed, clipped = (
        L.Trainer(precision="bf16-mixed", accelerator="cpu"),
        L.Trainer(precision="bf16-mixed", accelerator="cpu", gradient_clip_val=1.0),
    )
    assert fused(adamw(params, 1e-3)) and fused(adamw(params, 1e-3, L.Trainer(precision="32-true", accelerator="cpu"), clips=True))
    assert fused(adamw(params, 1e-3, mixed))  # SFT and the PM at bf16-mixed: nothing to clip
    assert not fused(adamw(params, 1e-3, mixed, clips=True)) and not fused(adamw(params, 1e-3, clipped))


def test_ppo_fits_deepspeeds_config_before_the_trainer_reads_it():
    """Under DeepSpeed, PPO's clipping must live in the engine's config, and its one-step loader gives
    Lightning no batch sampler to read a micro-batch size from (the H200 run failed there)."""
    pytest.importorskip("deepspeed")
    from cai.training import build_strategy, deepspeed_for_manual_loop

    strategy = build_strategy("deepspeed", zero_stage=3)
    deepspeed_for_manual_loop(strategy, 0.5)
    assert strategy.config["gradient_clipping"] == 0.5
    assert strategy.config["train_micro_batch_size_per_gpu"] == 1
    deepspeed_for_manual_loop("auto", 0.5)  # other strategies: nothing to do


def test_pack_shared_prefix_lays_out_the_prompt_once_and_each_answer_after_it(monkeypatch):
    from cai import training
    from cai.training import pack_shared_prefix

    # Two groups: a pair, and a pair whose first sequence is all prefix of the second, ending with the pad id 0.
    batch = pack_shared_prefix([([7, 8, 1, 2], [7, 8, 3]), ([7, 5], [7, 5, 0, 4, 0])], pad_id=0, pool_skip=0)
    assert batch["input_ids"].tolist() == [[7, 8, 1, 2, 3], [7, 5, 0, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 4]]  # each answer at its own positions
    assert batch["row"].tolist() == [0, 0, 1, 1]
    assert batch["columns"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 4, 0, 0], [0, 1, 0, 0, 0], [0, 1, 2, 3, 4]]
    assert batch["ends"].tolist() == [3, 4, 1, 3]  # the last token that is not pool_skip, as transformers pools
    sees = batch["attention_mask"][0, 0].int().tolist()  # (T, T) of the first row: query row, key column
    assert sees == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # answer a: the prompt, then itself
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # answer b: the prompt and itself, not answer a
    ]
    short = pack_shared_prefix([([7, 1], [7, 2, 3]), ([5], [6])], pad_id=0)  # the second row: [5, 6] and padding
    assert short["attention_mask"][1, 0].int().tolist()[3] == [0, 0, 0, 1]  # a pad column sees itself only
    # A row longer than max(2 x its longest sequence, PACKED_ROW) is cut: 4 answers of 4 after a prompt of 4
    # would make 20 tokens, past 2 x 8; three make 16.
    monkeypatch.setattr(training, "PACKED_ROW", 0)
    group = [[1, 2, 3, 4, 10 + i, 11, 12, 13] for i in range(4)]
    cut = pack_shared_prefix([group], pad_id=0)
    assert cut["row"].tolist() == [0, 0, 0, 1] and cut["input_ids"].shape == (2, 16)

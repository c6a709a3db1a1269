"""Trainer integrations on CPU with tiny models trained for a few real steps: Lightning through
BaleCheckpointIO, Hugging Face transformers through BaleCheckpointCallback; each resumes from
the latest complete step."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from balefs.checkpoint import Checkpointer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def test_lightning_checkpoint_io_saves_and_resumes(volume) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from balefs.checkpoint import BaleCheckpointIO

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, _idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)), batch_size=8)

    def trainer(max_steps: int, io: BaleCheckpointIO) -> pl.Trainer:
        return pl.Trainer(max_steps=max_steps, default_root_dir="bale://vol/runs/lit", plugins=[io], logger=False,
                          enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                          callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)])

    io = BaleCheckpointIO(keep_last=2)
    model = Tiny()
    trainer(4, io).fit(model, data)
    with Checkpointer("bale://vol/runs/lit/checkpoints") as c:
        assert c.steps() == [2, 4]
        saved = c.load()
        assert torch.equal(saved["state_dict"]["net.weight"], model.net.weight.detach())
        assert saved["global_step"] == 4 and saved["optimizer_states"][0]["state"][0]["exp_avg"].shape == (1, 8)
    latest = BaleCheckpointIO.latest("bale://vol/runs/lit/checkpoints")
    assert latest.endswith("step-0000000004")
    resumed = Tiny()
    t2 = trainer(6, BaleCheckpointIO(keep_last=2))
    t2.fit(resumed, data, ckpt_path=latest)
    assert t2.global_step == 6
    with Checkpointer("bale://vol/runs/lit/checkpoints") as c:
        assert c.steps() == [4, 6]


def test_hf_callback_takes_over_saving_and_resumes(volume, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from balefs.checkpoint import BaleCheckpointCallback

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": x, "labels": x} for x in ids]

    def run(max_steps: int) -> tuple[Trainer, BaleCheckpointCallback]:
        torch.manual_seed(0)
        cb = BaleCheckpointCallback("bale://vol/runs/hf", keep_last=2)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, save_steps=2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=100,
                                 disable_tqdm=True)
        t = Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=train, callbacks=[cb])
        t.train()
        return t, cb

    t, _ = run(4)
    assert not any(n.startswith("checkpoint") for n in os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else True
    with Checkpointer("bale://vol/runs/hf") as c:
        assert c.steps() == [2, 4]
        saved = c.load()
        w = saved["model"]["transformer.h.0.mlp.c_fc.weight"]
        assert torch.equal(w, t.model.state_dict()["transformer.h.0.mlp.c_fc.weight"])
        assert saved["optimizer"]["state"] and "last_epoch" in saved["scheduler"]
    t2, cb2 = run(6)
    assert cb2.resumed_from == 4 and t2.state.global_step == 6
    with Checkpointer("bale://vol/runs/hf") as c:
        assert c.steps() == [4, 6]

"""The optional trainer integrations, each run with a tiny model when its package is installed."""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.monitor.records import read_metrics


def _data(n=64):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _require(name: str, attribute: str):
    """The installed package ``name``, or a skip that says why it cannot be used here."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} not installed (optional extra)")
    try:
        module = importlib.import_module(name)
        getattr(module, attribute)
    except Exception as error:  # e.g. a torchvision built for another torch breaks the import
        pytest.skip(f"{name} is installed but fails to import here: {error}")
    return module


def test_lightning_callback_profiles_fit(tmp_path):
    lightning = _require("lightning", "LightningModule")
    from gradnoise.monitor.lightning import GradNoiseCallback

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=8)
    callback = GradNoiseCallback(out=tmp_path, every=2)
    trainer = lightning.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), loader)
    metrics = read_metrics(tmp_path)
    assert [r["step"] for r in metrics.steps] == [1, 3, 5, 7]
    assert all(r["loss"] is not None for r in metrics.steps)
    assert metrics.run["steps"] == 8 and (tmp_path / "report.html").is_file()


class _HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer(tmp_path, callback, accumulation=1):
    transformers = _require("transformers", "Trainer")
    _require("accelerate", "Accelerator")  # transformers.Trainer needs it with PyTorch
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        gradient_accumulation_steps=accumulation,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=_HFModel(), args=args, train_dataset=_Rows(), callbacks=[callback]
    )


def test_transformers_callback_profiles_train(tmp_path):
    _require("transformers", "Trainer")
    from gradnoise.monitor.hf import GradNoiseTrainerCallback

    callback = GradNoiseTrainerCallback(out=tmp_path / "noise", every=2)
    _trainer(tmp_path, callback).train()
    metrics = read_metrics(tmp_path / "noise")
    assert [r["step"] for r in metrics.steps] == [1, 3, 5, 7]
    assert metrics.steps[0]["batch_size"] == 8 and metrics.run["steps"] == 8


def test_transformers_callback_refuses_gradient_accumulation(tmp_path):
    _require("transformers", "Trainer")
    from gradnoise.monitor.hf import GradNoiseTrainerCallback

    trainer = _trainer(tmp_path, GradNoiseTrainerCallback(every=2), accumulation=2)
    with pytest.raises(
        GradNoiseError,
        match=r"GradNoiseTrainerCallback: expected "
        r"gradient_accumulation_steps=1 .*got gradient_accumulation_steps=2\. Set",
    ):
        trainer.train()
